"""A thin layer over the checkpoint's `transformers` tokenizer: load it, encode prompts, render chat templates."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's fast tokenizer (`transformers.AutoTokenizer`)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of a plain prompt, with the special tokens the tokenizer adds (e.g. bos)."""
    return list(tokenizer(text)["input_ids"])


def encode_batch(tokenizer, texts: list[str]) -> list[list[int]]:
    """`encode` for many prompts in one call (the fast tokenizer batches them in Rust)."""
    return [list(ids) for ids in tokenizer(texts)["input_ids"]]


def render_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """The prompt text of a conversation: the tokenizer's chat template applied to `messages`. Encode it without
    adding special tokens: the template already carries any bos."""
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_chat(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> tuple[str, list[int]]:
    """Render `messages` through the chat template; return the prompt text and its token ids."""
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("a conversation must be a list of {'role': ..., 'content': ...} messages")
    text = render_chat(tokenizer, messages, add_generation_prompt)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return text, ids

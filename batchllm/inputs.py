"""Input processing, one implementation for the Python API, batch files, `analyze` and Ray: the forms a prompt may
take, chat templates, tokenization (batched through the fast tokenizer) and the checks a request must pass before
it reaches the engine (token ids in the vocabulary, a non-empty prompt, a context and a KV cache it fits). No torch.

    PromptInput            text, chat messages or token ids (what a caller asked to run)
    PromptEncoder          a model's tokenizer: PromptInputs -> token ids, or the InvalidPrompt saying why not
    check_fits(...)        why prompt + max_tokens cannot run here (None when it can)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Error codes (those of OpenAI Batch error lines).
E_PARAM = "invalid_parameter"
E_CONTEXT = "context_length_exceeded"
E_NO_TEMPLATE = "invalid_url"


class InvalidPrompt(Exception):
    """A prompt or request that cannot run; carries an error code and a message."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class PromptInput:
    """One prompt as given: exactly one of `text`, `messages` (a chat conversation) or `token_ids`."""

    text: str | None = None
    messages: tuple[dict, ...] | None = None
    token_ids: tuple[int, ...] | None = None
    add_generation_prompt: bool = True  # chat: end the rendered text with the assistant's turn

    @classmethod
    def of(cls, prompt: Any) -> PromptInput:
        """A prompt of the Python API: a str, {"prompt": str}, {"prompt_token_ids": [int, ...]} (a "prompt" text
        beside the ids is kept for the output only), or a conversation (a list of {"role", "content"} dicts).
        Raises InvalidPrompt for anything else."""
        if isinstance(prompt, str):
            return cls(text=prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return cls(token_ids=_token_ids(prompt["prompt_token_ids"]))
        if isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            return cls(text=prompt["prompt"])
        if isinstance(prompt, (list, tuple)) and all(isinstance(m, dict) for m in prompt):
            return cls(messages=tuple(prompt))
        raise InvalidPrompt(E_PARAM, "a prompt must be a str, {'prompt': str}, {'prompt_token_ids': [int, ...]} or "
                                     "a conversation (a list of {'role': ..., 'content': ...} messages)")


def _token_ids(ids: Any) -> tuple[int, ...]:
    if getattr(getattr(ids, "dtype", None), "kind", None) in ("i", "u"):  # a numpy or torch integer array
        return tuple(ids.tolist())
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise InvalidPrompt(E_PARAM, f"prompt_token_ids must be a list of integers, got {type(ids).__name__}")
    ids = tuple(ids)
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int)), None)
    if bad is not None:
        raise InvalidPrompt(E_PARAM, f"prompt_token_ids must hold integers, got {bad!r}")
    return ids


class PromptEncoder:
    """A model's tokenizer as batchllm uses it. Plain text is encoded with the tokenizer's special tokens (e.g. a
    bos); a conversation is rendered by the chat template and encoded without them (the template carries any bos).
    Changes nothing."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        # the Rust tokenizer of a fast HF tokenizer: same ids as tokenizer(texts), ~2.5x less overhead per line
        self._backend = getattr(tokenizer, "backend_tokenizer", None)

    @classmethod
    def load(cls, model_dir: str | Path, vocab_size: int | None = None) -> PromptEncoder:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(model_dir)), vocab_size)

    def encode_many(self, prompts: Sequence[PromptInput], max_len: int | None = None
                    ) -> list[list[int] | InvalidPrompt]:
        """Token ids per prompt (texts batched through the fast tokenizer), or the InvalidPrompt saying why not.
        With `max_len`, a prompt too large to fit in that many tokens is refused from its size, untokenized."""
        return self.encode_with_text(prompts, max_len)[1]

    @property
    def max_token_bytes(self) -> int:
        """The most UTF-8 bytes of text one token can stand for: the longest token string of the vocabulary (a
        byte-level token's characters are one byte each; a SentencePiece piece is its text). Cached."""
        if getattr(self, "_max_token_bytes", None) is None:
            vocab = self.tokenizer.get_vocab()
            self._max_token_bytes = max((len(t.encode("utf-8", "replace")) for t in vocab), default=1) or 1
        return self._max_token_bytes

    def too_long(self, prompt: PromptInput, max_len: int) -> InvalidPrompt | None:
        """Why a text or chat prompt cannot fit in `max_len` tokens, judged before tokenizing (None when it might):
        more text than `max_len` tokens of the longest kind could hold, with a margin of 4 for normalizers that
        shrink text (NFKC turns a 3-byte full-width letter into 1 byte). Keeps a huge prompt from costing the
        tokenizer gigabytes only to be refused. (Token ids are checked against the context with max_tokens.)"""
        if prompt.token_ids is not None:
            return None
        if prompt.messages is not None:
            size = sum(len(str(m.get("content") or "")) for m in prompt.messages if isinstance(m, dict))
        else:
            size = len(prompt.text or "")
        limit = 4 * self.max_token_bytes * max_len
        if size <= limit // 4:  # characters <= bytes <= 4 * characters: most prompts end here
            return None
        if prompt.messages is not None:
            size = sum(_utf8_len(str(m.get("content") or "")) for m in prompt.messages if isinstance(m, dict))
        else:
            size = _utf8_len(prompt.text or "")
        if size <= limit:
            return None
        return InvalidPrompt(E_CONTEXT, f"the prompt holds {size} bytes of text, more than {max_len} tokens (the "
                                        f"model's context) can hold: refused without tokenizing it")

    def encode_with_text(self, prompts: Sequence[PromptInput], max_len: int | None = None
                         ) -> tuple[list[str | None], list[list[int] | InvalidPrompt]]:
        """`encode_many`, and the text each prompt's ids were encoded from (a conversation's rendered template;
        None for token ids)."""
        out: list[list[int] | InvalidPrompt | None] = [None] * len(prompts)
        rendered: list[str | None] = [p.text for p in prompts]
        texts: dict[bool, list[tuple[int, str]]] = {True: [], False: []}  # add_special_tokens -> (index, text)
        for i, p in enumerate(prompts):
            refused = self.too_long(p, max_len) if max_len is not None else None
            if refused is not None:
                out[i] = refused
            elif p.token_ids is not None:
                out[i] = list(p.token_ids)
            elif p.messages is not None:
                try:
                    rendered[i] = self.render_chat(p.messages, p.add_generation_prompt)
                    texts[False].append((i, rendered[i]))
                except InvalidPrompt as e:
                    out[i] = e
            else:
                texts[True].append((i, p.text))
        for add_special, items in texts.items():
            if items:
                try:
                    rows = self._encode_batch([t for _, t in items], add_special)
                except Exception:  # one text the tokenizer refuses (e.g. a lone surrogate): each alone
                    rows = [self._encode_one(t, add_special) for _, t in items]
                for (i, _), row in zip(items, rows):
                    out[i] = row
        for i, o in enumerate(out):
            if isinstance(o, list):
                out[i] = self.check_ids(o)
        return rendered, out  # type: ignore[return-value]

    def encode(self, prompt: PromptInput) -> list[int]:
        """Token ids of one prompt; raises InvalidPrompt."""
        ids = self.encode_many([prompt])[0]
        if isinstance(ids, InvalidPrompt):
            raise ids
        return ids

    def check_ids(self, ids: list[int]) -> list[int] | InvalidPrompt:
        if not ids:
            return InvalidPrompt(E_PARAM, "the prompt is empty (0 tokens)")
        bad = [t for t in ids if t < 0 or (self.vocab_size is not None and t >= self.vocab_size)]
        if bad:
            return InvalidPrompt(E_PARAM, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return ids

    def _encode_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        return [list(r) for r in self.tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]

    def _encode_one(self, text: str, add_special_tokens: bool) -> list[int] | InvalidPrompt:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # legal in JSON ("\\ud800", half an emoji), not in Unicode text
            return InvalidPrompt(E_PARAM, f"the prompt holds a lone surrogate ({text[e.start]!a} at character "
                                          f"{e.start} of its text), which is not valid Unicode text")
        try:
            return self._encode_batch([text], add_special_tokens)[0]
        except Exception as e:
            return InvalidPrompt(E_PARAM, f"could not tokenize the prompt: {e}")

    def render_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        """The chat template applied to the messages. Raises InvalidPrompt."""
        if not self.has_chat_template:
            raise InvalidPrompt(E_NO_TEMPLATE, "the model's tokenizer has no chat template; send plain prompts "
                                               "(/v1/completions)")
        if not all(isinstance(m, dict) and "role" in m for m in messages):
            raise InvalidPrompt(E_PARAM, "a conversation must be a list of {'role': ..., 'content': ...} messages")
        try:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=add_generation_prompt)
        except Exception as e:  # template errors (jinja raise_exception) are per-request problems
            raise InvalidPrompt(E_PARAM, f"the chat template rejected the messages ({e})") from None

    def token_text(self, token_id: int) -> str:
        """The text of one token, as OpenAI logprobs show it."""
        return self.tokenizer.decode([token_id])


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def check_fits(num_prompt: int, max_tokens: int, max_model_len: int, kv_blocks: int | None = None,
               block_size: int = 16) -> InvalidPrompt | None:
    """Why a prompt of `num_prompt` tokens with `max_tokens` to generate cannot run in a context of
    `max_model_len` tokens and a KV cache of `kv_blocks` blocks; None when it can."""
    total = num_prompt + max_tokens
    if total > max_model_len:
        return InvalidPrompt(E_CONTEXT, f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) = {total} exceeds "
                                        f"the model's context of {max_model_len} tokens")
    if kv_blocks is not None and -(-total // block_size) > kv_blocks:
        return InvalidPrompt(E_CONTEXT, f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) needs "
                                        f"{-(-total // block_size)} KV blocks; the KV cache holds {kv_blocks}")
    return None

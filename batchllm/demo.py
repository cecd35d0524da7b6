"""`batchllm demo`: the main job on the embedded default model (a tiny random Llama and a locally trained tokenizer,
built on first use): a chat batch whose conversations share a few system prompts, run with global prefix sharing."""

from __future__ import annotations

import random

TOPICS = ["the ocean", "mountains", "a small town", "the stars", "rivers", "old libraries", "trains", "gardens"]
SYSTEMS = [
    "You are a careful assistant. Answer briefly, cite what you know, and say when you are unsure. "
    "Keep every answer under three sentences and never invent facts about people or places.",
    "You are a labelling assistant. Read the text and reply with one label from: positive, negative, neutral. "
    "Explain the label in one short sentence after it. Be consistent across many similar inputs.",
    "Tu es un assistant qui répond en français, de façon concise et polie. Réponds toujours en une phrase. "
    "日本語の質問にも短く答えてください。",
]


def demo_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    convs = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        convs.append([
            {"role": "system", "content": SYSTEMS[i % len(SYSTEMS)]},
            {"role": "user", "content": f"Question {i}: tell me something about {topic}."},
        ])
    rng.shuffle(convs)
    return convs


def main(args) -> int:
    from batchllm import LLM, SamplingParams
    from batchllm.cli import engine_kwargs
    from batchllm.tiny import default_model_dir

    model_dir = default_model_dir()
    print(f"model: {model_dir}")
    kwargs = engine_kwargs(args)
    if kwargs["kv_cache_memory_bytes"] is None:
        kwargs["kv_cache_memory_bytes"] = 256 << 20
    llm = LLM(str(model_dir), **kwargs)
    convs = demo_conversations(args.num_prompts)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.chat(convs[:4], params, use_tqdm=False)  # warm-up
    outputs = llm.chat(convs, params)
    for conv, out in list(zip(convs, outputs))[:3]:
        print(f"\n> {conv[1]['content']}\n< {out.outputs[0].text!r}")
    s = llm.stats()
    total = s["prompt_tokens"] + s["output_tokens"]
    print(f"\n{s['num_requests']} requests, dtype {llm.dtype}, policy {s['policy']}: "
          f"{s['elapsed_s']:.2f} s, {total / s['elapsed_s']:.0f} total tok/s, "
          f"{s['output_tokens'] / s['elapsed_s']:.0f} output tok/s")
    saved = s["prompt_tokens"] - s["computed_prompt_tokens"]
    print(f"prompt tokens {s['prompt_tokens']}, computed {s['computed_prompt_tokens']} "
          f"(prefix sharing saved {saved / max(1, s['prompt_tokens']):.1%}), peak KV blocks {s['peak_kv_blocks']}"
          f"/{s['kv_blocks_total']}, preemptions {s['preemptions']}")
    return 0

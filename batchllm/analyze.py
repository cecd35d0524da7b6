"""`batchllm analyze`: what prefix sharing a prompts file allows, before anything runs (tokenizer only, no model)."""

from __future__ import annotations

import json
import sys

from batchllm.tokenizer import encode, encode_chat, load_tokenizer


def prompt_ids_of(record: dict, tokenizer) -> list[int]:
    """Token ids of one JSONL record: an OpenAI Batch line, {'messages'}, {'prompt'} or {'prompt_token_ids'}."""
    body = record.get("body", record)
    if "prompt_token_ids" in body:
        return [int(t) for t in body["prompt_token_ids"]]
    if "messages" in body:
        return encode_chat(tokenizer, body["messages"])[1]
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return encode(tokenizer, prompt)
    raise ValueError("no prompt, messages or prompt_token_ids")


def main(args) -> int:
    from batchllm.prefix.plan import analyze_batch

    if args.model is None:
        from batchllm.tiny import default_model_dir

        args.model = str(default_model_dir())
    tokenizer = load_tokenizer(args.model)
    prompts, skipped = [], 0
    try:
        with open(args.prompts) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    ids = prompt_ids_of(json.loads(line), tokenizer)
                except (ValueError, TypeError, AttributeError, KeyError):
                    ids = []
                if ids:
                    prompts.append(ids)
                else:
                    skipped += 1
    except OSError as e:
        print(f"batchllm analyze: cannot read {args.prompts}: {e}", file=sys.stderr)
        return 2
    if not prompts:
        print(f"batchllm analyze: no usable prompt in {args.prompts}", file=sys.stderr)
        return 2
    figures = analyze_batch(prompts, args.block_size)
    figures["skipped_lines"] = skipped
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for k, v in figures.items():
            print(f"{k:>28}: {v}")
    return 0

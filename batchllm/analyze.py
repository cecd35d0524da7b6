"""`batchllm analyze`: what prefix sharing a prompts file allows, before anything runs (tokenizer only, no model)."""

from __future__ import annotations

import json
import sys

from batchllm.inputs import InvalidPrompt, PromptEncoder, PromptInput


def prompt_input_of(record) -> PromptInput | None:
    """The prompt of one JSONL record (an OpenAI Batch line, {'messages'}, {'prompt'} or {'prompt_token_ids'}),
    or None when it holds none."""
    body = record.get("body", record) if isinstance(record, dict) else None
    if not isinstance(body, dict):
        return None
    try:
        if "prompt_token_ids" in body:
            return PromptInput.of({"prompt_token_ids": body["prompt_token_ids"]})
        if isinstance(body.get("messages"), list):
            return PromptInput.of(body["messages"])
        if isinstance(body.get("prompt"), str):
            return PromptInput(text=body["prompt"])
    except InvalidPrompt:
        return None
    return None


def main(args) -> int:
    from batchllm.hub import DEFAULT_MODEL, resolve_model
    from batchllm.prefix.plan import analyze_batch

    if args.block_size < 1:
        print(f"batchllm analyze: --block-size must be >= 1, got {args.block_size}", file=sys.stderr)
        return 2
    try:
        encoder = PromptEncoder.load(resolve_model(args.model or DEFAULT_MODEL))
    except Exception as e:
        print(f"batchllm analyze: cannot load the tokenizer of {args.model or DEFAULT_MODEL}: {e}", file=sys.stderr)
        return 2
    inputs, skipped = [], 0
    try:
        with open(args.prompts, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    item = prompt_input_of(json.loads(line))
                except (ValueError, RecursionError):  # not JSON, or nested too deeply to read
                    item = None
                if item is None:
                    skipped += 1
                else:
                    inputs.append(item)
    except OSError as e:
        print(f"batchllm analyze: cannot read {args.prompts}: {e}", file=sys.stderr)
        return 2
    prompts = [ids for ids in encoder.encode_many(inputs) if isinstance(ids, list)]
    skipped += len(inputs) - len(prompts)
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

"""Peer runner: HF transformers `generate` (bf16, greedy, batched with left padding, EOS ignored via min_new_tokens).

Run with the HF peer venv: `.cache/peers/hf/bin/python benchmarks/peers/run_hf.py --model DIR --workload W.json ...`.
Batches are taken in input order (what a user of `generate` does); a batch generates the longest `max_tokens` among
its prompts and each output is cut to its own `max_tokens`. No prefix reuse: every (padded) prompt token is computed.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _extra_args(ap) -> None:
    ap.add_argument("--batch-size", type=int, default=16)


def generate_all(model, prompts: list[list[int]], max_tokens: list[int], batch_size: int, pad_id: int,
                 ignore_eos: bool = True):
    """Greedy outputs (token ids) for every prompt, plus the padded prompt and decode tokens computed. Without
    `ignore_eos` each output ends at its first EOS (included), as the other engines' do."""
    import torch

    outputs: list[list[int]] = []
    padded_prompt = 0
    padded_decode = 0
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start:start + batch_size]
        limits = max_tokens[start:start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(batch), width), dtype=torch.long)  # [B, L]
        for row, p in enumerate(batch):
            ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[row, width - len(p):] = 1
        new = max(limits)
        with torch.inference_mode():
            seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                  min_new_tokens=new if ignore_eos else 0, do_sample=False, pad_token_id=pad_id,
                                  num_beams=1)  # [B, L + new]
        gen = seqs[:, width:].tolist()  # [B, <= new]
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        for g, m in zip(gen, limits):
            g = g[:m]
            if not ignore_eos:
                g = g[: next((i + 1 for i, t in enumerate(g) if t in eos), len(g))]
            outputs.append(g)
        padded_prompt += len(batch) * width
        padded_decode += len(batch) * new
    return outputs, padded_prompt, padded_decode


def main() -> None:
    """Load the model once, warm up, time each workload; writes one result JSON per workload."""
    args = common.parse_args("HF transformers generate runner", _extra_args)
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    workloads = common.load_workloads(args.workload)
    config = {"dtype": args.dtype, "batch_size": args.batch_size, "padding": "left", "threads": args.threads,
              "attn_implementation": getattr(model.config, "_attn_implementation", None),
              "transformers": transformers.__version__, "torch": torch.__version__}
    warm = common.warmup_prompts(workloads[0])
    generate_all(model, warm, [4] * len(warm), args.batch_size, pad_id)
    for w in workloads:
        common.log(f"hf: {w['name']} ({len(w['prompts'])} prompts)")
        with common.Timer() as t:
            outs, padded_prompt, padded_decode = generate_all(model, w["prompts"], w["max_tokens"], args.batch_size,
                                                              pad_id, w.get("ignore_eos", True))
        record = common.make_result("hf", config, w, t.seconds, outs, computed_prompt_tokens=padded_prompt,
                                    extra={"decode_tokens_computed": padded_decode, "kv_cache_memory_bytes": None})
        common.write_result(args.out_dir, args.label, record)
        common.log(f"hf: {w['name']} {t.seconds:.2f}s")


if __name__ == "__main__":
    main()

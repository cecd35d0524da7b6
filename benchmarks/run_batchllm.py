"""Engine runner for batchllm itself (one scheduling policy per invocation), with the project venv.

`/work/main/.venv/bin/python benchmarks/run_batchllm.py --model DIR --workload W.json --policy batchllm ...`
Same protocol as the peers' runners (benchmarks/peers/common.py): build the engine once, one small unrelated warm-up
pass, then each workload's `generate` timed alone; one result JSON per workload.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the repo root, for `import batchllm`

import common  # noqa: E402

POLICIES = ("batchllm", "fcfs-cache", "lpm-cache", "fcfs")


def _extra_args(ap) -> None:
    ap.add_argument("--policy", default="batchllm", choices=POLICIES)
    ap.add_argument("--block-size", type=int, default=16)


def run(llm, prompts: list[list[int]], max_tokens: list[int], ignore_eos: bool = True) -> list[list[int]]:
    """Greedy generation (EOS ignored unless `ignore_eos` is False); returns the output token ids in input order."""
    from batchllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=ignore_eos) for m in max_tokens]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _summary(stats) -> dict:
    """The engine's stats (RunStats) without the step trace (kept short: the peak bin sizes)."""
    out = stats.to_dict()
    trace = out.pop("trace")
    out["num_steps"] = stats.steps
    if trace:
        out["max_bin_tokens"] = max(r["prefill_tokens"] + r["decode_tokens"] for r in trace)
        out["max_bin_seqs"] = max(r["num_seqs"] for r in trace)
    return out


def main() -> None:
    """Build the engine for the invocation's single KV budget, warm up, time each workload."""
    args = common.parse_args("batchllm runner", _extra_args)
    import torch

    torch.set_num_threads(args.threads)
    from batchllm import LLM

    workloads = common.load_workloads(args.workload)
    budgets = {common.kv_bytes_of(w, args.default_kv_bytes) for w in workloads}
    if len(budgets) != 1:
        raise SystemExit(f"run_batchllm.py: one KV budget per invocation, got {sorted(budgets)}")
    kv_bytes = budgets.pop()
    config = {"policy": args.policy, "dtype": args.dtype, "kv_cache_memory_bytes": kv_bytes,
              "max_num_batched_tokens": args.max_num_batched_tokens, "block_size": args.block_size,
              "threads": args.threads, "torch": torch.__version__}
    from batchllm import machine

    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory_bytes=kv_bytes, block_size=args.block_size,
              max_num_batched_tokens=args.max_num_batched_tokens, seed=0, policy=args.policy)
    config["machine"] = machine.describe(llm.device, llm.dtype)
    warm = common.warmup_prompts(workloads[0])
    run(llm, warm, [4] * len(warm))
    for w in workloads:
        common.log(f"batchllm[{args.policy}]: {w['name']} ({len(w['prompts'])} prompts)")
        with common.Timer() as t:
            outs = run(llm, w["prompts"], w["max_tokens"], w.get("ignore_eos", True))
        stats = _summary(llm.stats())
        record = common.make_result(args.label, config, w, t.seconds, outs,
                                    computed_prompt_tokens=stats.get("computed_prompt_tokens"),
                                    extra={"kv_cache_memory_bytes": kv_bytes, "engine_stats": stats})
        common.write_result(args.out_dir, args.label, record)
        common.log(f"batchllm[{args.policy}]: {w['name']} {t.seconds:.2f}s")


if __name__ == "__main__":
    main()

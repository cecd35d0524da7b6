"""Planner-level simulation of prefix-affinity sharding (no model): N requests on W workers.

Builds a synthetic batch with Zipf-sized groups (a few huge groups, many small ones) sharing system prompts and
nested few-shot blocks, plans it globally once, shards the groups over the workers and prints the load balance
(max / mean worker cost) and the prefix saving kept versus one machine.

    .venv/bin/python -m benchmarks.shard_sim                       # 1,000,000 requests on 64 workers
    .venv/bin/python -m benchmarks.shard_sim --requests 100000 --workers 16
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from batchllm.distributed.shard import shard_plan
from batchllm.prefix.plan import plan_batch


def synthetic_batch(n: int, length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """[n, length] int32 prompts and [n] max_tokens. Group sizes follow a Zipf law; within a group the first
    `shared` tokens are common, and half the groups nest a few-shot block shared by a sub-group."""
    rng = np.random.default_rng(seed)
    prompts = rng.integers(4, 32000, size=(n, length), dtype=np.int32)
    sizes = []
    while sum(sizes) < n:
        sizes.append(int(min(rng.zipf(1.6), 50_000)))
    sizes[-1] -= sum(sizes) - n
    start = 0
    for size in sizes:
        rows = slice(start, start + size)
        shared = int(rng.integers(length // 4, 3 * length // 4))
        prompts[rows, :shared] = rng.integers(4, 32000, size=shared, dtype=np.int32)
        if size >= 4 and rng.random() < 0.5:  # a nested few-shot block for the first half of the group
            sub = slice(start, start + size // 2)
            prompts[sub, shared:shared + length // 8] = rng.integers(4, 32000, size=length // 8, dtype=np.int32)
        start += size
    prompts[:, 0] = 1  # bos
    order = rng.permutation(n)  # sharers shuffled apart
    max_tokens = rng.integers(16, 256, size=n)
    return prompts[order], max_tokens[order]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--workers", type=int, default=64)
    ap.add_argument("--length", type=int, default=128, help="prompt length in tokens")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--split-factor", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    t0 = time.perf_counter()
    prompts, max_tokens = synthetic_batch(args.requests, args.length, args.seed)
    t1 = time.perf_counter()
    plan = plan_batch(prompts, args.block_size)
    t2 = time.perf_counter()
    sp = shard_plan(plan, [args.length] * args.requests, max_tokens.tolist(), args.workers, args.split_factor)
    t3 = time.perf_counter()
    figures = {
        "requests": args.requests,
        "workers": args.workers,
        "groups": plan.stats.num_groups,
        "pieces": len(sp.pieces),
        "logical_prompt_tokens": sp.logical_tokens,
        "single_machine_prompt_tokens": sp.single_machine_prompt_tokens,
        "sharded_prompt_tokens": sum(sp.worker_prompt_tokens),
        "single_machine_saving": round(1 - sp.single_machine_prompt_tokens / sp.logical_tokens, 4),
        "saving_kept": round(sp.saving_kept, 4),
        "balance_max_over_mean": round(sp.balance, 4),
        "generate_s": round(t1 - t0, 2),
        "plan_s": round(t2 - t1, 2),
        "shard_s": round(t3 - t2, 2),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""How fast and how lean the global prefix planner is on a large, realistic batch.

Workload (random token ids, fixed seed): `systems` system prompts; under each, a few few-shot blocks (nested shared
prefixes; some prompts use none); then a distinct question per prompt; a share of the prompts repeated 2-4 times
(n > 1 sampling duplicates the prompt); everything shuffled. Prompt lengths average about `--len` tokens.

Prints plan time, peak extra resident memory during planning (VmHWM after resetting it, minus VmRSS before) and
the plan's stats as JSON.

    python -m benchmarks.plan_scale               # 100,000 prompts of ~2,000 tokens, block 16, nested
    python -m benchmarks.plan_scale --quick       # 10,000 prompts of ~1,000 tokens
    python -m benchmarks.plan_scale --mode analyze --input lists --quick
    python -m benchmarks.plan_scale --workload pairs   # every prompt twice: sharing to the last block
"""

from __future__ import annotations

import argparse
import json
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np

from batchllm.prefix.plan import analyze_batch, plan_batch


def make_workload(n: int, mean_len: int, systems: int, seed: int = 0) -> list[np.ndarray]:
    """About `n` int32 prompts shaped like a production batch (see the module docstring); shuffled."""
    rng = np.random.default_rng(seed)
    vocab = 32000
    sys_len, shot_len, q_len = int(mean_len * 0.4), int(mean_len * 0.25), int(mean_len * 0.35)
    sys_prompts = [rng.integers(0, vocab, rng.integers(sys_len // 2, sys_len * 3 // 2), dtype=np.int32)
                   for _ in range(systems)]
    shots = [[rng.integers(0, vocab, rng.integers(shot_len // 2, shot_len * 3 // 2), dtype=np.int32)
              for _ in range(int(rng.integers(2, 8)))] for _ in range(systems)]
    no_shot = np.zeros(0, dtype=np.int32)
    q_lens = rng.integers(max(q_len // 4, 1), q_len * 2, n)
    pool = rng.integers(0, vocab, int(q_lens.sum()), dtype=np.int32)  # distinct question tokens
    q_off = np.r_[0, np.cumsum(q_lens)]
    prompts: list[np.ndarray] = []
    i = 0
    while len(prompts) < n:
        s = int(rng.integers(systems))
        shot = shots[s][int(rng.integers(len(shots[s])))] if rng.random() < 0.8 else no_shot
        p = np.concatenate([sys_prompts[s], shot, pool[q_off[i] : q_off[i + 1]]])
        copies = int(rng.integers(2, 5)) if rng.random() < 0.05 else 1
        prompts.extend([p] * min(copies, n - len(prompts)))
        i += 1
    order = rng.permutation(len(prompts))
    return [prompts[j] for j in order]


def make_stress(kind: str, n: int, mean_len: int, seed: int = 0) -> list[np.ndarray]:
    """Extreme batches: "pairs" (every prompt twice: sharing runs to the last block, the planner's worst case) or
    "distinct" (nothing shared)."""
    rng = np.random.default_rng(seed)
    lens = rng.integers(mean_len // 2, mean_len * 3 // 2, n // 2 if kind == "pairs" else n)
    pool = rng.integers(0, 32000, int(lens.sum()), dtype=np.int32)
    off = np.r_[0, np.cumsum(lens)]
    prompts = [pool[off[i] : off[i + 1]] for i in range(lens.shape[0])]
    if kind == "pairs":
        prompts = prompts + prompts
    return [prompts[j] for j in rng.permutation(len(prompts))]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10,000 prompts of ~1,000 tokens")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--len", type=int, default=2000, dest="mean_len")
    ap.add_argument("--systems", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--mode", default="nested", choices=["nested", "one-level", "none", "analyze"])
    ap.add_argument("--input", default="arrays", choices=["arrays", "lists"],
                    help="prompts as 1-D int32 arrays or as Python lists of ints")
    ap.add_argument("--workload", default="production", choices=["production", "pairs", "distinct"])
    ap.add_argument("--tracemalloc", action="store_true", help="also report the tracemalloc peak (second run)")
    args = ap.parse_args()
    if args.quick:
        args.n, args.mean_len, args.systems = 10_000, 1000, 16

    t = time.perf_counter()
    if args.workload == "production":
        prompts = make_workload(args.n, args.mean_len, args.systems)
    else:
        prompts = make_stress(args.workload, args.n, args.mean_len)
    if args.input == "lists":
        prompts = [p.tolist() for p in prompts]
    lengths = np.array([len(p) for p in prompts])
    print(f"workload: {len(prompts)} prompts, {int(lengths.sum()):,} tokens, length mean {lengths.mean():.0f} "
          f"min {lengths.min()} max {lengths.max()}, input {args.input}, built in {time.perf_counter() - t:.1f} s")

    def run():
        if args.mode == "analyze":
            return analyze_batch(prompts, args.block_size)
        return plan_batch(prompts, args.block_size, args.mode).stats.to_dict()

    rss_before = _status_kib("VmRSS")
    can_reset = _reset_peak_rss()
    t, cpu = time.perf_counter(), time.process_time()
    out = run()
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    peak = _status_kib("VmHWM")
    print(f"plan ({args.mode}, block {args.block_size}): {seconds:.2f} s wall, {cpu:.2f} s CPU "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    if can_reset:
        print(f"peak extra RSS during planning: {(peak - rss_before) / 2**20:.2f} GiB")
    if args.tracemalloc:
        tracemalloc.start()
        run()
        print(f"tracemalloc peak (second run): {tracemalloc.get_traced_memory()[1] / 2**30:.2f} GiB")
        tracemalloc.stop()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

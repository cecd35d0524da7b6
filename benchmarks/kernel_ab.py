"""A/B of the bf16 attention kernel against another git revision's, in one process.

    PYTHONPATH=. .venv/bin/python benchmarks/kernel_ab.py --rev 1004651 [--threads 1] [--reps 15] [--cold]

Builds `batchllm/model/csrc` as it is at REV into a second extension module and times the two builds on the same
inputs, alternating calls (A = this tree, B = REV), so the slow drifts of a shared machine hit both alike: separate
processes minutes apart differ by up to 40% here, alternating calls by 1-3%. With --cold, a 96 MiB buffer is written
before every call, so the cache is read from memory as in a model's forward pass (where the other layers' K/V and the
weights pass through the caches between two calls of one layer). Prints, per case, each build's best
time and the median of the per-pair ratios B/A (above 1: this tree is faster).

Cases: decodes against a shared prefix (16 rows per part), decodes over a request's own keys, a group's 128-token
leaves against its 1536-token prefix, and causal prefills.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = "batchllm/model/csrc"
FILES = ["bindings.cpp", "ragged_attention.cpp", "fused_ops.cpp", "simd.h"]
CASES = [  # (parts, queries per part, keys per part, causal)
    (10, 16, 1536, False),
    (8, 16, 512, False),
    (8, 16, 1024, False),
    (128, 1, 128, False),
    (160, 1, 192, False),
    (128, 1, 544, False),
    (16, 128, 1536, False),
    (1, 1536, 1536, True),
    (4, 512, 512, True),
]


def build_revision(rev: str, workdir: Path):
    """The kernels of `rev` as a module named after it (a distinct name, so both load in one process)."""
    from torch.utils.cpp_extension import load

    src = workdir / "src"
    src.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        text = subprocess.run(["git", "show", f"{rev}:{CSRC}/{name}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        (src / name).write_text(text)
    header_hash = hashlib.sha1((src / "simd.h").read_bytes()).hexdigest()[:12]
    name = "kernels_" + hashlib.sha1(rev.encode()).hexdigest()[:8]
    return load(name=name, sources=[str(src / f) for f in FILES if f.endswith(".cpp")],
                extra_cflags=["-O3", "-fopenmp", "-march=native", "-ffast-math", f"-DBATCHLLM_HEADERS={header_hash}"],
                extra_include_paths=[str(src)], extra_ldflags=["-fopenmp"], build_directory=str(workdir),
                verbose=False)


def inputs(parts: int, nq: int, nk: int, causal: bool, head_dim: int, block_size: int = 16):
    """Random bf16 queries and cache, each part's keys in shuffled cache blocks."""
    heads, kv_heads = (8, 4) if head_dim <= 64 else (8, 2)
    g = torch.Generator().manual_seed(0)
    num_blocks = 20000
    kv = torch.randn(2, num_blocks * block_size, kv_heads, head_dim, generator=g).bfloat16()  # [2, S, KVH, D]
    q = torch.randn(parts * nq, heads, head_dim, generator=g).bfloat16()  # [T, H, D]
    per_part = -(-nk // block_size)
    slots = [(torch.randperm(num_blocks, generator=g)[:per_part, None] * block_size
              + torch.arange(block_size)).reshape(-1)[:nk] for _ in range(parts)]
    q_pos = torch.arange(parts * nq) % nq + nk - nq if causal else torch.full((parts * nq,), nk + 100)
    return (q, kv, torch.arange(parts + 1) * nq, torch.arange(parts * nq), torch.arange(parts + 1) * nk,
            torch.cat(slots), torch.zeros(parts, dtype=torch.int64), q_pos, 0, head_dim ** -0.5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", required=True, help="git revision whose kernels are B")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--cold", action="store_true", help="evict the caches before every call")
    args = ap.parse_args()
    from batchllm.model.cpu_kernels import has_bf16_kernels, load_cpu_kernels

    if not has_bf16_kernels():
        raise SystemExit("the AVX512-BF16 kernels are not built on this machine")
    a = load_cpu_kernels()
    with tempfile.TemporaryDirectory() as tmp:
        b = build_revision(args.rev, Path(tmp))
    torch.set_num_threads(args.threads)
    flush = torch.zeros(96 * 2**20 // 4) if args.cold else None

    def evict() -> None:
        if flush is not None:
            flush.add_(1.0)

    print(f"A = this tree, B = {args.rev}; {args.threads} thread(s), head_dim {args.head_dim}, {args.reps} pairs"
          + (", caches evicted before each call" if args.cold else ""))
    for parts, nq, nk, causal in CASES:
        x = inputs(parts, nq, nk, causal, args.head_dim)
        diff = (a.ragged_attention(*x)[0] - b.ragged_attention(*x)[0]).abs().max().item()
        ta, tb = [], []
        for _ in range(args.reps):
            evict()
            t = time.perf_counter()
            a.ragged_attention(*x)
            ta.append(time.perf_counter() - t)
            evict()
            t = time.perf_counter()
            b.ragged_attention(*x)
            tb.append(time.perf_counter() - t)
        ratio = statistics.median(tb_ / ta_ for ta_, tb_ in zip(ta, tb))
        kind = "causal" if causal else "      "
        print(f"{parts:4d} parts x {nq:4d} queries x {nk:4d} keys {kind}: A {min(ta) * 1e3:7.2f} ms"
              f"  B {min(tb) * 1e3:7.2f} ms  B/A {ratio:.2f}  max |A - B| {diff:.1e}")


if __name__ == "__main__":
    main()

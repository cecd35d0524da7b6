"""A/B of the attention kernels against another git revision's, in one process, on one kernel path.

    PYTHONPATH=. .venv/bin/python benchmarks/kernel_ab.py --rev HEAD [--isa avx2] [--threads 2] [--reps 15] [--cold]
    PYTHONPATH=. .venv/bin/python benchmarks/kernel_ab.py --rev HEAD --gemm    # the projections' gemm instead
    PYTHONPATH=. .venv/bin/python benchmarks/kernel_ab.py --rev HEAD --fp32    # attention over an fp32 cache

Builds `batchllm/model/csrc` as it is at REV into a second extension module, with the flags of the kernel path (the
selected one, or --isa), and times the two builds on the same inputs, alternating calls (A = this tree, B = REV), so
the slow drifts of a shared machine hit both alike: separate processes minutes apart differ by up to 40% here,
alternating calls by 1-3%. With --cold, a 96 MiB buffer is written before every call, so the cache is read from
memory as in a model's forward pass (where the other layers' K/V and the weights pass through the caches between two
calls of one layer). Prints, per case, each build's best time and the median of the per-pair ratios B/A (above 1:
this tree is faster). Heads as SmolLM2-135M's (9 query, 3 KV heads of 64 dims) unless --heads/--kv-heads say.

Cases: decodes against a shared prefix (rows per part = queries x 3), decodes over a request's own keys, a group's
128-token leaves against its 1536-token prefix, and causal prefills.
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
CASES = [  # (parts, queries per part, keys per part, causal)
    (6, 8, 1008, False),
    (1, 64, 304, False),
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


def build_revision(rev: str, isa: str, workdir: Path):
    """The kernels of `rev` for kernel path `isa`, as a module named after it (a distinct name, so both load in one
    process)."""
    from torch.utils.cpp_extension import load

    from batchllm.machine import isa_cflags

    src = workdir / "src"
    src.mkdir(parents=True, exist_ok=True)
    names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{CSRC}"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in names:
        text = subprocess.run(["git", "show", f"{rev}:{CSRC}/{name}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout
        (src / name).write_text(text)
    headers = b"".join((src / n).read_bytes() for n in sorted(names) if n.endswith(".h"))
    fast = [] if isa == "portable" else ["-ffast-math"]
    name = "kernels_" + hashlib.sha1(f"{rev}-{isa}".encode()).hexdigest()[:8]
    return load(name=name, sources=[str(src / n) for n in names if n.endswith(".cpp")],
                extra_cflags=["-O3", "-fopenmp", *isa_cflags(isa), *fast,
                              f"-DBATCHLLM_HEADERS={hashlib.sha1(headers).hexdigest()[:12]}"],
                extra_include_paths=[str(src)], extra_ldflags=["-fopenmp"], build_directory=str(workdir),
                verbose=False)


def inputs(parts: int, nq: int, nk: int, causal: bool, heads: int, kv_heads: int, head_dim: int,
           block_size: int = 16, dtype: torch.dtype = torch.bfloat16):
    """Random queries and cache of `dtype`, each part's keys in shuffled cache blocks."""
    g = torch.Generator().manual_seed(0)
    num_blocks = 20000
    kv = torch.randn(2, num_blocks * block_size, kv_heads, head_dim, generator=g).to(dtype)  # [2, S, KVH, D]
    q = torch.randn(parts * nq, heads, head_dim, generator=g).to(dtype)  # [T, H, D]
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
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--isa", default=None, help="kernel path (default: the selected one, see BATCHLLM_ISA)")
    ap.add_argument("--cold", action="store_true", help="evict the caches before every call")
    ap.add_argument("--gemm", action="store_true", help="time the gemm on SmolLM2's projections instead")
    ap.add_argument("--fp32", action="store_true", help="attention over an fp32 cache (dtype=float32 runs)")
    args = ap.parse_args()
    from batchllm.machine import selected_isa
    from batchllm.model.cpu_kernels import load_cpu_kernels

    isa = args.isa or selected_isa()
    a = load_cpu_kernels(isa)
    if a is None:
        raise SystemExit(f"the {isa} kernels cannot be built here")
    with tempfile.TemporaryDirectory() as tmp:
        b = build_revision(args.rev, isa, Path(tmp))
    torch.set_num_threads(args.threads)
    flush = torch.zeros(96 * 2**20 // 4) if args.cold else None

    def evict() -> None:
        if flush is not None:
            flush.add_(1.0)

    def timed(fa, fb) -> tuple[float, float, float]:
        """(best A, best B, median of the per-pair ratios B/A) over args.reps alternating pairs of calls."""
        ta, tb = [], []
        for _ in range(args.reps):
            for f, times in ((fa, ta), (fb, tb)):
                evict()
                t = time.perf_counter()
                f()
                times.append(time.perf_counter() - t)
        return min(ta), min(tb), statistics.median(tb_ / ta_ for ta_, tb_ in zip(ta, tb))

    print(f"A = this tree, B = {args.rev}; kernel path {isa}, {args.threads} thread(s), {args.reps} pairs"
          + (", caches evicted before each call" if args.cold else ""))
    if args.gemm:
        gemm_cases(a, b, timed)
        return
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    print(f"attention: heads {args.heads}/{args.kv_heads} x {args.head_dim}, {dtype} cache")
    for parts, nq, nk, causal in CASES:
        x = inputs(parts, nq, nk, causal, args.heads, args.kv_heads, args.head_dim, dtype=dtype)
        diff = (a.ragged_attention(*x)[0] - b.ragged_attention(*x)[0]).abs().max().item()
        ta, tb, ratio = timed(lambda x=x: a.ragged_attention(*x), lambda x=x: b.ragged_attention(*x))
        kind = "causal" if causal else "      "
        print(f"{parts:4d} parts x {nq:4d} queries x {nk:4d} keys {kind}: A {ta * 1e3:7.2f} ms"
              f"  B {tb * 1e3:7.2f} ms  B/A {ratio:.2f}  max |A - B| {diff:.1e}")


def gemm_cases(a, b, timed) -> None:
    """SmolLM2-135M's projections (30 layers of random bf16 weights, packed once: both builds share the layout) and
    its lm_head, at several row counts: each build's best time for all layers, B/A, and whether the outputs agree
    bit for bit."""
    from benchmarks.kernel_efficiency import HIDDEN, LAYERS, SHAPES

    gen = torch.Generator().manual_seed(0)
    shapes = {**SHAPES, "lm_head": (49152, HIDDEN)}
    packed = {name: [a.gemm_pack_weight((torch.randn(o, i, generator=gen) * 0.02).bfloat16(), name == "gate_up")
                     for _ in range(1 if name == "lm_head" else LAYERS)] for name, (o, i) in shapes.items()}
    print("gemm: B/A per projection (30 layers; lm_head once)")
    for rows in (1, 4, 8, 24, 48, 64, 128):
        cells = []
        for name, (o, i) in shapes.items():
            x = torch.randn(rows, i, generator=gen).bfloat16()
            gated = name == "gate_up"

            def run(m, x=x, name=name, o=o, gated=gated):
                return [m.gemm(x, w, o, None, gated) for w in packed[name]]

            same = all(torch.equal(ya, yb) for ya, yb in zip(run(a), run(b)))
            _, _, ratio = timed(lambda: run(a), lambda: run(b))
            cells.append(f"{name} {ratio:.2f}{'' if same else ' (outputs differ)'}")
        print(f"{rows:4d} rows: " + ", ".join(cells))

if __name__ == "__main__":
    main()

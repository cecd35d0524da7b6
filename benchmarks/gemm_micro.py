"""Micro-benchmark: the bf16 projections on CPU, the project's gemm (`batchllm/model/csrc/gemm.cpp`) against oneDNN's
packed weights (`torch.ops.mkldnn._linear_pointwise`, what `Linear` used before).

The weights of 8 layers (qkv, o, gate_up, down of the benchmark model's shape) and one lm_head are packed both ways;
for each row count the two kinds are called alternately, a whole pass over all layers at a time, so both see cold
weights as in a decode step and the same host noise. Prints the median time per call and the ratio. Run:

    PYTHONPATH=. .venv/bin/python benchmarks/gemm_micro.py [--rows 1 8 16 32 64 128 256 2048] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

import batchllm.model.layers as layers
from batchllm.model.layers import Linear

# name -> (out features, in features): the 56 M benchmark Llama (hidden 512, intermediate 1408, 8/4 heads, vocab 32000)
SHAPES = {"qkv": (1024, 512), "o": (512, 512), "gate_up": (2816, 512), "down": (512, 1408), "lm_head": (32000, 512)}


def packed_pair(out_f: int, in_f: int, gen: torch.Generator) -> tuple[Linear, Linear]:
    """The same random weight packed for oneDNN and for the project's gemm."""
    weight = (torch.randn(out_f, in_f, generator=gen) * 0.02).to(torch.bfloat16)
    pair = []
    for ours in (False, True):
        lin = Linear(out_f, in_f, False, torch.bfloat16, torch.device("cpu"))
        lin.weight.data.copy_(weight)
        saved = layers.gemm_kernels
        if not ours:
            layers.gemm_kernels = lambda w: None
        try:
            lin.pack()
        finally:
            layers.gemm_kernels = saved
        if (lin.gemm is not None) != ours or lin.packed is None:
            raise SystemExit("packing unavailable here (needs bf16 oneDNN and the AVX512-BF16 kernels)")
        pair.append(lin)
    return pair[0], pair[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 48, 64, 96, 128, 192, 256, 512, 2048])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    per_layer = [{n: packed_pair(*SHAPES[n], gen) for n in ("qkv", "o", "gate_up", "down")} for _ in range(8)]
    head = packed_pair(*SHAPES["lm_head"], gen)
    print(f"median us per call, oneDNN / ours (ratio), {args.threads} threads")
    for rows in args.rows:
        xs = {n: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for n, (_, k) in SHAPES.items()}
        times: dict[tuple[str, int], list[float]] = {(n, v): [] for n in SHAPES for v in (0, 1)}
        reps = args.reps if rows <= 256 else max(3, args.reps // 3)
        for rep in range(reps + 2):
            for v in ((0, 1) if rep % 2 else (1, 0)):  # alternate which kind goes first
                spent = dict.fromkeys(SHAPES, 0.0)
                for layer in per_layer:
                    for n, pair in layer.items():
                        t = time.perf_counter()
                        pair[v](xs[n])
                        spent[n] += time.perf_counter() - t
                t = time.perf_counter()
                head[v](xs["lm_head"])
                spent["lm_head"] += time.perf_counter() - t
                if rep >= 2:  # the first two passes warm up (oneDNN builds its kernel for this row count)
                    for n in SHAPES:
                        times[(n, v)].append(spent[n] / (1 if n == "lm_head" else len(per_layer)))
        cells = []
        for n in SHAPES:
            a, b = (sorted(times[(n, v)])[len(times[(n, v)]) // 2] * 1e6 for v in (0, 1))
            cells.append(f"{n} {a:6.0f} / {b:6.0f} ({a / b:4.2f}x)")
        print(f"rows {rows:5d}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()

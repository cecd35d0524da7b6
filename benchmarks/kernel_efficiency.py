"""How close the kernels of one kernel path come to this machine's limits, on SmolLM2-135M's shapes:

- gemm: the bf16-weight projections of 30 layers (qkv 576->960, o 576->576, gate_up 576->3072 gated, down
  1536->576) at 64, 128 and 256 rows, in % of the measured peak of the path's arithmetic: 12 independent chains of
  the tile's own instruction on every thread (`peak_flops` in gemm.cpp: vdpbf16ps on avx512bf16, fp32 FMA of the
  path's vector width on avx512 and avx2). torch's 4096^2 matmul is printed beside it (on AMD, MKL's fp32 runs AVX2
  code, so it is no peak for AVX-512);
- decode attention: one decode step of 64 requests over 1024-token contexts each (9 query / 3 KV heads, head_dim 64,
  bf16 KV, no sharing: every request reads its own KV once), caches evicted before each call (as the other layers
  do in a forward pass), in % of the measured memory bandwidth: the best of summing a 1 GiB fp32 tensor (one read),
  measured before and after, the higher taken.

    BATCHLLM_ISA=avx2 .venv/bin/python -m benchmarks.kernel_efficiency [--threads 2]

Set BATCHLLM_ISA to measure a lower path than the CPU's own; the output names the CPU and the path.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from batchllm.machine import cpu_name, selected_isa
from batchllm.model.attention import AttentionMetadata, AttnPart, paged_attention
from batchllm.model.cpu_kernels import has_bf16_kernels, load_cpu_kernels
from batchllm.model.layers import Linear
from benchmarks.attention_micro import bench

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, LAYERS = 576, 9, 3, 64, 1536, 30
SHAPES = {"qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN),
          "down": (HIDDEN, INTER)}


def best(fn, reps: int) -> float:
    """The best wall time of `fn` in seconds over `reps` calls, after one warm-up."""
    return bench(fn, reps)[1] / 1e3


def matmul_peak(dtype: torch.dtype, n: int = 4096) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / best(lambda: a @ b, 5)


def memory_bandwidth(gib: float = 1.0) -> float:
    x = torch.ones(int(gib * 2**30) // 4)
    return x.numel() * 4 / best(lambda: x.sum(), 5)


def packed_layers(gen: torch.Generator) -> list[dict[str, Linear]]:
    """30 layers' projections with random bf16 weights, packed for the selected path's gemm."""
    layers = []
    for _ in range(LAYERS):
        layer = {}
        for name, (out_f, in_f) in SHAPES.items():
            lin = Linear(out_f, in_f, False, torch.bfloat16, torch.device("cpu"))
            lin.weight.data.copy_((torch.randn(out_f, in_f, generator=gen) * 0.02).to(torch.bfloat16))
            lin.pack(gated=name == "gate_up")
            layer[name] = lin
        layers.append(layer)
    return layers


def gemm_rate(layers: list[dict[str, Linear]], rows: int, gen: torch.Generator) -> float:
    """FLOP/s of the layers' projections at `rows` rows (one pass over all, cold weights as in a decode step)."""
    xs = {n: torch.randn(rows, k, generator=gen).to(torch.bfloat16) for n, (_, k) in SHAPES.items()}

    def one_pass():
        for layer in layers:
            for name, lin in layer.items():
                if lin.gated:
                    lin.gemm(xs[name], lin.packed, lin.out_features, None, True)
                else:
                    lin(xs[name])

    flops = 2 * rows * LAYERS * sum(o * i for o, i in SHAPES.values())
    return flops / best(one_pass, 5)


def attention_rate(requests: int = 64, context: int = 1024, block: int = 16) -> tuple[float, float]:
    """(bytes of KV read per second, seconds) of one decode step's attention over one layer."""
    blocks_each = context // block
    cache = torch.randn(2, requests * blocks_each, block, KV_HEADS, HEAD_DIM).to(torch.bfloat16)
    parts = [AttnPart(np.array([r], dtype=np.int64), list(range(r * blocks_each, (r + 1) * blocks_each)), 0, context)
             for r in range(requests)]
    positions = np.full(requests, context - 1, dtype=np.int64)
    slots = np.array([(r + 1) * blocks_each * block - 1 for r in range(requests)], dtype=np.int64)
    meta = AttentionMetadata.build(parts, positions, slots, block, torch.device("cpu"), dtype=torch.bfloat16)
    q = torch.randn(requests, HEADS, HEAD_DIM).to(torch.bfloat16)
    k = torch.randn(requests, KV_HEADS, HEAD_DIM).to(torch.bfloat16)
    v = torch.randn(requests, KV_HEADS, HEAD_DIM).to(torch.bfloat16)
    # the cache (48 MiB) would sit partly in a large L3 between back-to-back calls; in a forward pass the other
    # layers' K/V and weights evict it, so each timed call follows a 96 MiB write and reads its K/V from memory
    flush = torch.zeros(96 * 2**20 // 4)
    times = []
    for _ in range(21):
        flush.add_(1.0)
        t0 = time.perf_counter()
        paged_attention(q, k, v, cache, meta, HEAD_DIM**-0.5)
        times.append(time.perf_counter() - t0)
    seconds = min(times[1:])  # after one warm-up call
    return requests * context * KV_HEADS * HEAD_DIM * 2 * 2 / seconds, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    isa = selected_isa()
    if not has_bf16_kernels():
        raise SystemExit(f"the {isa} path has no bf16 kernels: nothing of ours to measure")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        arithmetic = "bf16 dot products" if isa == "avx512bf16" else "fp32 FMA"
        peak = max(load_cpu_kernels(isa).peak_flops() for _ in range(3))
        matmul = matmul_peak(torch.bfloat16 if isa == "avx512bf16" else torch.float32)
        bandwidth = memory_bandwidth()
        print(f"{cpu_name()}, kernel path {isa}, {args.threads} threads: peak of {arithmetic} {peak / 1e9:.0f} GFLOP/s "
              f"(torch 4096^2 matmul {matmul / 1e9:.0f}), memory bandwidth {bandwidth / 1e9:.1f} GB/s")
        layers = packed_layers(gen)
        for rows in args.rows:
            rate = gemm_rate(layers, rows, gen)
            print(f"  gemm, {rows:4d} rows: {rate / 1e9:6.0f} GFLOP/s = {100 * rate / peak:5.1f}% of the peak")
        read, seconds = attention_rate()
        bandwidth = max(bandwidth, memory_bandwidth())
        print(f"  decode attention, 64 x 1024 tokens: {seconds * 1e3:.2f} ms/layer, {read / 1e9:.1f} GB/s of KV = "
              f"{100 * read / bandwidth:.1f}% of the bandwidth ({bandwidth / 1e9:.1f} GB/s, the higher of two "
              "measurements)")


if __name__ == "__main__":
    main()

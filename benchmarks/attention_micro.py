"""Micro-benchmark: one decode step's attention for a shared-prefix group workload on CPU.

Compares (a) prefix-shared parts (one part per group prefix + one per request's own segment), (b) one part per
request over its whole KV (the baseline policies' layout), both through ``paged_attention``, and (c) a naive
per-request Python loop (gather the request's KV, SDPA). Run:

    PYTHONPATH=. .venv/bin/python benchmarks/attention_micro.py [--groups 16 --per-group 16 --prefix 1536 --dtype bf16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from batchllm.model.attention import AttentionMetadata, AttnPart, paged_attention


def make_workload(args: argparse.Namespace, rng: np.random.Generator) -> dict:
    """Block layout of the step: per group a prefix segment, per request an own segment ending in its new token."""
    bs = args.block_size
    n_req = args.groups * args.per_group
    own_lens = rng.integers(args.own_min, args.own_max + 1, size=n_req)
    prefix_blocks = args.prefix // bs
    total_blocks = args.groups * prefix_blocks + int(sum(-(-n // bs) for n in own_lens))
    free = iter(rng.permutation(total_blocks).tolist())
    prefixes = [[next(free) for _ in range(prefix_blocks)] for _ in range(args.groups)]
    owns = [[next(free) for _ in range(-(-int(n) // bs))] for n in own_lens]
    positions = np.array([args.prefix + n - 1 for n in own_lens], dtype=np.int64)  # [T]: one decode token each
    slots = np.array([owns[r][(n - 1) // bs] * bs + (n - 1) % bs for r, n in enumerate(own_lens)], dtype=np.int64)

    shared, baseline = [], []
    for g in range(args.groups):
        rows = np.arange(g * args.per_group, (g + 1) * args.per_group, dtype=np.int64)
        shared.append(AttnPart(rows, prefixes[g], 0, args.prefix))
    for r, n in enumerate(own_lens):
        g = r // args.per_group
        row = np.array([r], dtype=np.int64)
        shared.append(AttnPart(row, owns[r], args.prefix, int(n)))
        baseline.append(AttnPart(row, prefixes[g] + owns[r], 0, args.prefix + int(n)))
    return dict(
        total_blocks=total_blocks, positions=positions, slots=slots, shared=shared, baseline=baseline, n_req=n_req
    )


def naive_loop(q, k, v, kv_cache, parts, slots, scale):
    """One SDPA per request over its gathered KV (what a per-request backend does); writes K/V first."""
    n_kv, d = kv_cache.shape[-2], kv_cache.shape[-1]
    flat = kv_cache.view(2, -1, n_kv, d)  # [2, S, KVH, D]
    flat[0, slots] = k
    flat[1, slots] = v
    bs = kv_cache.shape[2]
    out = torch.empty_like(q)
    for p in parts:
        j = torch.arange(p.kv_len)
        idx = torch.tensor(p.block_ids)[j // bs] * bs + j % bs  # [L]
        kk = flat[0].index_select(0, idx).transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
        vv = flat[1].index_select(0, idx).transpose(0, 1).unsqueeze(0)  # [1, KVH, L, D]
        rows = torch.from_numpy(p.q_rows)
        qq = q.index_select(0, rows).transpose(0, 1).unsqueeze(0)  # [1, H, Q, D] (Q = 1: sees every key)
        o = F.scaled_dot_product_attention(qq, kk, vv, scale=scale, enable_gqa=True)  # [1, H, Q, D]
        out[rows] = o[0].transpose(0, 1)
    return out


def bench(fn, repeat: int) -> tuple[float, float]:
    """(median, min) wall time of ``fn`` in milliseconds after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, float(np.min(times)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=16)
    ap.add_argument("--per-group", type=int, default=16)
    ap.add_argument("--prefix", type=int, default=1536)
    ap.add_argument("--own-min", type=int, default=128)
    ap.add_argument("--own-max", type=int, default=192)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--no-naive", action="store_true", help="skip the slow per-request loop")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    w = make_workload(args, np.random.default_rng(0))
    cpu = torch.device("cpu")
    t, h, kvh, d = w["n_req"], args.heads, args.kv_heads, args.head_dim
    q = torch.randn(t, h, d, dtype=dtype)
    k = torch.randn(t, kvh, d, dtype=dtype)
    v = torch.randn(t, kvh, d, dtype=dtype)
    cache = torch.randn(2, w["total_blocks"], args.block_size, kvh, d, dtype=dtype)
    scale = d**-0.5

    print(
        f"decode step: {args.groups} groups x {args.per_group} requests, prefix {args.prefix}, own "
        f"{args.own_min}-{args.own_max}, heads {h}/{kvh}, head_dim {d}, block {args.block_size}, {args.dtype}, "
        f"{torch.get_num_threads()} threads"
    )
    results = {}
    with torch.inference_mode():
        for name in ("shared", "baseline"):
            parts = w[name]
            def build(parts=parts):
                return AttentionMetadata.build(parts, w["positions"], w["slots"], args.block_size, cpu, dtype=dtype)

            build_ms = bench(build, args.repeat)
            meta = build()
            results[name] = bench(lambda meta=meta: paged_attention(q, k, v, cache, meta, scale), args.repeat)
            shapes = ", ".join(f"{b.batch}x{b.q_len}x{b.kv_len}" for b in meta.buckets) or "none (all in the kernel)"
            print(
                f"  {name:9s} {results[name][0]:8.2f} ms/layer (min {results[name][1]:.2f})   "
                f"build {build_ms[0]:6.2f} ms/step   buckets {shapes}"
            )
        outs = {}
        for name in ("shared", "baseline"):
            meta = AttentionMetadata.build(w[name], w["positions"], w["slots"], args.block_size, cpu, dtype=dtype)
            outs[name] = paged_attention(q, k, v, cache, meta, scale).float()
        slots_t = torch.from_numpy(w["slots"])
        if not args.no_naive:
            results["naive"] = bench(
                lambda: naive_loop(q, k, v, cache, w["baseline"], slots_t, scale), max(2, args.repeat // 3)
            )
            out_n = naive_loop(q, k, v, cache, w["baseline"], slots_t, scale)
            print(
                f"  {'naive':9s} {results['naive'][0]:8.2f} ms/layer (min {results['naive'][1]:.2f})   per-request loop"
            )
            print(f"  max |shared - naive| = {(outs['shared'] - out_n.float()).abs().max().item():.3g}")
        print(f"  max |shared - baseline| = {(outs['shared'] - outs['baseline']).abs().max().item():.3g}")
    for other in ("baseline", "naive"):
        if other in results:
            med, low = (results[other][i] / results["shared"][i] for i in (0, 1))
            print(f"speedup shared vs {other}: {med:.2f}x (median), {low:.2f}x (min)")


if __name__ == "__main__":
    main()

"""How a step's attention parts are laid out: bucket splitting and padding, ragged slots, masks, the causal mode,
and which parts go to which kernel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attention_cases import CPU, Step, group_step, reference, run_case  # noqa: F401

from batchllm.model import attention as attn_mod
from batchllm.model import attention_meta as meta_mod
from batchllm.model.attention import AttentionMetadata, AttnPart, paged_attention
from batchllm.model.cpu_kernels import load_cpu_kernels, load_ragged_attention

# every test runs through the fused-kernel buckets and again through the ragged kernel (conftest.attention_path)
pytestmark = pytest.mark.usefixtures("attention_path")


@pytest.mark.fused_only
def test_split_buckets_give_same_result():
    step = group_step(7, 53)
    out, ref, meta = run_case(step, 8, 2)
    small, _, meta_small = run_case(step, 8, 2, max_keys_per_call=64)
    assert len(meta_small.buckets) > len(meta.buckets)
    torch.testing.assert_close(small, out, atol=1e-6, rtol=1e-6)


@pytest.mark.fused_only
def test_buckets_keep_long_part_apart_from_decodes():
    bs = 16
    positions = np.concatenate([np.arange(512), np.full(200, 100)])
    slots = np.arange(712)
    parts = [AttnPart(np.arange(512), list(range(32)), 0, 512)]
    parts += [AttnPart(np.array([512 + i]), list(range(7)), 0, 101) for i in range(200)]
    meta = AttentionMetadata.build(parts, positions, slots, bs, CPU)
    long = [b for b in meta.buckets if b.q_len > 1]
    assert [(b.batch, b.q_len, b.kv_len) for b in long] == [(1, 512, 512)]
    small = [b for b in meta.buckets if b.q_len == 1]
    assert sum(b.batch for b in small) == 200 and all(b.kv_len == 101 for b in small)
    padded = sum(b.batch * b.q_len * b.kv_len for b in meta.buckets)
    assert padded == 512 * 512 + 200 * 101  # no padding at all here
    assert all(b.visible is None for b in small)  # every decode sees all its keys: no mask at all


@pytest.mark.fused_only
def test_query_padding_alone_needs_no_mask():
    """Prefix parts of different query counts over equal prefixes are padded in queries only: no mask."""
    step = Step(10)
    for g, n in enumerate([3, 4, 3]):
        step.node(f"g{g}", 32)
        for r in range(n):
            step.seq(3 + r, 1, f"g{g}")
    out, ref, meta = run_case(step, 8, 2)
    prefix = [b for b in meta.buckets if b.kv_len == 32]
    assert [(b.batch, b.q_len, b.visible) for b in prefix] == [(3, 4, None)]
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.fused_only
def test_bucket_padding_bounded():
    """Parts of mixed shapes: padded work stays within 4x of the real work (2x per dimension at most)."""
    rng = np.random.default_rng(9)
    parts, t = [], 0
    for _ in range(60):
        nq, nk = int(rng.integers(1, 40)), int(rng.integers(40, 300))
        parts.append(AttnPart(np.arange(t, t + nq), list(range(-(-nk // 16))), 0, nk))
        t += nq
    meta = AttentionMetadata.build(parts, np.full(t, 1000), np.arange(t), 16, CPU)
    real = sum(len(p.q_rows) * p.kv_len for p in parts)
    padded = sum(b.batch * b.q_len * b.kv_len for b in meta.buckets)
    assert real <= padded <= 4 * real
    assert sorted(meta.merge_rows.tolist()) == list(range(t))


def test_build_rejects_row_without_visible_key():
    parts = [AttnPart(np.array([0, 1]), [0], 4, 2)]  # keys at positions 4, 5; row 0 sits at position 3
    with pytest.raises(ValueError, match="see no key"):
        AttentionMetadata.build(parts, np.array([3, 5]), np.array([0, 1]), 16, CPU)


def test_ragged_parts_slots_exact():
    """The ragged kernel's key slots, built for all parts at once: each part's keys in block order, cut at kv_len."""
    parts = [AttnPart(np.array([0]), [7, 2, 9], 20, 9),  # 2 blocks of 4 + 1 key of the third
             AttnPart(np.array([1]), [5], 0, 4),  # exactly one block
             AttnPart(np.array([2, 3]), [3, 8, 6], 4, 6),  # the third block is not read
             AttnPart(np.array([4]), [1, 0], 8, 1)]
    ragged = meta_mod.RaggedParts.build(parts, np.array([40, 40, 40, 40, 40]), 4, CPU)
    assert ragged.kv_slots.tolist() == [28, 29, 30, 31, 8, 9, 10, 11, 36,
                                        20, 21, 22, 23,
                                        12, 13, 14, 15, 32, 33,
                                        4]
    assert ragged.kv_ptr.tolist() == [0, 9, 13, 19, 20]
    assert ragged.q_rows.tolist() == [0, 1, 2, 3, 4] and ragged.kv_start.tolist() == [20, 0, 4, 8]
    with pytest.raises(ValueError, match="has 1 blocks"):
        meta_mod.RaggedParts.build([AttnPart(np.array([0]), [5], 0, 5)], np.array([9]), 4, CPU)


def test_empty_step():
    meta = AttentionMetadata.build([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 16, CPU)
    cache = torch.zeros(2, 4, 16, 2, 8)
    out = paged_attention(torch.zeros(0, 4, 8), torch.zeros(0, 2, 8), torch.zeros(0, 2, 8), cache, meta, 1.0)
    assert out.shape == (0, 4, 8)


@pytest.mark.parametrize("math_path", [False, True])
def test_whole_causal_segments_use_the_kernels_causal_mode(attention_path, monkeypatch, math_path):
    """First chunks of prompts with no prefix (queries = keys, different lengths, so padded): the fused path runs
    them in the kernel's causal mode with KV heads repeated, and matches plain attention."""
    step = Step(11)
    for n in (20, 25, 31):
        step.seq(n, n)
    if math_path:
        monkeypatch.setattr(attn_mod, "_attend", attn_mod._attend_math)
    out, ref, meta = run_case(step, 8, 2)
    if attention_path == "fused":
        assert [b.causal_square for b in meta.buckets] == [True]
        assert meta.buckets[0].visible is None
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_bf16_without_the_avx512_kernels_uses_torch_for_large_parts(monkeypatch):
    """Where the CPU kernels lack vector paths (`has_bf16_kernels` false), bf16's large parts go to torch's fused
    kernel, and the merge to torch; with them, every part goes to our kernel."""
    step = group_step(15, 53)
    step.seq(30, 30)
    parts, positions, slots, _ = step.pack()
    if load_ragged_attention() is None:
        pytest.skip("the CPU kernels could not be built here")
    monkeypatch.setattr(meta_mod, "RAGGED_MAX_QUERIES", 8)  # the default routing, whichever path the fixture set
    monkeypatch.setattr(meta_mod, "has_bf16_kernels", lambda: False)
    meta = AttentionMetadata.build(parts, positions, slots, step.block_size, CPU, dtype=torch.bfloat16)
    assert sum(b.batch * b.q_len for b in meta.buckets) >= 30  # the 30-query prefill and the prefixes' queries
    out, ref, _ = run_case(step, 8, 2, dtype=torch.bfloat16)
    assert (out.double() - ref).abs().max().item() < 1e-2
    monkeypatch.setattr(meta_mod, "has_bf16_kernels", lambda: True)
    if load_cpu_kernels().bf16_kernels():
        meta = AttentionMetadata.build(parts, positions, slots, step.block_size, CPU, dtype=torch.bfloat16)
        assert meta.buckets == []  # every part in our kernel


def test_fp32_sends_every_part_to_the_kernel_where_it_has_vector_paths(monkeypatch):
    """fp32 (the exact dtype) routes as bf16 does: every part to the ragged kernel where the CPU kernels have vector
    paths (AVX2 and up), which hold fp32 to 1e-5 of exact attention; large parts to torch's fused kernel where only
    the portable loop is built."""
    step = group_step(15, 53)
    step.seq(30, 30)
    parts, positions, slots, _ = step.pack()
    if load_ragged_attention() is None:
        pytest.skip("the CPU kernels could not be built here")
    monkeypatch.setattr(meta_mod, "RAGGED_MAX_QUERIES", 8)  # the default routing, whichever path the fixture set
    monkeypatch.setattr(meta_mod, "has_bf16_kernels", lambda: False)
    meta = AttentionMetadata.build(parts, positions, slots, step.block_size, CPU, dtype=torch.float32)
    assert sum(b.batch * b.q_len for b in meta.buckets) >= 30  # the 30-query prefill and the prefixes' queries
    monkeypatch.setattr(meta_mod, "has_bf16_kernels", lambda: True)
    meta = AttentionMetadata.build(parts, positions, slots, step.block_size, CPU, dtype=torch.float32)
    assert meta.buckets == []
    out, ref, _ = run_case(step, 8, 2, dtype=torch.float32)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)

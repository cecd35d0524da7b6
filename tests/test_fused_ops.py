"""The fused CPU ops against the torch ops they replace: in bf16 the same roundings up to one bf16 step, in fp32
within a few fp32 ulps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from kernel_paths import isa_params

from batchllm.model.attention import AttentionMetadata, AttnPart, _merge
from batchllm.model.cpu_kernels import load_cpu_kernels
from batchllm.model.layers import RotaryTable, apply_rotary, rms_norm
from batchllm.model_config import RopeConfig

BF16 = torch.bfloat16


@pytest.fixture(params=isa_params(need_bf16=True))
def kernels(request):
    """The compiled module of each kernel path with bf16 kernels that this CPU runs."""
    return load_cpu_kernels(request.param)


def randn(*shape, seed=0, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(BF16)


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between two bf16 tensors in units of the bf16 spacing at b's magnitude."""
    a, b = a.float(), b.float()
    spacing = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - 7)
    return (a - b).abs() / spacing


def ulps32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance between two fp32 tensors in units of the fp32 spacing at b's magnitude."""
    a, b = a.double(), b.double()
    spacing = torch.exp2(torch.floor(torch.log2(b.abs().clamp_min(1e-30))) - 23)
    return (a - b).abs() / spacing


def randn32(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_rms_norm_matches_torch_order_of_roundings(kernels):
    x, w = randn(37, 512, seed=1, scale=3.0), randn(512, seed=2)
    out = kernels.rms_norm(x, w, 1e-6)
    assert ulps(out, rms_norm(x, w, 1e-6)).max().item() <= 1
    assert (out == rms_norm(x, w, 1e-6)).float().mean().item() > 0.99


def test_add_rms_norm_updates_x_in_place(kernels):
    x, delta, w = randn(9, 256, seed=3), randn(9, 256, seed=4), randn(256, seed=5)
    expect_x = x + delta
    expect_h = rms_norm(expect_x, w, 1e-5)
    xx = x.clone()
    h = kernels.add_rms_norm(xx, delta, w, 1e-5)
    assert torch.equal(xx, expect_x)  # one fp32 add, rounded once: exactly torch's bf16 add
    assert ulps(h, expect_h).max().item() <= 1


def test_silu_mul(kernels):
    gu = randn(11, 2 * 352, seed=6, scale=4.0)
    gate, up = gu.chunk(2, dim=-1)
    expect = F.silu(gate) * up
    out = kernels.silu_mul(gu)
    assert out.shape == (11, 352)
    # silu's exp differs from torch's in the last fp32 bits: its bf16 rounding may go the other way (1 ulp of
    # silu), which the product with `up` can turn into 2 ulps
    assert ulps(out, expect).max().item() <= 2
    assert (out == expect).float().mean().item() > 0.98


def test_silu_mul_of_large_negative_gates_is_zero_not_nan(kernels):
    """exp(-gate) overflows below gate = -88.7; torch's gate / (1 + inf) gives -0. The kernel gives 0 there (it used
    to give NaN under -ffast-math), and torch's value everywhere else but [-88.7, -88), where torch's ~1e-37 is 0."""
    gate = torch.tensor([-1e4, -1000, -100, -89, -88, -87, -20, -1, 0, 1, 20, 88, 89, 100, 1000], dtype=BF16)
    up = torch.linspace(-3, 3, gate.shape[0]).to(BF16)
    out = kernels.silu_mul(torch.cat([gate, up])[None])[0]
    assert torch.isfinite(out.float()).all()
    assert torch.equal(out[:4], torch.zeros(4, dtype=BF16))
    assert torch.equal(out[4:], (F.silu(gate) * up)[4:])


def rope_case(kernels, dtype, heads, kv_heads, d):
    """Runs rope_write_kv on strided q, k, v views (as in the model) of `dtype`; checks that exactly the rows with a
    slot were written, as the rotated k and the untouched v. Returns the rotated q, k and torch's rotation of the
    inputs in fp32 math."""
    t, blocks, bs = 13, 6, 4
    table = RotaryTable(RopeConfig(theta=10000.0), d, 64, dtype, torch.device("cpu"))
    qkv = randn32(t, (heads + 2 * kv_heads) * d, seed=7).to(dtype)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q, k, v = q.view(t, heads, d), k.view(t, kv_heads, d), v.view(t, kv_heads, d)
    positions = torch.tensor([0, 1, 2, 3, 63, 5, 6, 7, 8, 9, 10, 11, 40])
    slots = torch.tensor([3, 0, -1, 7, 23, 1, 2, 4, 5, 6, 8, 9, 10])
    cos, sin = table.lookup(positions)
    eq, ek = apply_rotary(q.float(), k.float(), cos.float(), sin.float())  # fp32 math
    ev = v.clone()
    cache = torch.zeros(2, blocks, bs, kv_heads, d, dtype=dtype)
    kernels.rope_write_kv(q, k, v, table.cos, table.sin, positions, cache.view(2, -1, kv_heads, d), slots)
    flat = cache.view(2, -1, kv_heads, d)
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(flat[0, slot], k[row]) and torch.equal(flat[1, slot], ev[row])
    written = torch.zeros(blocks * bs, dtype=torch.bool)
    written[slots[slots >= 0]] = True
    assert not flat[:, ~written].any()  # nothing else touched
    return q, k, eq, ek


@pytest.mark.parametrize("heads,kv_heads,d", [(8, 4, 64), (4, 1, 32)])
def test_rope_write_kv(heads, kv_heads, d, kernels):
    q, k, eq, ek = rope_case(kernels, BF16, heads, kv_heads, d)
    assert ulps(q, eq.to(BF16)).max().item() <= 1 and ulps(k, ek.to(BF16)).max().item() <= 1  # one rounding


def merge_case(kernels, fp32):
    """Four parts over six rows (rows in one to three parts): the partial results, their metadata and the merge
    kernel's output."""
    rng = np.random.default_rng(0)
    t, h, d = 6, 4, 32
    parts = [AttnPart(np.array([0, 1, 2]), [0], 0, 4), AttnPart(np.array([0]), [1], 4, 2),
             AttnPart(np.array([1, 3, 4, 5]), [2], 4, 3), AttnPart(np.array([2, 5]), [3], 8, 1)]
    meta = AttentionMetadata.build(parts, np.full(t, 20), np.arange(t), 16, torch.device("cpu"),
                                   ragged_max_queries=0)
    n = len(meta.merge_rows)
    out = torch.from_numpy(rng.standard_normal((n, h, d)).astype(np.float32))
    lse = torch.from_numpy(rng.standard_normal((n, h)).astype(np.float32) * 3)
    got = kernels.merge(out, lse, meta.merge_index, fp32)
    assert got.dtype == (torch.float32 if fp32 else BF16) and got.shape == (t, h, d)
    exact = (out.double()[meta.merge_index.clamp_max(n - 1)] * torch.softmax(
        torch.cat([lse, torch.full((1, h), float("-inf"))]).double()[meta.merge_index], dim=1)[..., None]).sum(1)
    return meta, out, lse, got, exact


def test_merge_matches_torch_merge(kernels):
    meta, out, lse, got, exact = merge_case(kernels, fp32=False)
    expect = _merge([out.to(BF16)], [lse], meta, torch.zeros(got.shape, dtype=BF16))
    torch.testing.assert_close(got.float(), expect.float(), atol=2e-2, rtol=1e-2)
    assert ulps(got, exact.to(BF16)).max().item() <= 1


def test_merge_of_single_cover_rows_is_the_torch_placement_bit_for_bit(kernels):
    """A step whose rows each have one partial result (decodes without a shared prefix): the merge kernel, given
    the [T, 1] merge index, places each row's result in bf16 exactly as the torch scatter does."""
    rng = np.random.default_rng(1)
    t, h, d = 7, 3, 64
    parts = [AttnPart(np.array([r]), [r], 0, 5 + r) for r in (3, 0, 6, 1, 5, 2, 4)]  # rows out of order
    meta = AttentionMetadata.build(parts, np.full(t, 30), np.arange(t), 16, torch.device("cpu"),
                                   ragged_max_queries=0)
    assert meta.single_cover and meta.merge_index.shape == (t, 1)
    out = torch.from_numpy(rng.standard_normal((t, h, d)).astype(np.float32))
    lse = torch.from_numpy(rng.standard_normal((t, h)).astype(np.float32) * 3)
    expect = _merge([out.to(BF16)], [lse], meta, torch.zeros(t, h, d, dtype=BF16))
    assert torch.equal(kernels.merge(out, lse, meta.merge_index), expect)
    assert torch.equal(expect[3], out[0].to(BF16))  # part 0 holds row 3


def test_fp32_rms_norm_and_add_rms_norm_are_torch_within_4_ulps(kernels):
    """fp32 (dtype=float32): no bf16 rounding anywhere; only the sum of squares runs in another order than torch's
    mean, which moves the row's scale by an ulp or two."""
    x, delta, w = randn32(37, 576, seed=1, scale=3.0), randn32(37, 576, seed=2), randn32(576, seed=3)
    out = kernels.rms_norm(x, w, 1e-5)
    assert out.dtype == torch.float32
    assert ulps32(out, rms_norm(x, w, 1e-5)).max().item() <= 4
    xx = x.clone()
    h = kernels.add_rms_norm(xx, delta, w, 1e-5)
    assert torch.equal(xx, x + delta)  # the residual add in place, exactly torch's
    assert ulps32(h, rms_norm(x + delta, w, 1e-5)).max().item() <= 4
    assert not torch.equal(out, rms_norm(x.to(BF16), w.to(BF16), 1e-5).float())  # no bf16 on the way


def test_fp32_silu_mul_is_within_2e_6_of_exact_silu_times_up(kernels):
    gu = randn32(11, 2 * 1536, seed=6, scale=4.0)
    gate, up = gu.chunk(2, dim=-1)
    out = kernels.silu_mul(gu)
    assert out.dtype == torch.float32 and out.shape == (11, 1536)
    # SiLU's exp carries the rounding of its argument x * log2(e): relative errors up to 1e-6 where the gate is near
    # -15 (SiLU ~1e-5 there), a few ulps elsewhere; torch's is within 1.3e-7 of float64
    expect = F.silu(gate.double()) * up.double()
    assert ((out.double() - expect).abs() / expect.abs()).max().item() < 2e-6
    assert (ulps32(out, F.silu(gate) * up) <= 4).float().mean().item() > 0.98  # measured 0.991
    big = torch.tensor([[-1e4, -100.0, -89.0, 0.0, 3.0, 2.0, 2.0, 2.0, 2.0, 2.0]])  # gates, then ups
    assert torch.equal(kernels.silu_mul(big)[0, :3], torch.zeros(3))  # exp(-gate) overflows: 0, not NaN


def test_fused_ops_refuse_other_dtypes_and_mixed_ones(kernels):
    half = torch.zeros(2, 8, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="bf16 or fp32"):
        kernels.rms_norm(half, torch.zeros(8, dtype=torch.float16), 1e-5)
    with pytest.raises(RuntimeError, match="w must be a contiguous Float"):
        kernels.rms_norm(torch.zeros(2, 8), torch.zeros(8, dtype=BF16), 1e-5)
    with pytest.raises(RuntimeError, match="bf16 or fp32"):
        kernels.silu_mul(half)


@pytest.mark.parametrize("heads,kv_heads,d", [(9, 3, 64), (4, 1, 32)])
def test_fp32_rope_write_kv_is_torch_within_2_ulps_and_writes_the_exact_rows(heads, kv_heads, d, kernels):
    q, k, eq, ek = rope_case(kernels, torch.float32, heads, kv_heads, d)
    # x1 cos - x2 sin as one FMA: torch rounds each product; the results differ in the last bit or two
    assert (q - eq).abs().max().item() <= 2 * 2**-23 * eq.abs().max().item()
    assert (k - ek).abs().max().item() <= 2 * 2**-23 * ek.abs().max().item()


def test_fp32_merge_is_the_exact_merge_within_4_ulps_and_places_single_rows_bit_for_bit(kernels):
    _, out, _, got, exact = merge_case(kernels, fp32=True)
    # float64 reference; a merged value can be a near-cancelling sum, so the error is measured against the inputs'
    # scale (|out| <= 4.5 here)
    assert (got.double() - exact).abs().max().item() <= 4 * 2**-23 * out.abs().max().item()
    rng = np.random.default_rng(1)
    h, d = 4, 32
    single = [AttnPart(np.array([r]), [r], 0, 5 + r) for r in (3, 0, 6, 1, 5, 2, 4)]
    meta = AttentionMetadata.build(single, np.full(7, 30), np.arange(7), 16, torch.device("cpu"),
                                   ragged_max_queries=0)
    out = torch.from_numpy(rng.standard_normal((7, h, d)).astype(np.float32))
    lse = torch.from_numpy(rng.standard_normal((7, h)).astype(np.float32))
    expect = _merge([out], [lse], meta, torch.zeros(7, h, d))
    assert torch.equal(kernels.merge(out, lse, meta.merge_index, True), expect)


@pytest.mark.parametrize("vocab", [1, 5, 31, 32, 33, 100, 32000, 151936])
def test_argmax_rows_equals_torch_argmax_of_the_fp32_values(vocab, kernels):
    x = randn(12, vocab, seed=vocab)
    x[1] = 0.0
    x[2, : vocab // 2] = -0.0  # -0 ties with +0: the lowest index wins
    x[3] = float("-inf")
    x[4, vocab // 3] = float("nan")  # a NaN beats everything, the first one wins
    x.view(torch.int16)[4, -1] = 0x7FFF  # a NaN with a larger payload
    x.view(torch.int16)[4, 0] = -64  # 0xFFC0: a negative NaN
    x[5] = (x[5] * 2).round()  # many ties
    x[6, -1] = 100.0  # the maximum in the tail chunk
    x[7] = -x[7].abs()
    x[8, vocab // 2] = float("inf")
    x[9] = -0.0
    x[9, -1] = 0.0
    x[10, 0] = 50.0
    got = kernels.argmax_rows(x)
    assert got.dtype == torch.int64
    assert got.tolist() == torch.argmax(x.float(), dim=-1).tolist()
    assert got[6].item() == vocab - 1 and got[9].item() == 0 and got[10].item() == 0
    assert got[4].item() == 0


@pytest.mark.parametrize("isa", isa_params(need_bf16=True))
def test_bf16_engine_matches_hf_fp32_within_bf16_noise(tmp_path_factory, tokenizer_dir, isa, monkeypatch):
    """The whole bf16 CPU path (AVX512-BF16 attention over shared prefixes and decodes, fused ops) on a model with
    head_dim 32, against HF in fp32: log-probabilities stay within bf16 noise and each step's token is HF's top-1
    wherever HF's top-2 margin exceeds that noise. Measured on this batch: max error 0.097 and median 0.026 here;
    torch's own bf16 ops (BATCHLLM_NO_CPP=1) give max 0.169 and median 0.019."""
    import sys
    from pathlib import Path

    from batchllm import LLM, SamplingParams
    from batchllm.tiny import build_tiny_checkpoint

    sys.path.insert(0, str(Path(__file__).parent))
    from hf_reference import hf_logprobs

    monkeypatch.setenv("BATCHLLM_ISA", isa)
    model_dir = build_tiny_checkpoint(tmp_path_factory.mktemp("d32"), "llama", hidden_size=128, num_heads=4,
                                      num_kv_heads=2, intermediate_size=256, tokenizer_dir=tokenizer_dir, seed=5)
    llm = LLM(str(model_dir), dtype="bfloat16", block_size=16)
    assert llm.runner.model.kernels is not None  # the fused path really runs
    prefix = [1] + [40 + (i * 7) % 300 for i in range(70)]  # shared by every prompt: one node of 64 tokens
    prompts = [prefix + [100 + i, 200 + 3 * i, 150 + i] for i in range(6)] + [[1, 77, 88, 99]]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert llm.stats()["computed_prompt_tokens"] < sum(len(p) for p in prompts)  # the prefix was shared
    checked, errors = 0, []
    for prompt, out in zip(prompts, outs):
        o = out.outputs[0]
        ref = hf_logprobs(str(model_dir), prompt + list(o.token_ids))  # [L, V] fp32
        for i, tok in enumerate(o.token_ids):
            row = ref[len(prompt) - 1 + i]
            top2 = torch.topk(row, 2)
            errors.append(abs(o.logprobs[i][tok] - row[tok].item()))
            if (top2.values[0] - top2.values[1]).item() > 0.2:
                assert tok == top2.indices[0].item()
                checked += 1
    errors.sort()
    assert errors[-1] < 0.15 and errors[len(errors) // 2] < 0.04, errors
    assert checked >= 20  # most steps have a clear winner


def test_a_stale_torch_build_lock_does_not_hang_the_next_load():
    """torch's extension loader waits for its lock file to go away; a process killed inside it (a Ray worker, a
    kill -9) leaves the file behind. The next load must clear it instead of waiting forever."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from batchllm.machine import selected_isa

    cache = Path(os.environ.get("BATCHLLM_CACHE", Path.home() / ".cache" / "batchllm")) / "torch_extensions"
    cache = cache / selected_isa()
    cache.mkdir(parents=True, exist_ok=True)
    (cache / "lock").touch()  # what the killed process left
    code = "from batchllm.model.cpu_kernels import load_cpu_kernels; assert load_cpu_kernels() is not None"
    subprocess.run([sys.executable, "-c", code], timeout=300, check=True)
    assert not (cache / "lock").exists()

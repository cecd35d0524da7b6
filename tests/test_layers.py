"""`Linear` with packed weights. The project's bf16 kernel (`csrc/gemm.cpp`): the exact product within bf16 rounding,
`F.linear`'s value in all but a few elements, and a row's result independent of the batch; its fp32 kernel: the fp32
sum, a row's result independent of the batch. oneDNN's packing (where the project's kernel is not built): the values
of `F.linear`, bit for bit. Packing only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_paths import isa_params

import batchllm.model.layers as layers
from batchllm import LLM, SamplingParams
from batchllm.model.decoder import DecoderModel
from batchllm.model.layers import Linear, can_pack, gemm_kernels

BF16 = torch.bfloat16
needs_packing = pytest.mark.skipif(not can_pack(torch.empty(1, dtype=BF16)), reason="torch has no oneDNN here")


@pytest.fixture(params=isa_params(need_bf16=True))
def gemm_isa(request, monkeypatch):
    """Each kernel path with the project's gemm that this CPU runs (vdpbf16ps with AVX512-BF16, fp32 FMAs on
    AVX-512F and AVX2), selected for the test."""
    monkeypatch.setenv("BATCHLLM_ISA", request.param)
    assert gemm_kernels(torch.empty(1, 2, dtype=BF16)) is not None
    return request.param
SHAPES = [(128, 64), (37, 100), (1152, 896), (32000, 512)]


def make_linear(out_f: int, in_f: int, bias: bool, dtype=BF16, seed=0) -> Linear:
    gen = torch.Generator().manual_seed(seed)
    lin = Linear(out_f, in_f, bias, dtype, torch.device("cpu"))
    lin.weight.data.copy_(torch.randn(out_f, in_f, generator=gen))
    if bias:
        lin.bias.data.copy_(torch.randn(out_f, generator=gen))
    return lin


@pytest.mark.parametrize("out_f,in_f", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_gemm_packed_linear_is_the_exact_product_within_bf16_rounding(out_f, in_f, bias, gemm_isa):
    """Against the product in float64 of the same bf16 values: each output is the fp32 sum (error at most
    K * 2^-23 * sum |x w|) rounded once to bf16 (half a bf16 step: at most 2^-8 relative). And against `F.linear`
    (oneDNN, also fp32 sums of `vdpbf16ps` products): equal in all but a few elements (0.01% measured on
    (1152, 896))."""
    lin = make_linear(out_f, in_f, bias)
    weight = lin.weight.detach().clone()  # [out, in]
    b = None if lin.bias is None else lin.bias.detach().clone()
    lin.pack()
    assert lin.gemm is not None and lin.packed is not None and lin.weight is None  # the plain copy is gone
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 3, 7, 16, 129, 300):
        x = torch.randn(rows, in_f, generator=gen).to(BF16)  # [rows, in]
        y = lin(x)  # [rows, out]
        assert y.dtype == BF16 and y.shape == (rows, out_f)
        exact = x.double() @ weight.double().T  # [rows, out]
        if b is not None:
            exact = exact + b.double()
        magnitude = x.double().abs() @ weight.double().abs().T  # sum |x w| per output
        bound = 2.0 ** -8 * exact.abs() + 2 * in_f * 2.0 ** -23 * magnitude + 1e-30
        assert ((y.double() - exact).abs() <= bound).all(), rows
        differ = (y != F.linear(x, weight, b)).double().mean().item()
        assert differ <= 1e-3, (rows, differ)
    strided = torch.randn(5, 2 * in_f, generator=gen).to(BF16)[:, :in_f]  # a view with a row stride of 2 * in
    assert torch.equal(lin(strided), lin(strided.contiguous()))
    batched = torch.randn(2, 3, in_f, generator=gen).to(BF16)  # leading dimensions are kept
    assert torch.equal(lin(batched), lin(batched.reshape(6, in_f)).reshape(2, 3, out_f))


@pytest.mark.parametrize("out_f,in_f", [(37, 100), (576, 128), (1152, 896)])
def test_gemm_row_results_do_not_depend_on_the_batch_or_the_threads(out_f, in_f, gemm_isa):
    """A row's output is the same bits alone, at any place in a batch of any size (tiles of 1-6 rows, row blocks,
    panels split over threads; with 576 outputs, 9 panels on 2 threads: the ninth split by tiles) and with 1 or 2
    threads: batch composition never changes a bf16 answer."""
    lin = make_linear(out_f, in_f, True)
    lin.pack()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(700, in_f, generator=gen).to(BF16)  # [700, in]
    alone = torch.cat([lin(x[i:i + 1]) for i in range(0, 700, 37)])  # rows 0, 37, ... one at a time
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for rows in (1, 2, 5, 6, 7, 13, 100, 700):
                order = torch.randperm(700, generator=gen)[:rows]
                y = lin(x[order])  # [rows, out]
                for j, i in enumerate(order.tolist()):
                    if i % 37 == 0:
                        assert torch.equal(y[j], alone[i // 37]), (n_threads, rows, i)
                assert torch.equal(y, torch.cat([lin(x[order[:3]]), lin(x[order[3:]])])[:rows])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
@pytest.mark.parametrize("inter,in_f,bias", [(352, 128, False), (100, 64, True), (37, 130, True)])
def test_gated_packing_gives_silu_mul_of_the_product_bit_for_bit(inter, in_f, bias, dtype, gemm_isa):
    """A [gate; up] projection packed gated computes silu(gate) * up in the product's epilogue (bf16: with the
    roundings of bf16 ops): the same bits as the fused `silu_mul` of the plain packed product (also with a bias and a
    feature count that is not a multiple of the panel's 32), for any number of rows; its plain `forward` is
    refused."""
    from batchllm.model.cpu_kernels import load_cpu_kernels

    silu_mul = load_cpu_kernels(gemm_isa).silu_mul
    plain = make_linear(2 * inter, in_f, bias, dtype=dtype, seed=3)
    gated = make_linear(2 * inter, in_f, bias, dtype=dtype, seed=3)
    plain.pack()
    gated.pack(gated=True)
    assert gated.gated and not plain.gated
    gen = torch.Generator().manual_seed(4)
    for rows in (1, 5, 6, 7, 64, 300):
        x = (torch.randn(rows, in_f, generator=gen) * 4).to(dtype)  # [rows, in]: gates far out on both sides
        y = gated.silu_mul(x)  # [rows, inter]
        assert y.shape == (rows, inter) and torch.isfinite(y.float()).all()
        assert torch.equal(y, silu_mul(plain(x))), rows
    with pytest.raises(RuntimeError, match="silu_mul"):
        gated(x)


def test_gated_epilogue_rounds_gate_and_up_sums_to_the_nearest_even_bf16(gemm_isa):
    """The gated product rounds its fp32 gate and up sums to bf16 (to nearest, ties to even) before SiLU(gate) * up.
    With every gate sum 64 (SiLU(64) = 64 in fp32) each output is exactly 64 * bf16(up sum); the up sums
    a + b / 256 sit on bf16 ties (b = 1, 3), just below them (b = 0.5) and just above (b = 1.5), in [1, 2) and
    [-4, -2), so a wrong rounding direction shows in one bit."""
    inter = 32  # one panel
    a = torch.tensor([1.0, 1.0078125, 1.015625, 1.0234375, -2.0, -2.03125, -3.96875, 1.9921875] * 4)  # bf16 values
    b = torch.tensor([1.0] * 8 + [3.0] * 8 + [0.5] * 8 + [1.5] * 8)
    w = torch.zeros(2 * inter, 2)
    w[:inter, 0] = 64.0  # gate = 64 * x0
    w[inter:, 0], w[inter:, 1] = a, b  # up = a x0 + b x1
    x = torch.tensor([[1.0, 1 / 256], [1.0, -1 / 256]])  # [2 rows, K = 2]
    up = x @ w[inter:].T  # [2, inter]: exact in fp32 (few bits)
    expect = (up.to(BF16).float() * 64).to(BF16)
    lin = Linear(2 * inter, 2, False, BF16, torch.device("cpu"))
    lin.weight.data.copy_(w)
    lin.pack(gated=True)
    assert lin.gated
    out = lin.silu_mul(x.to(BF16))  # [2, inter]
    assert torch.equal(out, expect)
    bits = up.view(torch.int32)
    for other in (bits & -65536, (bits + 0x8000) & -65536):  # truncation, and ties away from zero, differ
        assert not torch.equal(expect, (other.view(torch.float32) * 64).to(BF16))


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_prefetching_the_next_weight_changes_no_result_and_only_takes_a_packed_weight(dtype, gemm_isa):
    """`Linear.chain`: a projection prefetches its successor's first panels; the product is the same bits with and
    without, for plain and gated packing, and the kernel refuses a `next` that is not a packed weight."""
    gen = torch.Generator().manual_seed(7)
    first, gate_up, down = make_linear(96, 64, True, dtype, 1), make_linear(256, 96, False, dtype, 2), \
        make_linear(64, 128, False, dtype, 3)
    first.pack()
    gate_up.pack(gated=True)
    down.pack()
    for rows in (1, 7, 300):
        x = torch.randn(rows, 64, generator=gen).to(dtype)  # [rows, 64]
        alone = first(x)  # [rows, 96]
        hidden = gate_up.silu_mul(alone) if gate_up.gated else gate_up(alone)  # [rows, 128 or 256]
        first.chain(gate_up)
        gate_up.chain(down)
        assert first.next_packed is gate_up.packed and gate_up.next_packed is down.packed
        assert torch.equal(first(x), alone)
        assert torch.equal(gate_up.silu_mul(alone) if gate_up.gated else gate_up(alone), hidden)
        first.next_packed = gate_up.next_packed = None
    with pytest.raises(RuntimeError, match="packed weight"):
        first.gemm(x, first.packed, 96, None, next=torch.zeros(64, 96, dtype=dtype))


def test_gemm_packing_applies_to_cpu_weights_bf16_with_an_even_input_size_or_fp32(gemm_isa):
    assert gemm_kernels(torch.empty(4, 7, dtype=BF16)) is None  # odd K: oneDNN's packing (or none) instead
    assert gemm_kernels(torch.empty(4, 8, dtype=BF16)) is not None
    assert gemm_kernels(torch.empty(4, 7, dtype=torch.float32)) is not None  # gemm_f32: any K
    assert gemm_kernels(torch.empty(4, 8, dtype=torch.float16)) is None
    assert gemm_kernels(torch.empty(4, 8, dtype=BF16, device="meta")) is None
    assert gemm_kernels(torch.empty(4, 8, dtype=torch.float32, device="meta")) is None


def test_fp32_weights_stay_plain_where_the_kernel_path_has_no_vector_code(monkeypatch):
    monkeypatch.setenv("BATCHLLM_ISA", "portable")
    lin = make_linear(8, 6, True, dtype=torch.float32)
    lin.pack()
    assert lin.gemm is None and lin.packed is None and lin.weight is not None  # F.linear, as HF


@pytest.mark.parametrize("out_f,in_f", SHAPES + [(65, 7), (3, 1)])
@pytest.mark.parametrize("bias", [False, True])
def test_fp32_packed_linear_is_the_fp32_sum_and_rows_do_not_depend_on_the_batch(out_f, in_f, bias, gemm_isa):
    """fp32 weights (dtype=float32, the exact dtype) through `gemm_f32`: each output within the bound of an fp32
    sum of K products (K * 2^-24 * sum |x w| beyond the float64 product), `F.linear`'s values to the same bound, and
    a row's result bit for bit the same alone or in any batch (the sum runs over k in order whatever the tile)."""
    lin = make_linear(out_f, in_f, bias, dtype=torch.float32)
    weight = lin.weight.detach().clone()  # [out, in]
    b = None if lin.bias is None else lin.bias.detach().clone()
    lin.pack()
    assert lin.gemm is not None and lin.packed is not None and lin.weight is None and not lin.gated
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 3, 7, 16, 129, 300):
        x = torch.randn(rows, in_f, generator=gen)  # [rows, in]
        y = lin(x)  # [rows, out]
        assert y.dtype == torch.float32 and y.shape == (rows, out_f)
        exact = x.double() @ weight.double().T  # [rows, out]
        if b is not None:
            exact = exact + b.double()
        bound = (in_f + 1) * 2.0**-24 * (x.double().abs() @ weight.double().abs().T + (0 if b is None else b.abs()))
        assert ((y.double() - exact).abs() <= bound).all(), rows
        assert ((y.double() - F.linear(x, weight, b).double()).abs() <= 2 * bound).all(), rows
        for r in {0, rows // 2, rows - 1}:
            assert torch.equal(lin(x[r:r + 1])[0], y[r]), (rows, r)
    x3 = torch.randn(2, 5, in_f, generator=gen)  # [2, 5, in]: leading dims kept
    assert torch.equal(lin(x3), lin(x3.reshape(10, in_f)).reshape(2, 5, out_f))


@needs_packing
@pytest.mark.parametrize("out_f,in_f", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_packed_linear_equals_f_linear_bit_for_bit(out_f, in_f, bias, monkeypatch):
    """Where the project's kernel is not built, oneDNN's packed layout keeps `F.linear`'s values exactly."""
    monkeypatch.setattr(layers, "gemm_kernels", lambda weight: None)
    lin = make_linear(out_f, in_f, bias)
    weight = lin.weight.detach().clone()  # [out, in]
    b = None if lin.bias is None else lin.bias.detach().clone()
    lin.pack()
    assert lin.gemm is None and lin.packed is not None and lin.weight is None  # the plain copy is gone
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 3, 16, 129, 700):
        x = torch.randn(rows, in_f, generator=gen).to(BF16)  # [rows, in]
        y = lin(x)  # [rows, out]
        assert y.dtype == BF16 and y.shape == (rows, out_f)
        assert torch.equal(y, F.linear(x, weight, b)), (rows, (y.float() - F.linear(x, weight, b).float()).abs().max())
    strided = torch.randn(5, 2 * in_f, generator=gen).to(BF16)[:, :in_f]  # a view with a row stride of 2 * in
    assert torch.equal(lin(strided), F.linear(strided, weight, b))


def test_pack_leaves_non_cpu_weights_as_they_are_and_onednn_packs_bf16_only():
    for dtype in (torch.float32, BF16):
        lin = Linear(16, 8, True, dtype, torch.device("meta"))
        weight = lin.weight
        lin.pack()
        assert lin.packed is None and lin.gemm is None and lin.weight is weight
    assert not can_pack(torch.empty(1, dtype=torch.float32))
    assert not can_pack(torch.empty(1, dtype=BF16, device="meta"))


@needs_packing
def test_a_loaded_bf16_model_packs_every_projection_and_keeps_the_tied_embedding(tiny_qwen2, monkeypatch):
    """Qwen2 (q/k/v biases, tied embeddings) in bf16: after loading, every projection and the head are packed, the
    embedding stays a plain table equal to the checkpoint's, and greedy tokens and logprobs equal those of the same
    model with packing switched off."""
    from safetensors.torch import load_file

    from batchllm.model.cpu_kernels import run_dtype

    if run_dtype("bfloat16", torch.device("cpu")) != BF16:
        pytest.skip("this kernel path has no bf16 kernels: a bf16 model runs in fp32 here, unpacked")
    prompts = [{"prompt_token_ids": [1, 5 + i, 40, 41 + 2 * i, 300 - i]} for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    packed = LLM(str(tiny_qwen2), dtype="bfloat16", block_size=4)
    model = packed.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * model.cfg.num_layers + 1
    assert all(m.packed is not None and m.weight is None for m in linears)
    # each projection prefetches the one a step multiplies after it; the head's successor is the next step's first
    order = [lin for layer in model.layers for lin in (layer.attn.qkv, layer.attn.o_proj, layer.gate_up, layer.down)]
    order.append(model.lm_head)
    assert all(m.next_packed is following.packed for m, following in zip(order, order[1:] + order[:1]))
    assert all(layer.attn.qkv.bias is not None for layer in model.layers)  # the biases are kept, in plain form
    checkpoint = load_file(str(tiny_qwen2 / "model.safetensors"))
    assert torch.equal(model.embed, checkpoint["model.embed_tokens.weight"].to(BF16))
    out_packed = packed.generate(prompts, params, use_tqdm=False)

    monkeypatch.setattr(DecoderModel, "pack_weights", lambda self: None)
    plain = LLM(str(tiny_qwen2), dtype="bfloat16", block_size=4)
    assert all(m.packed is None for m in plain.runner.model.modules() if isinstance(m, Linear))
    assert plain.runner.model.lm_head.weight is plain.runner.model.embed  # tied: one tensor
    out_plain = plain.generate(prompts, params, use_tqdm=False)
    for a, b in zip(out_packed, out_plain, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs

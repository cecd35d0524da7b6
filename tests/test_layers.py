"""`Linear` with oneDNN-packed weights: the values of `F.linear`, bit for bit, and packing only where it applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from batchllm import LLM, SamplingParams
from batchllm.model.layers import Linear, can_pack
from batchllm.model.llama import LlamaModel

BF16 = torch.bfloat16
needs_packing = pytest.mark.skipif(not can_pack(torch.empty(1, dtype=BF16)), reason="torch has no oneDNN here")


def make_linear(out_f: int, in_f: int, bias: bool, dtype=BF16, seed=0) -> Linear:
    gen = torch.Generator().manual_seed(seed)
    lin = Linear(out_f, in_f, bias, dtype, torch.device("cpu"))
    lin.weight.data.copy_(torch.randn(out_f, in_f, generator=gen))
    if bias:
        lin.bias.data.copy_(torch.randn(out_f, generator=gen))
    return lin


@needs_packing
@pytest.mark.parametrize("out_f,in_f", [(128, 64), (37, 100), (1152, 896), (32000, 512)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_f_linear_bit_for_bit(out_f, in_f, bias):
    lin = make_linear(out_f, in_f, bias)
    weight = lin.weight.detach().clone()  # [out, in]
    b = None if lin.bias is None else lin.bias.detach().clone()
    lin.pack()
    assert lin.packed is not None and lin.weight is None  # the plain copy is gone
    gen = torch.Generator().manual_seed(1)
    for rows in (1, 3, 16, 129, 700):
        x = torch.randn(rows, in_f, generator=gen).to(BF16)  # [rows, in]
        y = lin(x)  # [rows, out]
        assert y.dtype == BF16 and y.shape == (rows, out_f)
        assert torch.equal(y, F.linear(x, weight, b)), (rows, (y.float() - F.linear(x, weight, b).float()).abs().max())
    strided = torch.randn(5, 2 * in_f, generator=gen).to(BF16)[:, :in_f]  # a view with a row stride of 2 * in
    assert torch.equal(lin(strided), F.linear(strided, weight, b))


def test_pack_leaves_fp32_and_non_cpu_weights_as_they_are():
    lin = make_linear(16, 8, True, dtype=torch.float32)
    weight = lin.weight
    lin.pack()
    assert lin.packed is None and lin.weight is weight
    assert not can_pack(torch.empty(1, dtype=torch.float32))
    assert not can_pack(torch.empty(1, dtype=BF16, device="meta"))


@needs_packing
def test_a_loaded_bf16_model_packs_every_projection_and_keeps_the_tied_embedding(tiny_qwen2, monkeypatch):
    """Qwen2 (q/k/v biases, tied embeddings) in bf16: after loading, every projection and the head are packed, the
    embedding stays a plain table equal to the checkpoint's, and greedy tokens and logprobs equal those of the same
    model with packing switched off."""
    from safetensors.torch import load_file

    prompts = [{"prompt_token_ids": [1, 5 + i, 40, 41 + 2 * i, 300 - i]} for i in range(5)]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    packed = LLM(str(tiny_qwen2), dtype="bfloat16", block_size=4)
    model = packed.runner.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * model.cfg.num_layers + 1
    assert all(m.packed is not None and m.weight is None for m in linears)
    assert all(layer.qkv.bias is not None for layer in model.layers)  # the biases are kept, in plain form
    checkpoint = load_file(str(tiny_qwen2 / "model.safetensors"))
    assert torch.equal(model.embed, checkpoint["model.embed_tokens.weight"].to(BF16))
    out_packed = packed.generate(prompts, params, use_tqdm=False)

    monkeypatch.setattr(LlamaModel, "pack_weights", lambda self: None)
    plain = LLM(str(tiny_qwen2), dtype="bfloat16", block_size=4)
    assert all(m.packed is None for m in plain.runner.model.modules() if isinstance(m, Linear))
    assert plain.runner.model.lm_head.weight is plain.runner.model.embed  # tied: one tensor
    out_plain = plain.generate(prompts, params, use_tqdm=False)
    for a, b in zip(out_packed, out_plain, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].logprobs == b.outputs[0].logprobs

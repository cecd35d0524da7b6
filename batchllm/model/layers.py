"""Numerics shared by the Llama family, following HF `modeling_llama.py`: RMSNorm with fp32 upcast, rotate_half RoPE
(default, linear and llama3 frequency scaling), the gated SiLU MLP, and the linear projections."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from batchllm.model_config import RopeConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, kernels=None) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in fp32, cast back to the input dtype, then scale by the weight.
    ``kernels``: the fused CPU ops (bf16 or fp32: `cpu_kernels.load_fused_ops`), or None for the torch ops."""
    if kernels is not None:
        return kernels.rms_norm(x, weight, eps)
    dtype = x.dtype
    h = x.float()  # [T, hidden]
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 kernels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: returns (x + delta, rms_norm(x + delta)); with ``kernels``, x is updated
    in place and both happen in one pass."""
    if kernels is not None:
        return x, kernels.add_rms_norm(x, delta, weight, eps)
    x = x + delta
    return x, rms_norm(x, weight, eps)


def rope_inv_freq(rope: RopeConfig, head_dim: int, max_len: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] in fp32, with HF's linear, llama3 or longrope scaling applied.

    longrope: HF picks the long factors for a forward pass whose longest sequence exceeds the original context and
    recomputes the cache when a sequence crosses it. Keys shared between requests must not depend on who reads them,
    so here the choice is made once per engine, by its context `max_len` (as vLLM does): the short factors while
    `max_len` is within the original context (equal to HF for every sequence), the long ones beyond it."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # [D/2]
    if rope.rope_type == "longrope":
        long = max_len > rope.original_max_position_embeddings
        factors = torch.tensor(rope.long_factor if long else rope.short_factor, dtype=torch.float32)  # [D/2]
        return 1.0 / (factors * rope.theta ** exponents)
    inv_freq = 1.0 / (rope.theta ** exponents)
    if rope.rope_type == "linear":
        inv_freq = inv_freq / rope.factor
    elif rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryTable:
    """cos/sin for every position up to `max_len`, computed once in fp32 exactly as HF does (times the rope's
    attention factor), then cast."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_len: int, dtype: torch.dtype, device: torch.device):
        inv_freq = rope_inv_freq(rope, head_dim, max_len)  # [D/2]
        pos = torch.arange(max_len, dtype=torch.float32)  # [P]
        freqs = pos[:, None] * inv_freq[None, :]  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = (emb.cos() * rope.attention_factor).to(dtype=dtype, device=device)  # [P, D]
        self.sin = (emb.sin() * rope.attention_factor).to(dtype=dtype, device=device)  # [P, D]

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] of absolute positions [T] (once per step, shared by every layer)."""
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotate q [T, H, D] and k [T, KVH, D] by cos/sin [T, 1, D] (HF's rotate_half convention)."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Linear(torch.nn.Module):
    """y = x W^T + b for x [..., in]; W is [out, in] as in the checkpoint.

    `pack()` moves W once into a matmul kernel's own layout and drops the plain copy (on CPU):
    - fp32 W: the project's fp32 gemm (`gemm_f32` in `csrc/gemm.cpp`: FMAs over panels of 64 columns, every output
      the sum over k in order, a row's result independent of the batch) where the kernel path has vector code (AVX2
      and up). Against `F.linear` (MKL) on SmolLM2-135M's shapes, AVX2 path, 2 threads: 1.2-2.0x at 48-256 rows,
      1.9-6x at 8 rows (the lm_head most);
    - bf16 W: the project's kernel (`csrc/gemm.cpp`: vdpbf16ps with AVX512-BF16, fp32 FMAs over bf16 weights on
      AVX-512F and AVX2) where it was built. A row's result is the same whatever the
      other rows of the batch, and within one bf16 step of `F.linear` (equal in all but ~0.01% of values, checked in
      `test_layers.py`). Against oneDNN's packed weights, alternating calls over 8 layers' weights (2 threads): at
      1-128 rows, where decode steps live, 1.15-2.2x for qkv, o and down, 1.1-1.45x for gate_up and 1.0-1.25x for a
      32000-row lm_head; at 192-2048 rows 0.96-1.2x (one lm_head case 0.83). It also never pays oneDNN's kernel
      generation on the first call with a new number of rows (0.5-4 ms each, ~0.3 s of a 6 s `mixed-output` run);
    - else oneDNN's blocked layout, the same oneDNN kernel as `F.linear` (bit for bit) without the per-call weight
      reordering: 1.2-2.5x for a 32000-row lm_head at 16-128 rows, 1.1-1.5x for a layer's projections at 16-64 rows.
    """

    def __init__(self, out_features: int, in_features: int, bias: bool, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.out_features = out_features
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                         requires_grad=False)
        self.bias = torch.nn.Parameter(torch.empty(out_features, dtype=dtype, device=device),
                                       requires_grad=False) if bias else None
        self.packed: torch.Tensor | None = None  # W in the packing kernel's layout, once packed
        self.gemm = None  # the project's kernel when it packed W; None for oneDNN
        self.gated = False  # packed by the project's kernel as a fused [gate; up] projection: see `silu_mul`
        self.next_packed: torch.Tensor | None = None  # the packed weight a step multiplies next: see `chain`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            raise RuntimeError("a gated-packed projection gives silu(gate) * up only: call silu_mul")
        if self.gemm is not None:
            return self.gemm(x, self.packed, self.out_features, self.bias, next=self.next_packed)  # [..., out]
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")  # [..., out]
        return F.linear(x, self.weight, self.bias)  # [..., out]

    def pack(self, gated: bool = False) -> None:
        """Replace W by a kernel's packed form where one applies (CPU); else leave it as it is.

        gated: W is a fused [gate; up] projection [2I, in]. Where the project's kernel packs it, it is laid out so that
        the product's epilogue computes SiLU(gate) * up (`silu_mul`); `forward` is then not available."""
        if self.packed is not None:
            return
        kernels = gemm_kernels(self.weight)
        if kernels is not None:
            gated = gated and self.out_features % 2 == 0
            if self.weight.dtype == torch.float32:
                self.packed = kernels.gemm_pack_weight_f32(self.weight.data, gated)  # [panels, in, 64]
                self.gemm = kernels.gemm_f32
            else:
                self.packed = kernels.gemm_pack_weight(self.weight.data, gated)  # [panels, in / 2, 64, 2]
                self.gemm = kernels.gemm
            self.gated = gated
            self.weight = None
        elif can_pack(self.weight):
            # 16: oneDNN's batch-size hint for the layout; 1, 16, 128 and 2048 ran at the same speed at 1-2048 rows
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, 16)
            self.weight = None

    def chain(self, following: Linear) -> None:
        """Name the projection a step multiplies after this one. Where both run in the project's gemm, each thread
        prefetches its first panel of `following`'s weight while this product ends, so the next call starts on
        cached weights instead of waiting on memory (weights come from memory every step: a model's are larger
        than the caches). Changes no result. SmolLM2-135M decode steps, AVX2 path, 2 threads: 1.01x at 48 rows,
        1.03x at 8 (Zen 5; natively 1.00x)."""
        if self.gemm is not None and following.gemm is not None:
            self.next_packed = following.packed

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """For a gated-packed [gate; up] projection: bf16(bf16(silu(gate)) * up) of x's product (fp32: silu(gate) *
        up), [..., I]; the same bits as the fused op `silu_mul` applied to the plain product, without writing the
        [..., 2I] product."""
        return self.gemm(x, self.packed, self.out_features, self.bias, True, self.next_packed)  # [..., I]


def gemm_kernels(weight: torch.Tensor):
    """The compiled module whose gemm can take this weight on a CPU whose kernel path has the gemm: `gemm_f32` for
    fp32, `gemm` for bf16 with an even number of input features. None otherwise."""
    if weight.device.type != "cpu" or not (weight.dtype == torch.float32
                                           or (weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0)):
        return None
    from batchllm.model.cpu_kernels import has_bf16_kernels, load_cpu_kernels

    return load_cpu_kernels() if has_bf16_kernels() else None


def can_pack(weight: torch.Tensor) -> bool:
    """Whether oneDNN packing applies to this weight: bf16 on CPU, with torch built with oneDNN (mkldnn) and oneDNN
    able to run bf16 on this CPU."""
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return (hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_is_mkldnn_bf16_supported") and bool(ops._is_mkldnn_bf16_supported()))


def gated_mlp(x: torch.Tensor, gate_up: Linear, down: Linear, kernels=None, act: str = "silu") -> torch.Tensor:
    """act(gate) * up, then down; gate and up are one fused projection [2 * I, hidden]. `act`: "silu" or
    "gelu_tanh" (GELU with the tanh approximation, Gemma's)."""
    if gate_up.gated:
        return down(gate_up.silu_mul(x))  # [T, hidden]
    gu = gate_up(x)  # [T, 2I]
    if kernels is not None and act == "silu":
        return down(kernels.silu_mul(gu))  # [T, hidden]
    gate, up = gu.chunk(2, dim=-1)  # [T, I] each
    if act == "gelu_tanh":
        return down(F.gelu(gate, approximate="tanh") * up)  # [T, hidden]
    return down(F.silu(gate) * up)  # [T, hidden]

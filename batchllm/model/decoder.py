"""The decoder of every supported architecture (see `batchllm.architectures`) over a packed, unpadded batch of tokens.

Every step the runner hands `forward` one `ForwardBatch`: the T tokens of all scheduled sequences laid end to end,
their absolute positions, and the attention metadata describing which KV each token sees. There is no global forward
context: everything a layer needs arrives through that object. Each layer owns its `forward`:

    x = embed(ids) [* embed_scale]                       h = norm(x)
    per layer:  o = attn(h)          [o = post_attn_norm(o)]       x, h = x + o, next norm(x + o)
                m = mlp(h)           [m = post_ff_norm(m)]         x, h = x + m, next layer's input norm(x + m)
    logits = lm_head(norm(x)) [soft-capped]

(bracketed: Gemma 3's extra norms and scalings). Attention rotates q and k (after per-head q/k norms where the
model has them), writes K/V into the paged cache and attends over the step's parts (`batchllm.model.attention`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from batchllm.model.attention import AttentionMetadata, paged_attention, write_kv
from batchllm.model.cpu_kernels import load_cpu_kernels, load_fused_ops
from batchllm.model.layers import Linear, RotaryTable, add_rms_norm, apply_rotary, gated_mlp, rms_norm
from batchllm.model_config import ModelConfig


@dataclass
class ForwardBatch:
    """One step's input. `logits_rows` are the rows whose next-token logits are wanted (the samplers' rows).

    `attn` holds the step's attention per window size (0: layers that see every key). `attn_last` (optional) is the
    attention of the logits rows alone, renumbered 0 .. B-1, likewise per window: the last layer's output of any
    other row feeds nothing, so the last layer writes every row's K/V but attends, projects and runs its MLP for the
    B logits rows only (in a prefill-heavy step that skips most of one layer)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute positions
    slots: torch.Tensor  # [T] int64, cache slot each row's K/V goes to (negative: not written)
    attn: dict[int, AttentionMetadata]
    logits_rows: torch.Tensor  # [B] int64
    attn_last: dict[int, AttentionMetadata] | None = None
    _rotary: dict = field(default_factory=dict, repr=False)  # per-step cache of cos/sin lookups per table

    def cos_sin(self, table: RotaryTable) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, 1, D] of this step's positions in `table` (looked up once per step and table)."""
        key = id(table)
        if key not in self._rotary:
            self._rotary[key] = table.lookup(self.positions)
        return self._rotary[key]


def _param(*shape, dtype, device) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


class Attention(torch.nn.Module):
    """Fused q/k/v projection, optional per-head q/k norms, rotary embedding, paged attention, output projection."""

    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryTable, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, d
        self.qkv = Linear((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h, cfg.qkv_bias, dtype, device)
        self.o_proj = Linear(h, cfg.num_heads * d, cfg.o_bias, dtype, device)
        self.q_norm = _param(d, dtype=dtype, device=device) if cfg.qk_norm else None
        self.k_norm = _param(d, dtype=dtype, device=device) if cfg.qk_norm else None
        self.eps = cfg.rms_norm_eps
        self.scale = cfg.scale
        self.window = cfg.window(layer) or 0  # key of this layer's metadata in ForwardBatch.attn
        self.rotary = rotary

    def forward(self, h: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor, kern,
                logits_only: bool) -> torch.Tensor:
        """h [T, hidden] -> [T, hidden], or [B, hidden] for the logits rows when `logits_only`. Writes this step's
        K/V into `kv_cache` [2, blocks, block_size, KVH, D]."""
        nh, nkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q, k, v = self.qkv(h).split([nh * d, nkv * d, nkv * d], dim=-1)  # [T, H*D], [T, KVH*D] x 2
        q = q.view(-1, nh, d)  # [T, H, D]
        k = k.view(-1, nkv, d)  # [T, KVH, D]
        v = v.view(-1, nkv, d)  # [T, KVH, D]
        if self.q_norm is not None:
            q = rms_norm(q.contiguous(), self.q_norm, self.eps, kern)  # [T, H, D]
            k = rms_norm(k.contiguous(), self.k_norm, self.eps, kern)  # [T, KVH, D]
        meta = batch.attn[self.window]
        if kern is None:
            q, k = apply_rotary(q, k, *batch.cos_sin(self.rotary))
        else:  # rotates q, k in place and writes this step's K/V into the cache
            kern.rope_write_kv(q, k, v, self.rotary.cos, self.rotary.sin, batch.positions,
                               kv_cache.view(2, -1, nkv, d), batch.slots)
        if logits_only:
            if kern is None:
                write_kv(k, v, kv_cache, meta)
            q = q.index_select(0, batch.logits_rows)  # [B, H, D]
            o = paged_attention(q, k, v, kv_cache, batch.attn_last[self.window], self.scale,
                                kv_written=True)  # [B, H, D]
        else:
            o = paged_attention(q, k, v, kv_cache, meta, self.scale, kv_written=kern is not None)  # [T, H, D]
        return self.o_proj(o.reshape(-1, nh * d))  # [T or B, hidden]


class DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rotary: RotaryTable, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h = cfg.hidden_size
        self.attn = Attention(cfg, layer, rotary, dtype, device)
        self.input_norm = _param(h, dtype=dtype, device=device)
        self.post_attn_norm = _param(h, dtype=dtype, device=device)
        # Gemma 3: post_attn_norm normalises the attention output; pre_ff_norm then plays Llama's post-attention role
        self.pre_ff_norm = _param(h, dtype=dtype, device=device) if cfg.sandwich_norms else None
        self.post_ff_norm = _param(h, dtype=dtype, device=device) if cfg.sandwich_norms else None
        self.gate_up = Linear(2 * cfg.intermediate_size, h, cfg.mlp_bias, dtype, device)
        self.down = Linear(h, cfg.intermediate_size, cfg.mlp_bias, dtype, device)
        self.act = cfg.hidden_act
        self.eps = cfg.rms_norm_eps

    def forward(self, x: torch.Tensor, h: torch.Tensor, batch: ForwardBatch, kv_cache: torch.Tensor, kern,
                next_norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: the residual stream [T, hidden]; h: this layer's normalised input. Returns the new residual stream
        and its norm by `next_norm` (the next layer's input norm; None for the last layer, which returns h = None).
        The last layer keeps only the logits rows when the batch has `attn_last`."""
        logits_only = next_norm is None and batch.attn_last is not None
        o = self.attn(h, batch, kv_cache, kern, logits_only)  # [T or B, hidden]
        if logits_only:
            x = x.index_select(0, batch.logits_rows)  # [B, hidden]
        if self.pre_ff_norm is not None:
            o = rms_norm(o, self.post_attn_norm, self.eps, kern)
            x, h = add_rms_norm(x, o, self.pre_ff_norm, self.eps, kern)
        else:
            x, h = add_rms_norm(x, o, self.post_attn_norm, self.eps, kern)
        m = gated_mlp(h, self.gate_up, self.down, kern, self.act)  # [T or B, hidden]
        if self.post_ff_norm is not None:
            m = rms_norm(m, self.post_ff_norm, self.eps, kern)
        if next_norm is None:
            return x + m, None
        return add_rms_norm(x, m, next_norm, self.eps, kern)

    def pack(self) -> None:
        for linear in (self.attn.qkv, self.attn.o_proj, self.down):
            linear.pack()
        # SiLU(gate) * up in the product's epilogue where the project's gemm runs
        self.gate_up.pack(gated=self.act == "silu")


class DecoderModel(torch.nn.Module):
    """Decoder-only transformer; weights are filled by `batchllm.model.loader.load_weights`."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        h = cfg.hidden_size
        self.embed = _param(cfg.vocab_size, h, dtype=dtype, device=device)
        self.rotary = RotaryTable(cfg.rope, cfg.head_dim, cfg.max_model_len, dtype, device)
        local = cfg.local_rope
        self.local_rotary = RotaryTable(local, cfg.head_dim, cfg.max_model_len, dtype, device) if local else None
        self.layers = torch.nn.ModuleList(
            DecoderLayer(cfg, i, self.local_rotary if local and cfg.window(i) else self.rotary, dtype, device)
            for i in range(cfg.num_layers))
        self.norm = _param(h, dtype=dtype, device=device)
        self.lm_head = Linear(cfg.vocab_size, h, False, dtype, device)
        if cfg.tie_word_embeddings:  # one tensor, until `pack_weights` gives the head its own packed copy
            self.lm_head.weight = self.embed
        # HF keeps the scale as an fp32 tensor cast to the weights' dtype (sqrt(640) = 25.3 becomes 25.25 in bf16)
        self.embed_scale = None if cfg.embed_scale is None else torch.tensor(cfg.embed_scale).to(dtype)
        self.windows = sorted({layer.attn.window for layer in self.layers})  # the metadata a step needs
        # bf16 or fp32 on CPU: fused C++ element-wise ops (norms, residual adds, rotary + cache write, SiLU * up). On
        # CPU the kernels are built (first use on this machine) or loaded here, not in the first step.
        self.kernels = load_fused_ops(dtype, device)
        if torch.device(device).type == "cpu":
            load_cpu_kernels()

    def pack_weights(self) -> None:
        """Called once the weights are loaded: move every projection and the lm_head into the matmul library's
        packed layout where that applies (`Linear.pack`: bf16 on CPU), and link each to the one a step multiplies
        next (`Linear.chain`: a prefetch). With tied embeddings the head then keeps its own copy (vocab x hidden
        more memory); the embedding lookup keeps the plain table."""
        for layer in self.layers:
            layer.pack()
        self.lm_head.pack()
        # the order a step multiplies them in (the lm_head's rows come after the last layer's, then the next step)
        order = [lin for layer in self.layers for lin in (layer.attn.qkv, layer.attn.o_proj, layer.gate_up, layer.down)]
        order.append(self.lm_head)
        for linear, following in zip(order, order[1:] + order[:1]):
            linear.chain(following)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Run the step, writing this step's K/V into `kv_caches` (one [2, blocks, block_size, KVH, D] per layer),
        and return the final-normed hidden states [B, hidden] of `batch.logits_rows` (`logits` turns them into
        logits: the runner does so in chunks where many rows want them)."""
        kern, eps = self.kernels, self.cfg.rms_norm_eps
        x = F.embedding(batch.input_ids, self.embed)  # [T, hidden]
        if self.embed_scale is not None:
            x = x * self.embed_scale
        h = rms_norm(x, self.layers[0].input_norm, eps, kern)  # [T, hidden]
        n = len(self.layers)
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            x, h = layer(x, h, batch, kv_cache, kern, self.layers[i + 1].input_norm if i + 1 < n else None)
        return rms_norm(x if batch.attn_last is not None else x[batch.logits_rows], self.norm, eps)  # [B, hidden]

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, hidden] -> logits [B, V] in the model's dtype (the sampler reads bf16 logits directly),
        soft-capped where the model caps them."""
        logits = self.lm_head(hidden)  # [B, V]
        cap = self.cfg.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

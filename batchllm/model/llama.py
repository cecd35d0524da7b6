"""The Llama / Qwen2 / Mistral decoder over a packed, unpadded batch of tokens.

Every step the runner hands `forward` one `ForwardBatch`: the T tokens of all scheduled sequences laid end to end,
their absolute positions, and the attention metadata describing which KV each token sees. There is no global
forward context: everything a layer needs arrives through that object.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from batchllm.config import ModelConfig
from batchllm.model.attention import AttentionMetadata, paged_attention, write_kv
from batchllm.model.cpu_kernels import load_cpu_kernels, load_fused_ops
from batchllm.model.layers import Linear, RotaryTable, add_rms_norm, apply_rotary, gated_mlp, rms_norm


@dataclass
class ForwardBatch:
    """One step's input. `logits_rows` are the rows whose next-token logits are wanted (the samplers' rows).

    `attn_last` (optional) is the attention of the logits rows alone, renumbered 0 .. B-1: the last layer's output of
    any other row feeds nothing, so the last layer writes every row's K/V but attends, projects and runs its MLP for
    the B logits rows only (in a prefill-heavy step that skips most of one layer)."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute positions
    attn: AttentionMetadata
    logits_rows: torch.Tensor  # [B] int64
    attn_last: AttentionMetadata | None = None


class DecoderLayer(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * d

        def param(*shape):
            return torch.nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)

        self.input_norm = param(h)
        self.post_attn_norm = param(h)
        self.qkv = Linear(qkv_out, h, cfg.qkv_bias, dtype, device)
        self.o_proj = Linear(h, cfg.num_heads * d, cfg.o_bias, dtype, device)
        self.gate_up = Linear(2 * cfg.intermediate_size, h, cfg.mlp_bias, dtype, device)
        self.down = Linear(h, cfg.intermediate_size, cfg.mlp_bias, dtype, device)


class LlamaModel(torch.nn.Module):
    """Decoder-only transformer; weights are filled by `batchllm.model.loader.load_weights`."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.embed = torch.nn.Parameter(torch.empty(cfg.vocab_size, cfg.hidden_size, dtype=dtype, device=device),
                                        requires_grad=False)
        self.layers = torch.nn.ModuleList(DecoderLayer(cfg, dtype, device) for _ in range(cfg.num_layers))
        self.norm = torch.nn.Parameter(torch.empty(cfg.hidden_size, dtype=dtype, device=device), requires_grad=False)
        self.lm_head = Linear(cfg.vocab_size, cfg.hidden_size, False, dtype, device)
        if cfg.tie_word_embeddings:  # one tensor, until `pack_weights` gives the head its own packed copy
            self.lm_head.weight = self.embed
        self.rotary = RotaryTable(cfg.rope, cfg.head_dim, cfg.max_model_len, dtype, device)
        self.scale = cfg.head_dim ** -0.5
        # bf16 on CPU: fused C++ element-wise ops (norms, residual adds, rotary + cache write, SiLU * up). On CPU the
        # kernels are built (first use on this machine) or loaded here, not in the first step.
        self.kernels = load_fused_ops(dtype, device)
        if torch.device(device).type == "cpu":
            load_cpu_kernels()

    def pack_weights(self) -> None:
        """Called once the weights are loaded: move every projection and the lm_head into the matmul library's
        packed layout where that applies (`Linear.pack`: bf16 on CPU). With tied embeddings the head then keeps
        its own copy (vocab x hidden more memory); the embedding lookup keeps the plain table."""
        for layer in self.layers:
            for linear in (layer.qkv, layer.o_proj, layer.down):
                linear.pack()
            layer.gate_up.pack(gated=True)  # SiLU(gate) * up in the product's epilogue where the project's gemm runs
        self.lm_head.pack()

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """Run the step, writing this step's K/V into `kv_caches` (one [2, blocks, block_size, KVH, D] per layer),
        and return the logits [B, V] of `batch.logits_rows` in the model's dtype."""
        cfg, kern, eps = self.cfg, self.kernels, self.cfg.rms_norm_eps
        nh, nkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        x = F.embedding(batch.input_ids, self.embed)  # [T, hidden]
        if kern is None:
            cos, sin = self.rotary.lookup(batch.positions)  # [T, 1, D] each
        h = rms_norm(x, self.layers[0].input_norm, eps, kern)  # [T, hidden]
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            qkv = layer.qkv(h)  # [T, (H + 2 KVH) D]
            q, k, v = qkv.split([nh * d, nkv * d, nkv * d], dim=-1)
            q = q.view(-1, nh, d)  # [T, H, D]
            k = k.view(-1, nkv, d)  # [T, KVH, D]
            v = v.view(-1, nkv, d)  # [T, KVH, D]
            if kern is None:
                q, k = apply_rotary(q, k, cos, sin)
            else:  # rotates q, k in place and writes this step's K/V into the cache
                kern.rope_write_kv(q, k, v, self.rotary.cos, self.rotary.sin, batch.positions,
                                   kv_cache.view(2, -1, nkv, d), batch.attn.slots_all)
            if i + 1 == len(self.layers) and batch.attn_last is not None:  # from here on, the logits rows only
                if kern is None:
                    write_kv(k, v, kv_cache, batch.attn)
                x = x.index_select(0, batch.logits_rows)  # [B, hidden]
                q = q.index_select(0, batch.logits_rows)  # [B, H, D]
                o = paged_attention(q, k, v, kv_cache, batch.attn_last, self.scale, kv_written=True)  # [B, H, D]
            else:
                o = paged_attention(q, k, v, kv_cache, batch.attn, self.scale, kv_written=kern is not None)  # [T, H, D]
            o = layer.o_proj(o.reshape(-1, nh * d))  # [T or B, hidden]
            x, h = add_rms_norm(x, o, layer.post_attn_norm, eps, kern)
            mlp = gated_mlp(h, layer.gate_up, layer.down, kern)  # [T or B, hidden]
            if i + 1 < len(self.layers):
                x, h = add_rms_norm(x, mlp, self.layers[i + 1].input_norm, eps, kern)
            else:
                x = x + mlp
        h = rms_norm(x if batch.attn_last is not None else x[batch.logits_rows], self.norm, eps)  # [B, hidden]
        return self.lm_head(h)  # [B, V] in the model's dtype (the sampler reads bf16 logits directly)

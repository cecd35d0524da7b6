"""Frozen configuration objects, built once and never written afterwards.

`ModelConfig.from_hf(dir)` reads a Hugging Face `config.json` (the per-architecture reading is in
`batchllm.architectures`); `EngineConfig` holds the engine's knobs. Neither imports torch, so the planner, scheduler
and job validation can read them before any weight is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

POLICIES = ("batchllm", "fcfs-cache", "lpm-cache", "fcfs")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is "default", "linear", "llama3" or "longrope"."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors within the original context
    long_factor: tuple[float, ...] = ()  # longrope: ... beyond it
    attention_factor: float = 1.0  # cos and sin are multiplied by it (longrope)


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs to know about a checkpoint of a supported decoder architecture.

    Per layer `i`: attention sees the last `layer_windows[i]` keys (None: all), rotated by `local_rope` on windowed
    layers where the model gives those their own (Gemma 3), else by `rope`.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None  # the window of the windowed layers (None: no layer is windowed)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    layer_windows: tuple[int | None, ...] = ()
    local_rope: RopeConfig | None = None
    qk_norm: bool = False  # RMSNorm of each query and key head before the rotation (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # RMSNorm of the attention and MLP outputs too (Gemma 3)
    norm_offset: float = 0.0  # norms scale by (offset + weight) (Gemma: 1)
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" or "gelu_tanh"
    embed_scale: float | None = None  # embeddings multiplied by it (Gemma: sqrt(hidden_size))
    attn_scale: float | None = None  # query scaling (None: head_dim ** -0.5)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    fused_checkpoint: bool = False  # the checkpoint holds qkv_proj and gate_up_proj already fused (Phi-3)

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> ModelConfig:
        """Read `model_dir/config.json`; raise ValueError naming an unsupported architecture or rope type."""
        from batchllm.architectures import read_hf_config

        return read_hf_config(Path(model_dir))

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    def rope_of(self, layer: int) -> RopeConfig:
        return self.local_rope if self.local_rope is not None and self.window(layer) else self.rope

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs. `kv_cache_blocks` is derived from the KV byte budget once, at construction of the LLM."""

    block_size: int = 16
    max_num_batched_tokens: int = 2048
    kv_cache_blocks: int = 0
    policy: str = "batchllm"
    seed: int = 0
    decode_estimate: str = "history"  # "history" (learn from finished requests) or "max_tokens" (never overcommit)

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.decode_estimate not in ("history", "max_tokens"):
            raise ValueError(f"decode_estimate must be 'history' or 'max_tokens', got {self.decode_estimate!r}")

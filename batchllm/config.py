"""Frozen configuration objects, built once and never written afterwards.

`ModelConfig.from_hf(dir)` reads a Hugging Face `config.json`; `EngineConfig` holds the engine's knobs. Neither
imports torch, so the planner, scheduler and job validation can read them before any weight is loaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
POLICIES = ("batchllm", "fcfs-cache", "lpm-cache", "fcfs")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is "default", "linear" or "llama3"."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs to know about a Llama-family checkpoint."""

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
    sliding_window: int | None
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> ModelConfig:
        """Read `model_dir/config.json`; raise ValueError naming an unsupported architecture or rope type."""
        path = Path(model_dir) / "config.json"
        with open(path) as f:
            cfg = json.load(f)
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r} in {path}; batchllm supports {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        qwen2 = arch == "Qwen2ForCausalLM"
        sliding = cfg.get("sliding_window")
        if qwen2 and not cfg.get("use_sliding_window", False):
            sliding = None
        if arch == "LlamaForCausalLM":
            sliding = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(cfg),
            max_model_len=cfg.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", qwen2)),
            qkv_bias=qwen2 or bool(cfg.get("attention_bias", False)),
            o_bias=(not qwen2) and bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes


def _rope_from_hf(cfg: dict) -> RopeConfig:
    scaling = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    theta = float(scaling.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(scaling["factor"]))
    if rope_type == "llama3":
        return RopeConfig(
            theta=theta,
            rope_type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: default, linear, llama3")


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

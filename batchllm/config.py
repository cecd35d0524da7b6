"""The engine's frozen configuration (`EngineConfig`), built once from EngineArgs and never written afterwards; the
model's is `batchllm.model_config.ModelConfig`. No torch."""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("batchllm", "fcfs-cache", "lpm-cache", "fcfs")


@dataclass(frozen=True)
class EngineConfig:
    """The engine's knobs. `kv_cache_blocks` is derived from the KV byte budget once, at construction of the LLM."""

    block_size: int = 16
    max_num_batched_tokens: int = 2048
    kv_cache_blocks: int = 0
    policy: str = "batchllm"
    seed: int = 0
    decode_estimate: str = "history"  # "history" (learn from finished requests) or "max_tokens" (never overcommit)

    @property
    def caching(self) -> bool:
        """The baselines that reuse hashed full prompt blocks (vLLM's and SGLang's automatic prefix caching)."""
        return self.policy in ("fcfs-cache", "lpm-cache")

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.decode_estimate not in ("history", "max_tokens"):
            raise ValueError(f"decode_estimate must be 'history' or 'max_tokens', got {self.decode_estimate!r}")

"""The KV tensors: one `[2, num_blocks, block_size, num_kv_heads, head_dim]` tensor per layer (0 = K, 1 = V)."""

from __future__ import annotations

import numpy as np
import torch

from batchllm.config import ModelConfig

_NUMPY_BY_SIZE = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor. On CPU it comes from numpy's calloc-backed zeros, reinterpreted as `dtype`: the OS hands out
    zero pages lazily, so a large KV budget costs memory only as blocks are used (torch.zeros writes every page up
    front: 6 GB and ~14 s for the default budget here). All-zero bits are 0.0 in every float dtype."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(shape, dtype=_NUMPY_BY_SIZE[size])).view(dtype)


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.layers = [_zeros(shape, dtype, device) for _ in range(cfg.num_layers)]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return block_size * cfg.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())

    @classmethod
    def blocks_for_budget(cls, cfg: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
        """The most blocks whose tensors fit in `budget_bytes` (the budget is never exceeded)."""
        return budget_bytes // cls.bytes_per_block(cfg, block_size, dtype)

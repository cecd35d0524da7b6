"""The KV tensors: one `[2, num_blocks, block_size, num_kv_heads, head_dim]` tensor per layer (0 = K, 1 = V)."""

from __future__ import annotations

import numpy as np
import torch

from batchllm.model_config import ModelConfig

_NUMPY_BY_SIZE = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, commit: bool) -> torch.Tensor:
    """A zero tensor. On CPU without `commit` it comes from numpy's calloc-backed zeros, reinterpreted as `dtype`:
    the OS hands out zero pages lazily, so a large KV budget costs memory only as blocks are used, and each new 4 KiB
    page costs a fault on its first write, in the middle of a step (~0.5 GB/s on this VM). With `commit`, every page
    is written now (torch.zeros), as vLLM does: start-up pays for the whole budget (~1 GB/s here, 2 threads) and the
    run pays nothing. All-zero bits are 0.0 in every float dtype."""
    if device.type != "cpu" or commit:
        return torch.zeros(shape, dtype=dtype, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(shape, dtype=_NUMPY_BY_SIZE[size])).view(dtype)


class KVCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 commit: bool = False):
        """`commit`: write every page of the CPU cache now rather than on first use (see `_zeros`)."""
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.dtype = dtype
        self.device = device
        self.committed = commit or device.type != "cpu"  # every page written at construction
        shape = (2, num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.layers = [_zeros(shape, dtype, device, commit) for _ in range(cfg.num_layers)]

    @staticmethod
    def bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return block_size * cfg.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())

    @classmethod
    def blocks_for_budget(cls, cfg: ModelConfig, budget_bytes: int, block_size: int, dtype: torch.dtype) -> int:
        """The most blocks whose tensors fit in `budget_bytes` (the budget is never exceeded)."""
        return budget_bytes // cls.bytes_per_block(cfg, block_size, dtype)

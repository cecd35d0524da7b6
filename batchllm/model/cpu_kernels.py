"""The project's own CPU kernels (C++ with OpenMP), compiled on first use with torch's extension builder and cached
per machine. `ragged_attention()` returns None where no compiler is available; callers then use a torch path."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path

_SRC = Path(__file__).parent / "csrc" / "ragged_attention.cpp"


@functools.cache
def load_ragged_attention():
    """The compiled `ragged_attention` function, or None (with one warning) when it cannot be built.
    Set BATCHLLM_NO_CPP=1 to force the torch-only path."""
    if os.environ.get("BATCHLLM_NO_CPP") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        cache = Path(os.environ.get("BATCHLLM_CACHE", Path.home() / ".cache" / "batchllm")) / "torch_extensions"
        cache.mkdir(parents=True, exist_ok=True)
        flags = ["-O3", "-fopenmp", "-march=native", "-ffast-math"]
        module = load(name="batchllm_ragged_attention", sources=[str(_SRC)], extra_cflags=flags,
                      extra_ldflags=["-fopenmp"], build_directory=str(cache), verbose=False)
        return module.ragged_attention
    except Exception as e:  # no compiler, no ninja, ...: fall back, loudly once
        print(f"batchllm: the CPU attention kernel could not be built ({e}); using the slower torch path",
              file=sys.stderr)
        warnings.warn(f"batchllm CPU kernel unavailable: {e}", stacklevel=2)
        return None

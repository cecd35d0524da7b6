"""The project's own CPU kernels (C++ with OpenMP), compiled on first use with torch's extension builder and cached
per machine: paged attention over ragged parts (`csrc/ragged_attention.cpp`), the fused bf16 element-wise ops of a
decoder layer (`csrc/fused_ops.cpp`) and the bf16 matrix product of the projections (`csrc/gemm.cpp`). The loaders
return None where no compiler is available; callers then use a torch path."""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / "bindings.cpp", _CSRC / "ragged_attention.cpp", _CSRC / "fused_ops.cpp", _CSRC / "gemm.cpp"]
_HEADERS = [_CSRC / "simd.h"]


@functools.cache
def load_cpu_kernels():
    """The compiled extension module, or None (with one warning) when it cannot be built.
    Set BATCHLLM_NO_CPP=1 to force the torch-only path."""
    if os.environ.get("BATCHLLM_NO_CPP") == "1":
        return None
    try:
        import fcntl

        from torch.utils.cpp_extension import load

        cache = Path(os.environ.get("BATCHLLM_CACHE", Path.home() / ".cache" / "batchllm")) / "torch_extensions"
        cache.mkdir(parents=True, exist_ok=True)
        # torch rebuilds when the sources or flags change; the headers' hash in a flag covers header edits too
        header_hash = hashlib.sha1(b"".join(h.read_bytes() for h in _HEADERS)).hexdigest()[:12]
        flags = ["-O3", "-fopenmp", "-march=native", "-ffast-math", f"-DBATCHLLM_HEADERS={header_hash}"]
        with open(cache / "batchllm.lock", "w") as lock:
            # torch serialises builds with a lock file that a process killed mid-load leaves behind, and every later
            # load then waits for it forever. Our flock dies with its holder; while we hold it no other batchllm
            # process is inside load(), so a torch lock file present now is stale.
            fcntl.flock(lock, fcntl.LOCK_EX)
            (cache / "lock").unlink(missing_ok=True)
            return load(name="batchllm_cpu_kernels", sources=[str(s) for s in _SOURCES], extra_cflags=flags,
                        extra_include_paths=[str(_CSRC)], extra_ldflags=["-fopenmp"], build_directory=str(cache),
                        verbose=False)
    except Exception as e:  # no compiler, no ninja, ...: fall back, loudly once
        print(f"batchllm: the CPU kernels could not be built ({e}); using the slower torch path", file=sys.stderr)
        warnings.warn(f"batchllm CPU kernels unavailable: {e}", stacklevel=2)
        return None


def load_ragged_attention():
    """The compiled `ragged_attention` function, or None when the kernels cannot be built."""
    module = load_cpu_kernels()
    return None if module is None else module.ragged_attention


def has_bf16_kernels() -> bool:
    """Whether the AVX512-BF16 kernels were built: the bf16 attention path for every part and the fused ops."""
    module = load_cpu_kernels()
    return module is not None and module.fused_ops_available()


def load_fused_ops(dtype, device):
    """The compiled module when its fused element-wise ops apply (bf16 on a CPU with AVX512-BF16), else None."""
    import torch

    if dtype != torch.bfloat16 or torch.device(device).type != "cpu":
        return None
    return load_cpu_kernels() if has_bf16_kernels() else None

"""The project's own CPU kernels (C++ with OpenMP), compiled on first use with torch's extension builder, once per
kernel path (ISA, see `batchllm.machine`) and cached per machine: paged attention over ragged parts
(`csrc/ragged_attention.cpp`), the fused element-wise ops of a decoder layer (`csrc/fused_ops.cpp`) and the matrix
product of the projections, over bf16 or fp32 weights (`csrc/gemm.cpp`). Each path is its own module built from the
same sources with that path's compiler flags; the engine loads the one `machine.selected_isa()` names. The loaders
return None where no compiler is available; callers then use a torch path."""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path

from batchllm.machine import ISAS, cache_root, isa_cflags, resolve_dtype, selected_isa

_CSRC = Path(__file__).parent / "csrc"
_SOURCES = [_CSRC / name for name in ("bindings.cpp", "ragged_attention.cpp", "attention_f32.cpp", "fused_ops.cpp",
                                      "gemm.cpp")]
_HEADERS = sorted(_CSRC.glob("*.h"))


def load_cpu_kernels(isa: str | None = None):
    """The compiled extension module of kernel path `isa` (default: the selected one), or None (with one warning)
    when it cannot be built. Set BATCHLLM_NO_CPP=1 to force the torch-only path."""
    if os.environ.get("BATCHLLM_NO_CPP") == "1":
        return None
    return _load(isa or selected_isa())


@functools.cache
def _load(isa: str):
    if isa not in ISAS:
        raise ValueError(f"unknown kernel path {isa!r}; one of {', '.join(ISAS)}")
    try:
        import fcntl

        from torch.utils.cpp_extension import load

        cache = cache_root() / "torch_extensions" / isa
        cache.mkdir(parents=True, exist_ok=True)
        # torch rebuilds when the sources or flags change; the headers' hash in a flag covers header edits too
        header_hash = hashlib.sha1(b"".join(h.read_bytes() for h in _HEADERS)).hexdigest()[:12]
        # -ffast-math for the vector paths only: the portable build (any CPU, the fallback) keeps IEEE semantics; with
        # fast-math its fp32 attention put a prompt logprob 1.05e-5 from HF's (the vector builds stay within 1e-5)
        fast = [] if isa == "portable" else ["-ffast-math"]
        flags = ["-O3", "-fopenmp", *isa_cflags(isa), *fast, f"-DBATCHLLM_HEADERS={header_hash}"]
        with open(cache / "batchllm.lock", "w") as lock:
            # torch serialises builds with a lock file that a process killed mid-load leaves behind, and every later
            # load then waits for it forever. Our flock dies with its holder; while we hold it no other batchllm
            # process is inside load(), so a torch lock file present now is stale.
            fcntl.flock(lock, fcntl.LOCK_EX)
            (cache / "lock").unlink(missing_ok=True)
            module = load(name=f"batchllm_cpu_{isa}", sources=[str(s) for s in _SOURCES], extra_cflags=flags,
                          extra_include_paths=[str(_CSRC)], extra_ldflags=["-fopenmp"], build_directory=str(cache),
                          verbose=False)
        if module.isa() != isa:
            raise RuntimeError(f"the {isa} build reports {module.isa()!r}: the compiler ignored its flags")
        return module
    except Exception as e:  # no compiler, no ninja, ...: fall back, loudly once
        print(f"batchllm: the {isa} CPU kernels could not be built ({e}); using the slower torch path",
              file=sys.stderr)
        warnings.warn(f"batchllm CPU kernels ({isa}) unavailable: {e}", stacklevel=2)
        return None


def load_ragged_attention(isa: str | None = None):
    """The compiled `ragged_attention` function, or None when the kernels cannot be built."""
    module = load_cpu_kernels(isa)
    return None if module is None else module.ragged_attention


def has_bf16_kernels(isa: str | None = None) -> bool:
    """Whether kernel path `isa` (default: the selected one) runs a bf16 model in the project's kernels: the gemm of
    the projections, the bf16 attention for every part and the fused element-wise ops."""
    module = load_cpu_kernels(isa)
    return module is not None and module.bf16_kernels()


def load_fused_ops(dtype, device):
    """The compiled module when its fused element-wise ops apply (a bf16 or fp32 model on a CPU whose selected path
    has the vector kernels), else None."""
    import torch

    if dtype not in (torch.bfloat16, torch.float32) or torch.device(device).type != "cpu":
        return None
    return load_cpu_kernels() if has_bf16_kernels() else None


def run_dtype(dtype, device):
    """The torch dtype of a run on `device` (see `machine.resolve_dtype`): "auto" is bf16 where the selected kernel
    path has the bf16 kernels (so bf16 beats fp32 on this CPU) and on CUDA, else fp32. On a CPU, a half-precision
    dtype with no fast path here (fp16 always; bf16 without the kernels) would run torch's reference kernels, orders
    of magnitude slower: it runs fp32 instead, said once."""
    import torch

    cpu = getattr(device, "type", str(device)) == "cpu"
    fast = cpu and has_bf16_kernels()
    resolved = resolve_dtype(dtype, device, bf16_fast=dtype == "auto" and fast)
    if cpu and resolved in (torch.float16, torch.bfloat16) and not (resolved == torch.bfloat16 and fast):
        _say_once(f"batchllm: {str(resolved).removeprefix('torch.')} has no fast path on this CPU (kernel path "
                  f"{selected_isa()}{', kernels not built' if load_cpu_kernels() is None else ''}); running float32")
        return torch.float32
    return resolved


@functools.cache
def _say_once(message: str) -> None:
    print(message, file=sys.stderr)

"""What this machine is, in one place: the CPU and its instruction sets, the kernel path (ISA) the engine uses, the
device, the dtype `auto` resolves to, and the memory there is for the KV cache.

Kernel paths, lowest to highest (each CPU runs every path up to its own):

    portable     plain C++ (any CPU): fp32 attention loops only; bf16 runs on torch
    avx2         AVX2 + FMA (x86-64-v3: Haswell, AMD Zen 1-3): bf16 weights and KV, fp32 arithmetic
    avx512       AVX-512 F/BW/VL/DQ (x86-64-v4: Skylake-X, Zen 4-5): the same kernels in 16 lanes
    avx512bf16   AVX-512 with AVX512-BF16 (Cooper Lake, Zen 4-5): bf16 dot products (vdpbf16ps)

`BATCHLLM_ISA=portable|avx2|avx512|avx512bf16` forces a lower path than the CPU's own, so every path can run (and be
tested) on one machine; naming a path the CPU cannot run is an error. Importing this module does not import torch.
"""

from __future__ import annotations

import functools
import os
import platform as _platform
from pathlib import Path

ISAS = ("portable", "avx2", "avx512", "avx512bf16")

# /proc/cpuinfo flags each path needs (the x86-64-v3 and -v4 levels its build targets, plus BF16).
_ISA_FLAGS = {
    "portable": (),
    "avx2": ("avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe"),
    "avx512": ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "avx512f", "avx512bw", "avx512vl", "avx512dq",
               "avx512cd"),
    "avx512bf16": ("avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                   "avx512cd", "avx512_bf16"),
}
# Compiler flags of each path's build (x86-64; elsewhere only "portable" exists and builds for the host). The kernels
# build with -ffast-math, under which GCC turns vector divisions into a reciprocal estimate (vrcpps) that flushes
# tiny results to 0 on AVX2: -mno-recip keeps divisions exact.
ISA_CFLAGS = {
    "portable": ("-march=x86-64", "-mtune=generic", "-mno-recip"),
    "avx2": ("-march=x86-64-v3", "-mtune=generic", "-mno-recip"),
    "avx512": ("-march=x86-64-v4", "-mtune=generic", "-mno-recip"),
    "avx512bf16": ("-march=x86-64-v4", "-mavx512bf16", "-mtune=generic", "-mno-recip"),
}


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        info[key.strip()] = value.strip()
    return info


@functools.cache
def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo().get("flags", "").split())


def cpu_name() -> str:
    """The CPU's model name, e.g. 'AMD EPYC 7B13' ('unknown CPU' where it cannot be read)."""
    return _cpuinfo().get("model name") or _platform.processor() or "unknown CPU"


def is_x86_64() -> bool:
    return _platform.machine().lower() in ("x86_64", "amd64")


@functools.cache
def native_isa() -> str:
    """The highest kernel path this CPU runs (probed once: the engine asks at every kernel call)."""
    if not is_x86_64():
        return "portable"
    flags = cpu_flags()
    best = "portable"
    for isa in ISAS:
        if all(f in flags for f in _ISA_FLAGS[isa]):
            best = isa
    return best


def runnable_isas() -> tuple[str, ...]:
    """Every kernel path this CPU runs, lowest first (what the kernel tests cover)."""
    return ISAS[: ISAS.index(native_isa()) + 1]


def selected_isa() -> str:
    """The kernel path the engine uses: the CPU's own, or the lower one `BATCHLLM_ISA` names.

    Raises ValueError for an unknown name or a path this CPU cannot run."""
    forced = os.environ.get("BATCHLLM_ISA", "").strip().lower()
    native = native_isa()
    if not forced:
        return native
    if forced not in ISAS:
        raise ValueError(f"BATCHLLM_ISA={forced!r} is not one of {', '.join(ISAS)}")
    if ISAS.index(forced) > ISAS.index(native):
        raise ValueError(f"BATCHLLM_ISA={forced} needs a CPU this one is not ({cpu_name()} runs up to {native})")
    return forced


def isa_cflags(isa: str) -> list[str]:
    """Compiler flags of a kernel path's build."""
    return list(ISA_CFLAGS[isa]) if is_x86_64() else []


def cache_root() -> Path:
    """Where batchllm keeps what it builds and fetches (kernels, converted models): `$BATCHLLM_CACHE`, else
    `~/.cache/batchllm` (not created here)."""
    env = os.environ.get("BATCHLLM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "batchllm"


# ------------------------------------------------------------------------------------------- device, dtype, memory
def resolve_device(device: str):
    """'auto' -> CUDA where torch sees a GPU, else CPU; any other name as torch reads it."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16",
                "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def resolve_dtype(dtype, device, bf16_fast: bool = False):
    """The torch dtype of a run. 'auto': bf16 on CUDA, and on a CPU where `bf16_fast` (the selected kernel path
    runs a bf16 model entirely in the project's kernels: `cpu_kernels.run_dtype` asks), else fp32."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or bf16_fast else torch.float32
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPE_NAMES)}, got {dtype!r}")
    return getattr(torch, _DTYPE_NAMES[dtype])


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes, or None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


def default_kv_budget(device) -> int:
    """A sensible share of free memory for the KV cache: 80% of free GPU memory, or 25% of available RAM."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.8)
    available = available_memory()
    return 2 << 30 if available is None else int(available * 0.25)


def describe(device=None, dtype=None) -> dict:
    """What a run reports about where it ran: CPU, kernel path, device and dtype (the demo, `run`'s summary,
    --stats-json and the benchmarks print this)."""
    out = {"cpu": cpu_name(), "isa": selected_isa(), "native_isa": native_isa()}
    if device is not None:
        out["device"] = str(device)
    if dtype is not None:
        out["dtype"] = str(dtype).replace("torch.", "")
    return out

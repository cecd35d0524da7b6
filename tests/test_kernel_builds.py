"""A kernel path that fails to build falls back to torch, and its tests skip: on a machine with a compiler that would
hide a broken kernel source, so here a failed build of any path this CPU runs is a failure."""

from __future__ import annotations

import os
import shutil

import pytest

from batchllm.machine import runnable_isas
from batchllm.model.cpu_kernels import load_cpu_kernels


def _have_compiler() -> bool:
    try:
        import ninja  # noqa: F401  (torch's cpp_extension builds with it)
    except ImportError:
        return False
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.mark.skipif(not _have_compiler(), reason="no C++ compiler or ninja: the kernels fall back to torch here")
@pytest.mark.parametrize("isa", runnable_isas())
def test_every_kernel_path_this_cpu_runs_builds(isa, monkeypatch):
    monkeypatch.delenv("BATCHLLM_NO_CPP", raising=False)
    module = load_cpu_kernels(isa)
    assert module is not None, f"the {isa} kernels failed to build (see the warning above)"
    assert module.isa() == isa


@pytest.mark.skipif(not _have_compiler(), reason="no C++ compiler or ninja: the kernels fall back to torch here")
@pytest.mark.parametrize("isa", runnable_isas())
def test_peak_flops_measures_the_vector_paths_only(isa):
    """The arithmetic peak the gemm benchmark divides by: positive on a path with vectors, 0 on the portable one."""
    peak = load_cpu_kernels(isa).peak_flops(1000)
    assert (peak > 0) == (isa != "portable"), peak

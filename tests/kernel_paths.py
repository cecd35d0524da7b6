"""The kernel paths (ISAs, see `batchllm.machine`) a test runs on: every path this CPU can execute, each built and
tested on its own. A path is skipped, with the reason, only where this CPU cannot run it, it could not be built, or
it lacks the kernels under test; a path this CPU runs is never skipped silently."""

from __future__ import annotations

import functools

import pytest

from batchllm.machine import ISAS, cpu_name, runnable_isas
from batchllm.model.cpu_kernels import has_bf16_kernels, load_cpu_kernels


@functools.cache
def _skip_reason(isa: str, need_bf16: bool) -> str | None:
    if isa not in runnable_isas():
        return f"this CPU ({cpu_name()}) cannot run the {isa} path"
    if load_cpu_kernels(isa) is None:
        return f"the {isa} kernels could not be built here (no compiler?)"
    if need_bf16 and not has_bf16_kernels(isa):
        return f"the {isa} path has no bf16 kernels (by design: bf16 runs on torch there)"
    return None


def isa_params(need_bf16: bool = True) -> list:
    """pytest params, one per kernel path, skipped with the reason where that path cannot be tested here."""
    out = []
    for isa in ISAS:
        reason = _skip_reason(isa, need_bf16)
        out.append(pytest.param(isa, id=isa, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return out


def bf16_isas() -> list[str]:
    """The paths this machine can test that have the bf16 kernels."""
    return [isa for isa in ISAS if _skip_reason(isa, True) is None]

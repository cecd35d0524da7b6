"""Sampling parameters, vLLM-shaped: names, defaults and ranges as vLLM's, validated on construction. No torch.

How the sampler applies them, step by step, is documented in `batchllm.sampler`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

SAMPLING_EPS = 1e-5  # temperatures below this are greedy (as in vLLM)
MAX_LOGPROBS = 20
MAX_N = 1024  # samples per request: more is not one request but a job of its own

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's completions (vLLM's names, defaults and ranges).

    ``stop`` is normalised to a tuple of str and ``stop_token_ids`` to a tuple of int. ``temperature`` 0 means
    greedy; ``top_k`` 0 or -1 means all tokens. Invalid values raise ``ValueError`` naming the field.

    ``prompt_logprobs=k``: the output's ``prompt_logprobs`` holds, per prompt position, the logprob of the actual
    token and the k most likely ones (None at position 0), as vLLM's. batchllm extension: ``prompt_logprobs_from``,
    the first position that gets one (the scoring API's continuation start; earlier ones are None and never reach
    the lm_head), and ``max_tokens=0`` with prompt logprobs: score the prompt, generate nothing.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None
    prompt_logprobs_from: int = 1

    def __post_init__(self) -> None:
        """Validate every field; rewrite ``stop``/``stop_token_ids`` as tuples and numbers as float where needed."""
        self._check_int("n", minimum=1)
        if self.n > MAX_N:
            raise ValueError(f"n must be <= {MAX_N}, got {self.n}")
        self._check_float("temperature")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        self._check_float("top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        self._check_int("top_k")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled), 0 (disabled) or >= 1, got {self.top_k}")
        self._check_float("min_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.prompt_logprobs is not None:
            self._check_int("prompt_logprobs", minimum=0)
            if self.prompt_logprobs > MAX_LOGPROBS:
                raise ValueError(f"prompt_logprobs must be <= {MAX_LOGPROBS}, got {self.prompt_logprobs}")
        self._check_int("prompt_logprobs_from", minimum=1)
        self._check_int("max_tokens", minimum=0 if self.prompt_logprobs is not None else 1)
        self._check_int("min_tokens", minimum=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        object.__setattr__(self, "stop", _normalise_stop(self.stop))
        object.__setattr__(self, "stop_token_ids", _normalise_stop_token_ids(self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if self.logprobs is not None:
            self._check_int("logprobs", minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise ValueError(f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            self._check_float(name)
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        self._check_float("repetition_penalty")
        if not self.repetition_penalty > 0.0 or math.isinf(self.repetition_penalty):
            raise ValueError(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}")
        if not isinstance(self.skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens must be a bool, got {self.skip_special_tokens!r}")

    def _check_int(self, name: str, minimum: int | None = None) -> None:
        value = getattr(self, name)
        if not _is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")

    def _check_float(self, name: str) -> None:
        """Check ``name`` is a finite real number and store it as a float."""
        value = getattr(self, name)
        if not _is_number(value) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        object.__setattr__(self, name, float(value))

    @property
    def is_greedy(self) -> bool:
        """True when this request takes the argmax (temperature below 1e-5, as in vLLM)."""
        return self.temperature < SAMPLING_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0


def _normalise_stop(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, Sequence):
        raise ValueError(f"stop must be a str, a sequence of str or None, got {stop!r}")
    for s in stop:
        if not isinstance(s, str):
            raise ValueError(f"stop must contain only str, got {s!r}")
        if not s:
            raise ValueError("stop strings must be non-empty")
    return tuple(stop)


def _normalise_stop_token_ids(ids) -> tuple[int, ...]:
    if ids is None:
        return ()
    if isinstance(ids, str | bytes) or not isinstance(ids, Sequence):
        raise ValueError(f"stop_token_ids must be a sequence of int or None, got {ids!r}")
    for t in ids:
        if not _is_int(t) or t < 0:
            raise ValueError(f"stop_token_ids must contain only ints >= 0, got {t!r}")
    return tuple(ids)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from ``parts`` (stable across runs and machines; blake2b of their repr).

    The engine uses it for requests without a seed (``derive_seed(engine_seed, request_index)``) and to give the
    ``n`` samples of one request distinct streams (``derive_seed(request_seed, sample_index)``).
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1

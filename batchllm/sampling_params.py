"""Sampling parameters, vLLM-shaped: names, defaults and ranges as vLLM's, validated on construction. No torch.

How the sampler applies them, step by step, is documented in `batchllm.sampler`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    structured_outputs: StructuredOutputsParams | None = None

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
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError(f"structured_outputs must be a StructuredOutputsParams, got {self.structured_outputs!r}")

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


@dataclass(frozen=True)
class StructuredOutputsParams:
    """A constraint on the generated text (vLLM's StructuredOutputsParams): exactly one of

    ``json``         a JSON schema (a dict, or its JSON text): the output is one JSON value valid under it;
    ``json_object``  True: the output is any JSON object;
    ``regex``        the output matches this regular expression (whole output);
    ``choice``       the output is exactly one of these strings;
    ``grammar``      a context-free grammar, in Lark syntax or GBNF (llama.cpp's, recognised by ``::=``).

    ``disable_any_whitespace``: JSON without free whitespace between tokens (compact output). Grammars compile
    with llguidance, once per distinct constraint text per engine; a constraint that cannot compile fails its
    request alone. EOS is allowed only where the grammar accepts, and the output ends where the grammar cannot
    go on. Validated on construction (ValueError naming the field); the grammar itself is checked by the engine.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: Sequence[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar or json_object, "
                             f"got {given or 'none'}")
        if self.json is not None:
            schema = self.json
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as e:
                    raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
            if not isinstance(schema, dict | bool):
                raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(schema).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            if isinstance(self.choice, str) or not isinstance(self.choice, Sequence) or not self.choice:
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            if not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("structured_outputs.choice must hold non-empty strings only")
            object.__setattr__(self, "choice", tuple(self.choice))
        if not isinstance(self.json_object, bool) or not isinstance(self.disable_any_whitespace, bool):
            raise ValueError("structured_outputs.json_object and disable_any_whitespace must be booleans")

    @functools.cached_property
    def key(self) -> tuple[str, str, bool]:
        """(kind, canonical text, compact): equal keys compile to the same grammar (computed once)."""
        if self.json is not None:
            schema = json.loads(self.json) if isinstance(self.json, str) else self.json
            return "json", json.dumps(schema, sort_keys=True, separators=(",", ":")), self.disable_any_whitespace
        if self.json_object:
            return "json", '{"type":"object"}', self.disable_any_whitespace
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice)), False
        if self.regex is not None:
            return "regex", self.regex, False
        return "grammar", str(self.grammar), False

    @classmethod
    def from_dict(cls, value: Any) -> StructuredOutputsParams:
        """From the JSON form (a batch line's body.structured_outputs). Raises ValueError naming the field."""
        if not isinstance(value, dict):
            raise ValueError("structured_outputs must be an object")
        known = {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"structured_outputs: unsupported field(s) {', '.join(unknown)}")
        return cls(**value)


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

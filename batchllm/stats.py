"""What a batch run reports: `RunStats` (typed; also readable as `stats["name"]`) and `StepTrace`, a bounded record of
its steps. No torch."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

TRACE_KEYS = ("prefill_tokens", "decode_tokens", "num_seqs", "kv_blocks_used")


@dataclass
class StepTrace:
    """At most `max_bins` bins, each summing consecutive steps (tokens, sequences; the peak of KV blocks in use);
    when full, neighbouring bins merge in pairs, so memory stays bounded for any number of steps. A bin:
    {"t0", "t", "steps", "prefill_tokens", "decode_tokens", "num_seqs", "kv_blocks_used"}; t in seconds."""

    max_bins: int = 2048
    steps_per_bin: int = 1
    bins: list[dict[str, float]] = field(default_factory=list)

    def add(self, t: float, prefill_tokens: int, decode_tokens: int, num_seqs: int, kv_blocks_used: int,
            steps: int = 1, t0: float | None = None) -> None:
        last = self.bins[-1] if self.bins else None
        if last is None or last["steps"] >= self.steps_per_bin:
            last = {"t0": t if t0 is None else t0, "t": t, "steps": 0, "prefill_tokens": 0, "decode_tokens": 0,
                    "num_seqs": 0, "kv_blocks_used": 0}
            self.bins.append(last)
        last["t"] = t
        last["steps"] += steps
        last["prefill_tokens"] += prefill_tokens
        last["decode_tokens"] += decode_tokens
        last["num_seqs"] += num_seqs
        last["kv_blocks_used"] = max(last["kv_blocks_used"], kv_blocks_used)
        if len(self.bins) > self.max_bins:
            self._halve()

    def extend(self, bins: Iterable[dict], t_offset: float) -> None:
        """Append another trace's bins, their times shifted by `t_offset` seconds."""
        for b in bins:
            self.add(float(b["t"]) + t_offset, int(b["prefill_tokens"]), int(b["decode_tokens"]), int(b["num_seqs"]),
                     int(b["kv_blocks_used"]), int(b.get("steps", 1)), float(b.get("t0", b["t"])) + t_offset)

    def _halve(self) -> None:
        merged = []
        for i in range(0, len(self.bins), 2):
            a = self.bins[i]
            if i + 1 < len(self.bins):
                b = self.bins[i + 1]
                a = {"t0": a["t0"], "t": b["t"], "steps": a["steps"] + b["steps"],
                     "prefill_tokens": a["prefill_tokens"] + b["prefill_tokens"],
                     "decode_tokens": a["decode_tokens"] + b["decode_tokens"],
                     "num_seqs": a["num_seqs"] + b["num_seqs"],
                     "kv_blocks_used": max(a["kv_blocks_used"], b["kv_blocks_used"])}
            merged.append(a)
        self.bins = merged
        self.steps_per_bin *= 2

    def __len__(self) -> int:
        return len(self.bins)


@dataclass
class RunStats:
    """Figures of one generate call, updated as it runs (`LLM.progress`) and final when it ends (`LLM.stats()`).
    Token counts: `prompt_tokens` are the prompts' tokens once per sample (n of them for a request with n > 1:
    what an engine without any prefix reuse computes), `computed_prompt_tokens` those the engine computed (the
    difference is what prefix sharing saved; never negative but for recomputation after a preemption)."""

    num_requests: int = 0
    num_errors: int = 0
    requests_done: int = 0
    prompt_tokens: int = 0
    computed_prompt_tokens: int = 0
    output_tokens: int = 0
    elapsed_s: float = 0.0
    steps: int = 0
    preemptions: int = 0
    kv_blocks_used: int = 0
    peak_kv_blocks: int = 0
    kv_blocks_total: int = 0
    num_running: int = 0
    num_waiting: int = 0
    policy: str = ""
    plan: dict = field(default_factory=dict)  # the prefix planner's figures (PlanStats.to_dict())
    trace: StepTrace = field(default_factory=StepTrace)

    def __getitem__(self, name: str) -> Any:
        """`stats["computed_prompt_tokens"]` reads as `stats.computed_prompt_tokens` (the trace as its bins)."""
        if name not in self.__dataclass_fields__:
            raise KeyError(name)
        return self.trace.bins if name == "trace" else getattr(self, name)

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self.__dataclass_fields__ else default

    def to_dict(self) -> dict:
        out = asdict(self)
        out["trace"] = list(self.trace.bins)
        return out

"""Every engine option, once: its default, its check, its command-line flag and its help. The Python API
(`LLM(model, **options)`), `batchllm run`, `batchllm demo`, Ray workers and the benchmarks all read them from here.
No torch.

    EngineArgs(model="smollm2-135m-instruct", dtype="float32")     checks every field (ValueError naming it)
    EngineArgs.add_cli_args(parser)                                adds --dtype, --kv-cache-memory-bytes, ...
    EngineArgs.from_cli_args(namespace, model)                     the options a command line set
    args.engine_config(kv_cache_blocks)                            the frozen EngineConfig of the scheduler
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any

from batchllm.config import POLICIES, EngineConfig

DTYPES = ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "float")
PLAN_MODES = ("nested", "one-level", "none")


def _opt(default, help: str, choices: tuple | None = None, cli_type=None):
    return field(default=default, metadata={"help": help, "choices": choices, "type": cli_type})


@dataclass(frozen=True)
class EngineArgs:
    model: str = field(metadata={"help": "an HF model folder, a .gguf file (or a folder holding one), "
                                         "smollm2-135m-instruct, or a hub id"})
    dtype: str = _opt("auto", "auto (bf16 where this CPU's kernels make it fast, and on CUDA; else fp32), float32, "
                              "bfloat16", DTYPES)
    device: str = _opt("auto", "auto, cpu, cuda, cuda:N")
    kv_cache_memory_bytes: int | None = _opt(None, "exact KV cache budget in bytes (default: 25%% of available "
                                                   "RAM, or 80%% of free GPU memory)", cli_type=int)
    kv_cache_commit: str = _opt("auto", "CPU: write the KV cache's pages at start-up (upfront) or as blocks fill "
                                        "(lazy); auto: upfront for an explicit budget", ("auto", "upfront", "lazy"))
    block_size: int = _opt(16, "tokens per KV block", cli_type=int)
    max_num_batched_tokens: int = _opt(2048, "token budget of one step (prefill chunks and decodes)", cli_type=int)
    max_model_len: int | None = _opt(None, "context length (default: the model's; a longrope model's original one)",
                                     cli_type=int)
    policy: str = _opt("batchllm", "scheduling policy: batchllm (global prefix plan), or the baselines fcfs-cache "
                                   "(vLLM-like), lpm-cache (SGLang-like), fcfs", POLICIES)
    decode_estimate: str = _opt("history", "expected output length for admission: history (learned from finished "
                                           "requests) or max_tokens", ("history", "max_tokens"))
    max_num_seqs: int = _opt(256, "request cap of the baseline policies (batchllm admits by memory)", cli_type=int)
    plan_mode: str = _opt("nested", "prefix plan: nested groups, one-level, or none", PLAN_MODES)
    seed: int = _opt(0, "seed of requests that set none (each gets one derived from it)", cli_type=int)

    def __post_init__(self):
        if not isinstance(self.model, str) or not self.model:
            object.__setattr__(self, "model", str(self.model))
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        for name in ("block_size", "max_num_batched_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("kv_cache_memory_bytes", "max_model_len"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")

    @property
    def plan(self) -> str:
        """The prefix plan actually used: the baselines plan nothing."""
        return self.plan_mode if self.policy == "batchllm" else "none"

    def engine_config(self, kv_cache_blocks: int) -> EngineConfig:
        return EngineConfig(block_size=self.block_size, max_num_batched_tokens=self.max_num_batched_tokens,
                            kv_cache_blocks=kv_cache_blocks, policy=self.policy, seed=self.seed,
                            decode_estimate=self.decode_estimate)

    def options(self) -> dict[str, Any]:
        """The fields other than `model` that differ from their defaults (what a worker needs to rebuild this)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "model" and getattr(self, f.name) != f.default}

    def with_options(self, **changes: Any) -> EngineArgs:
        return replace(self, **changes)

    # ------------------------------------------------------------------ command line
    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup, defaults: dict | None = None,
                     skip: tuple[str, ...] = ("model",)) -> None:
        """Add a flag per option (--dtype, --kv-cache-memory-bytes, ...). Unset flags stay None, so that
        `from_cli_args` passes on only what the command line set; `defaults` overrides a flag's default."""
        for f in fields(EngineArgs):
            if f.name in skip:
                continue
            default = (defaults or {}).get(f.name)
            shown = default if default is not None else (None if f.default is MISSING else f.default)
            kwargs: dict[str, Any] = {"default": default, "help": f"{f.metadata['help']} (default: {shown})"}
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if f.metadata.get("type"):
                kwargs["type"] = f.metadata["type"]
            parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)

    @classmethod
    def cli_options(cls, namespace: argparse.Namespace) -> dict[str, Any]:
        """The options set on a command line parsed with `add_cli_args`."""
        return {f.name: getattr(namespace, f.name) for f in fields(cls)
                if f.name != "model" and getattr(namespace, f.name, None) is not None}

    @classmethod
    def from_cli_args(cls, namespace: argparse.Namespace, model: str) -> EngineArgs:
        return cls(model=model, **cls.cli_options(namespace))

    @classmethod
    def default(cls, name: str) -> Any:
        """The default of option `name`."""
        return next(f.default for f in fields(cls) if f.name == name)

"""What every engine runner shares: the command line, reading workloads, timing, writing the result JSON.

Standard library only: each runner runs in its own venv (vLLM's, HF's, the project's) and imports this file from its
own folder. A runner loads its engine once per distinct KV budget, runs one small unrelated warm-up pass, then times
each workload's `generate` call alone (load, compile and warm-up are not timed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path


def parse_args(description: str, extra: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The runners' common flags (plus the runner's own via `extra`); parses sys.argv."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help="HF folder of the checkpoint")
    ap.add_argument("--workload", action="append", required=True, help="workload JSON file (repeatable)")
    ap.add_argument("--out-dir", required=True, help="folder for the result JSON files")
    ap.add_argument("--label", required=True, help="engine label used in the result file names and the table")
    ap.add_argument("--threads", type=int, default=2, help="torch / OpenMP threads")
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "auto"])
    ap.add_argument("--default-kv-bytes", type=int, default=1 << 30,
                    help="KV budget for workloads that do not fix their own")
    if extra is not None:
        extra(ap)
    return ap.parse_args()


def load_workloads(paths: list[str]) -> list[dict]:
    """Read the workload JSON files, in the given order."""
    return [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]


def kv_bytes_of(workload: dict, default: int) -> int:
    """The KV budget a workload asks for, else `default`."""
    value = workload.get("kv_cache_memory_bytes")
    return int(value) if value else int(default)


def warmup_prompts(workload: dict, n: int = 4, length: int = 48) -> list[list[int]]:
    """Small prompts unrelated to the workload: ids of the workload's vocabulary walked with a stride (pure)."""
    first = workload["prompts"][0]
    bos = first[0]
    pool = sorted({t for p in workload["prompts"][:4] for t in p[1:]})
    return [[bos] + [pool[(7 * i + 13 * j + 3) % len(pool)] for j in range(length - 1)] for i in range(n)]


class Timer:
    """Wall-clock timer for the timed pass: `with Timer() as t: ...`, then `t.seconds`."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def make_result(engine: str, config: dict, workload: dict, wall_s: float, outputs: list[list[int]],
                computed_prompt_tokens: int | None, extra: dict | None = None) -> dict:
    """The result record of one timed workload (no side effects)."""
    prompt_tokens = sum(len(p) for p in workload["prompts"])
    output_tokens = sum(len(o) for o in outputs)
    record = {
        "engine": engine,
        "workload": workload["name"],
        "config": config,
        "wall_s": wall_s,
        "num_requests": len(workload["prompts"]),
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "expected_output_tokens": sum(workload["max_tokens"]),
        "total_tok_s": (prompt_tokens + output_tokens) / wall_s if wall_s > 0 else None,
        "output_tok_s": output_tokens / wall_s if wall_s > 0 else None,
        "computed_prompt_tokens": computed_prompt_tokens,
        "python": platform.python_version(),
        "outputs": outputs,
    }
    record.update(extra or {})
    return record


def write_result(out_dir: str, label: str, record: dict) -> Path:
    """Write `record` to `<out_dir>/<label>__<workload>.json` (folder created); returns the path."""
    path = Path(out_dir) / f"{label}__{record['workload']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record), encoding="utf-8")
    return path


def log(msg: str) -> None:
    """One progress line on stderr, prefixed with the runner's pid."""
    print(f"[runner {os.getpid()}] {msg}", file=sys.stderr, flush=True)


def one_engine_args(doc: str, engines, extra: Callable[[argparse.ArgumentParser], None] | None = None
                    ) -> argparse.Namespace:
    """The flags of the single-workload runners (score_runner, structured_runner): which engine, model, workload
    JSON and result file, dtype, threads and KV budget (plus the runner's own via `extra`); parses sys.argv."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", required=True, choices=sorted(engines))
    ap.add_argument("--model", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-bytes", type=int, default=2 << 30)
    if extra is not None:
        extra(ap)
    return ap.parse_args()

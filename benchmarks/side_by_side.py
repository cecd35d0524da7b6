"""What the one-workload benchmarks (`scoring`, `structured`) share: their common flags, and running one engine's
runner (`benchmarks/peers/*_runner.py`) in that engine's venv as a subprocess, its log beside its result."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

from benchmarks.models import REPO

PEERS = REPO / ".cache" / "peers"


def add_common_args(ap: argparse.ArgumentParser, engines: tuple[str, ...], rounds: int, timeout: float) -> None:
    ap.add_argument("--engines", default=",".join(engines))
    ap.add_argument("--rounds", type=int, default=rounds, help="run every engine this many times, order alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-bytes", type=int, default=2 << 30, help="KV budget of batchllm and vLLM")
    ap.add_argument("--timeout", type=float, default=timeout, help="seconds per engine run")
    ap.add_argument("--out", default=str(REPO / "bench-results"))


def parse(ap: argparse.ArgumentParser, argv, engines: tuple[str, ...]) -> argparse.Namespace:
    """Parses argv; --engines becomes a checked list."""
    args = ap.parse_args(argv)
    args.engines = [e for e in args.engines.split(",") if e]
    for e in args.engines:
        if e not in engines:
            ap.error(f"unknown engine {e!r}; expected one of {engines}")
    return args


def run_runner(runner: Path, venv: str, flags: list[str], out: Path, args: argparse.Namespace) -> dict | str:
    """Runs `runner` with the python of `venv` ("batchllm": the project's) and `flags` plus --out, --threads and
    --kv-bytes; returns its result JSON, or why there is none. A result written before a failed shutdown (vLLM's,
    sometimes) still counts."""
    if venv == "batchllm":
        py = REPO / ".venv" / "bin" / "python"
    elif (PEERS / venv / ".installed").is_file():
        py = PEERS / venv / "bin" / "python"
    else:
        return f"peer venv missing: run benchmarks/setup_peers.sh {venv}"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p))
    cmd = [str(py), str(runner), *flags, "--out", str(out), "--threads", str(args.threads),
           "--kv-bytes", str(args.kv_bytes)]
    log = out.with_suffix(".log")
    with open(log, "w") as fh:
        try:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=args.timeout).returncode
        except subprocess.TimeoutExpired:
            return f"timed out after {args.timeout:.0f}s (log: {log})"
    if not out.is_file():
        return f"exit {rc} (log: {log})"
    return json.loads(out.read_text())

"""Peak RSS of `batchllm run` against input size.

1. The job pipeline without a model (validation pass with the real tokenizer, error lines, windowed re-read, result
   lines written through the synced writer), fed by a stand-in engine that streams a fixed 16-token result per
   request: 10k / 100k / 1M short lines by default, and `--long N` lines of 100 KB documents plus one line of
   12.6 MB (long documents: refused for the context, but validation must not blow up on them). Each input runs in
   its own process, so each peak is its own.
2. A smaller end-to-end run of `python -m batchllm run` on the tiny model (real engine), peak RSS of that process.

    .venv/bin/python benchmarks/jobs_memory.py --sizes 10000 100000 1000000 --long 600 --e2e-lines 400
                                                [--model smollm2-135m-instruct]

Prints one JSON line per measurement and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

SYSTEM = "You are a careful assistant. Answer briefly and precisely, citing the document when you can."


def write_input(path: Path, n: int, bad_every: int = 100) -> None:
    """n request lines: chat lines sharing a system prompt, every 3rd a completion, every `bad_every`-th bad."""
    with open(path, "w") as f:
        for i in range(n):
            if bad_every and i % bad_every == bad_every - 1:
                f.write('{"custom_id": "broken-' + str(i) + '", "method": "POST"\n')
                continue
            if i % 3 == 2:
                body = {"prompt": f"Document {i % 97}: the value of item {i} is {i * 7 % 1000}.", "max_tokens": 16}
                url = "/v1/completions"
            else:
                body = {"messages": [{"role": "system", "content": SYSTEM},
                                     {"role": "user", "content": f"What is item {i} of group {i % 13}?"}],
                        "max_tokens": 16, "temperature": 0}
                url = "/v1/chat/completions"
            f.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}) + "\n")


def write_long_input(path: Path, n: int, size: int = 100_000, huge: int = 12_600_000) -> None:
    """n chat lines whose user message is a ~`size`-byte document, then one line of ~`huge` bytes."""
    words = "the river runs past the old library where the trains stop twice a day and nobody minds ".split()
    with open(path, "w") as f:
        for i in range(n + 1):
            target = huge if i == n else size
            doc = " ".join(words[(i + j) % len(words)] for j in range(target // 5))
            body = {"messages": [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": f"Summarise document {i}:\n{doc}"}], "max_tokens": 16}
            f.write(json.dumps({"custom_id": f"doc-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + "\n")


class EchoEngine:
    """Streams a fixed 16-token completion per prompt, as generate_stream does (nothing kept)."""

    def __init__(self):
        self.progress = {}

    def generate_stream(self, prompts, params):
        for i, p in enumerate(prompts):
            toks = list(range(100, 116))
            yield i, SimpleNamespace(prompt_token_ids=p["prompt_token_ids"], num_cached_tokens=0, error=None,
                                     outputs=[SimpleNamespace(index=0, text="x" * 48, token_ids=toks,
                                                              finish_reason="length", logprobs=None)])

    def stats(self):
        return {"trace": [], "elapsed_s": 0.0}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def child_pipeline(n: int, model: str, work: Path, long: bool = False) -> dict:
    """Runs the job pipeline on n lines (long documents with `long`) with EchoEngine; returns figures (in this
    process)."""
    from transformers import AutoTokenizer  # noqa: F401  (imported before the baseline is taken)

    from batchllm import SamplingParams  # noqa: F401
    from batchllm.jobs import command, job

    inp, out = work / f"in_{n}{'_long' if long else ''}.jsonl", work / f"out_{n}.jsonl"
    if not inp.exists():
        (write_long_input if long else write_input)(inp, n)
    out.unlink(missing_ok=True)
    for side in (".manifest.json", ".lock"):
        Path(f"{out}{side}").unlink(missing_ok=True)
    base = rss_mb()
    t0 = time.monotonic()
    import argparse as ap

    p = ap.ArgumentParser()
    job.add_arguments(p)
    args = p.parse_args(["-i", str(inp), "-o", str(out), "--model", model, "--no-progress", "--window", "8192"])
    code = command.run_job(args, llm_factory=lambda a: EchoEngine())
    elapsed = time.monotonic() - t0
    lines = sum(1 for _ in open(out, "rb"))
    return {"what": "long docs" if long else "pipeline", "lines": n + int(long), "exit": code, "out_lines": lines,
            "input_mb": inp.stat().st_size / 2**20,
            "out_mb": out.stat().st_size / 2**20, "rss_after_imports_mb": round(base, 1),
            "peak_rss_mb": round(rss_mb(), 1), "elapsed_s": round(elapsed, 1)}


def run_e2e(n: int, model: str, work: Path) -> dict:
    """`python -m batchllm run` on n lines with the real engine; peak RSS of that child process."""
    inp, out = work / f"e2e_{n}.jsonl", work / f"e2e_out_{n}.jsonl"
    write_input(inp, n)
    out.unlink(missing_ok=True)
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "batchllm", "run", "-i", str(inp), "-o", str(out), "--model", model,
           "--dtype", "float32", "--no-progress", "--kv-cache-memory-bytes", str(64 * 2**20)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run(cmd, capture_output=True, text=True)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if proc.returncode != 0:
        print(proc.stderr, file=sys.stderr)
    return {"what": "end-to-end", "lines": n, "exit": proc.returncode,
            "out_lines": sum(1 for _ in open(out, "rb")) if out.exists() else 0,
            "peak_rss_mb": round(max(peak, before) / 1024.0, 1), "elapsed_s": round(time.monotonic() - t0, 1)}


def default_model() -> str:
    from batchllm.tiny import default_model_dir

    return str(default_model_dir())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    ap.add_argument("--long", type=int, default=600, help="lines of 100 KB documents (0 to skip)")
    ap.add_argument("--e2e-lines", type=int, default=400, help="0 to skip the end-to-end run")
    ap.add_argument("--model", default=None, help="model folder (default: the embedded tiny model)")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-long", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    model = a.model or default_model()
    if not Path(model).exists():
        from batchllm.hub import resolve_model

        model = str(resolve_model(model, "float32"))
    work = Path(a.work or tempfile.mkdtemp(prefix="jobs_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.child is not None:
        print(json.dumps(child_pipeline(a.child, model, work, a.child_long)))
        return 0
    rows = []
    runs = [(n, []) for n in a.sizes] + ([(a.long, ["--child-long"])] if a.long else [])
    for n, extra in runs:  # each input in a fresh process: its own peak
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
        proc = subprocess.run([sys.executable, __file__, "--child", str(n), "--model", model, "--work", str(work),
                               *extra], capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return 1
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
        for f in work.glob(f"*_{n}*"):
            f.unlink(missing_ok=True)
    if a.e2e_lines:
        rows.append(run_e2e(a.e2e_lines, model, work))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'what':<11} {'lines':>9} {'input MB':>9} {'peak RSS MB':>12} {'elapsed s':>10}")
    for r in rows:
        print(f"{r['what']:<11} {r['lines']:>9} {r.get('input_mb', 0):>9.1f} {r['peak_rss_mb']:>12.1f} "
              f"{r['elapsed_s']:>10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`batchllm run` as a job: an OpenAI Batch JSONL file in, an OpenAI Batch output file out, resumable.

Flow: check the paths (guard.check_output_path), lock OUT (guard.OutputLock), check that an existing OUT comes from
this same job (guard.Manifest; --force overrides), drop its error lines on --retry-failed, recover OUT (cut a torn
last line, index what is done) -> pass 1 over IN with the tokenizer only: every line is parsed and validated, bad
lines become error lines at once, the byte offsets of runnable lines are kept (8+8+1+4 bytes per line, never the
prompts) -> the model loads -> pass 2 reads the runnable lines back in windows (at most `--window` requests and
WINDOW_TOKENS prompt tokens), each window's missing requests one `llm.generate_stream` call, results appended to
OUT as they finish -> summary, stats JSON, HTML report. Memory holds one window of prompts, the set of custom_ids,
and bounded trace bins; validation reads lines in blocks of at most 4 MiB and refuses, unread, a line longer than
any request fitting the context.

Resume: windows are cut from all runnable lines, done or not, so a rerun cuts the same windows; only the requests
without a result run again (see `generate.run_windows` for what that means for bf16 bits). SIGTERM and SIGINT stop
the job between two steps: finished results are flushed and fsynced, and the command says how to resume.

With `--ray [ADDRESS]`, pass 2 runs on Ray actors instead (`batchllm.distributed.ray_runner.ray_pass`, which
`command.main` passes in); everything else here (validation, error lines, resume, result lines, summary) is the same
code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from batchllm.engine_args import EngineArgs
from batchllm.jobs import openai_batch as ob
from batchllm.jobs.generate import Progress, run_windows, served_model_name
from batchllm.jobs.guard import (
    STREAM,
    Manifest,
    OutputLock,
    check_output_path,
    check_resume,
    drop_error_lines,
    graceful_stop,
    sha256_of,
    spool_stdin,
)
from batchllm.jobs.report import JobTotals, format_summary, summary, write_report, write_stats_json
from batchllm.jobs.scan import (
    ENGINE_DEFAULT_CONTEXT,
    JobError,
    Pending,
    Validator,
    engine_params_factory,
    load_encoder,
    scan_input,
)
from batchllm.jobs.writer import CorruptOutput, ResultWriter, recover


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the `run` options to a (sub)parser."""
    p.add_argument("-i", "--input", required=True, help="OpenAI Batch input file (JSONL); - reads standard input")
    p.add_argument("-o", "--output", required=True,
                   help="output file (JSONL); appended to, resumed if it exists (only by the same job: see --force); "
                        "- streams the results to standard output, without resume")
    p.add_argument("--model", required=True,
                   help="an HF model folder, a .gguf file (or a folder holding one), or smollm2-135m-instruct")
    EngineArgs.add_cli_args(p.add_argument_group("engine"))
    j = p.add_argument_group("job")
    j.add_argument("--window", type=int, default=8192,
                   help="requests per engine call (prefix sharing is planned within a window; bounds memory). With "
                        "--ray the plan is global and a worker's call holds whole pieces of it")
    j.add_argument("--default-max-tokens", type=int, default=ob.DEFAULT_MAX_TOKENS_CAP,
                   help="max_tokens of lines that set none: min(this, context length - prompt length)")
    j.add_argument("--sync-every", type=int, default=32, help="fsync OUT every N result lines ...")
    j.add_argument("--sync-interval", type=float, default=1.0, help="... or after this many seconds")
    j.add_argument("--stats-json", default=None, help="write the end-of-job figures to this JSON file")
    j.add_argument("--report", default=None, help="write an HTML report (report.html) into this folder")
    j.add_argument("--no-progress", action="store_true", help="no progress bar")
    j.add_argument("--force", action="store_true",
                   help="resume onto an existing output even when another input, model or option produced it")
    j.add_argument("--retry-failed", action="store_true",
                   help="drop the error lines of an existing output first: their requests run again")
    r = p.add_argument_group("ray (scale out; needs pip install 'batchllm[ray]')")
    r.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run on a Ray cluster: ADDRESS (host:port, ray://...) or, without a value, RAY_ADDRESS / the "
                        "latest local cluster / a new local one (ray.init())")
    r.add_argument("--ray-workers", type=int, default=None,
                   help="engine actors (default: the cluster's CPUs, or GPUs, divided by the per-worker share)")
    r.add_argument("--ray-cpus-per-worker", type=float, default=1.0, help="CPUs each engine actor reserves")
    r.add_argument("--ray-gpus-per-worker", type=float, default=0.0, help="GPUs each engine actor reserves")


def job_namespace(input_path: str | Path, output_path: str | Path, model: str | Path, **options: Any
                  ) -> argparse.Namespace:
    """The parsed `run` arguments for a job started from Python: the command line's defaults, overridden by
    `options` named like the options' destinations (dtype=..., window=..., ray_workers=...). Raises TypeError for
    an unknown name."""
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["-i", str(input_path), "-o", str(output_path), "--model", str(model)])
    unknown = sorted(k for k in options if not hasattr(args, k))
    if unknown:
        raise TypeError(f"unknown job option(s): {', '.join(unknown)}")
    for k, v in options.items():
        setattr(args, k, v)
    return args


# ----------------------------------------------------------------------------------------------------------------
# setup


def resolve_job_model(args: argparse.Namespace) -> str:
    """The local HF folder of `--model` (a GGUF converted, a named model fetched, once; see batchllm.hub), in the
    dtype the engine will run. Raises JobError with the reason."""
    from batchllm import machine
    from batchllm.hub import resolve_model
    from batchllm.model.cpu_kernels import run_dtype

    try:
        dtype = run_dtype(args.dtype or "auto", machine.resolve_device(args.device or "auto"))
        return str(resolve_model(args.model, dtype))
    except (OSError, ValueError, RuntimeError) as e:
        raise JobError(f"model {args.model}: {str(e).strip().splitlines()[0]}") from None


def check_paths(input_path: str, output_path: str, model_dir: str) -> dict:
    """Checks that the job can start; returns the model's config.json. Raises JobError with the reason."""
    inp = Path(input_path)
    if not inp.is_file():
        raise JobError(f"cannot read input file {input_path}: no such file")
    if not os.access(inp, os.R_OK):
        raise JobError(f"cannot read input file {input_path}: permission denied")
    check_output_path(input_path, output_path)
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise JobError(f"no model at {model_dir} (config.json not found)")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise JobError(f"cannot read {cfg_path}: {e}") from None


def check_options(args: argparse.Namespace) -> None:
    """Options that would fail every line or fail after the whole job ran are refused before it starts."""
    if args.default_max_tokens is not None and args.default_max_tokens < 1:
        raise JobError(f"--default-max-tokens must be at least 1, got {args.default_max_tokens}")
    if args.window < 1:
        raise JobError(f"--window must be at least 1, got {args.window}")
    try:
        EngineArgs(model=args.model, **engine_options(args))
    except (TypeError, ValueError) as e:
        raise JobError(str(e)) from None
    for flag, path in (("--stats-json", args.stats_json), ("--report", args.report)):
        if path is None:
            continue
        folder = Path(path) if flag == "--report" else Path(path).parent
        existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise JobError(f"{flag} {path}: cannot write there ({existing} is not a writable folder)")


def result_options(args: argparse.Namespace, model_dir: str) -> Manifest:
    """The manifest of this job, without the input hash (filled by the caller): what changes its results."""
    options = {"dtype": args.dtype or "auto", "seed": args.seed or 0, "max_model_len": args.max_model_len,
               "default_max_tokens": args.default_max_tokens}
    return Manifest("", os.path.realpath(model_dir), options)


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM(...)` keyword arguments given on the command line (unset ones left to the engine's defaults)."""
    return EngineArgs.cli_options(args)


def build_llm(args: argparse.Namespace) -> Any:
    """Loads the engine with the engine options given on the command line."""
    from batchllm import LLM

    return LLM(args.model, **engine_options(args))


# Pass 2 strategies: (args, pending, validator, writer, totals) -> (clock value when generation started, extra
# summary figures). Each writes every missing result through `writer` and counts it into `totals`.
Pass2 = Callable[[argparse.Namespace, Pending, Validator, ResultWriter, JobTotals], tuple[float, dict]]


def local_pass(args: argparse.Namespace, pending: Pending, validator: Validator, writer: ResultWriter,
               totals: JobTotals, llm_factory: Callable[[argparse.Namespace], Any] = build_llm) -> tuple[float, dict]:
    """Pass 2 on one engine in this process: loads it, then runs the windows."""
    llm = llm_factory(args)
    progress = Progress(totals.lines_total, totals.lines_total - pending.num_todo, not args.no_progress)
    t_gen = time.monotonic()
    try:
        run_windows(llm, args.input, pending, validator, writer, totals, args.window, served_model_name(args), progress)
    finally:
        progress.close()
    engine = getattr(llm, "engine", None)
    return t_gen, {"machine": engine.describe()} if engine is not None else {}


def execute_job(args: argparse.Namespace, pass2: Pass2 | None = None) -> dict:
    """Runs the job, prints the summary, writes the stats JSON and report; returns the summary dict. Pass 2 is
    `pass2` (Ray's, for --ray: see `command.main`), else the local engine's. Raises JobError when the job cannot
    start, JobStopped on SIGTERM / SIGINT (after flushing what is finished)."""
    t0 = time.monotonic()
    with graceful_stop(), contextlib.ExitStack() as cleanup:
        if args.input == STREAM:
            args.input = spool_stdin(Path(args.output).resolve().parent if args.output != STREAM
                                     else Path(tempfile.gettempdir()))
            cleanup.callback(os.unlink, args.input)
        check_options(args)
        model_dir = resolve_job_model(args)
        config = check_paths(args.input, args.output, model_dir)
        if args.output != STREAM:
            cleanup.enter_context(OutputLock(args.output))
        manifest = replace(result_options(args, model_dir), input_sha256=sha256_of(args.input))
        check_resume(args.output, manifest, getattr(args, "force", False))
        if getattr(args, "retry_failed", False):
            n = drop_error_lines(args.output)
            print(f"batchllm run: --retry-failed: {n} error lines dropped; their requests run again", file=sys.stderr)
        return _run(args, pass2 or local_pass, model_dir, config, t0)


def _run(args: argparse.Namespace, pass2: Pass2, model_dir: str, config: dict, t0: float) -> dict:
    encoder = load_encoder(model_dir, config)
    context = args.max_model_len or ob.read_context_length(config) or ENGINE_DEFAULT_CONTEXT
    validator = Validator(encoder, context, args.default_max_tokens, engine_params_factory(), args.seed or 0)
    try:
        resume = recover(args.output)
    except CorruptOutput as e:
        raise JobError(str(e)) from None
    except OSError as e:
        raise JobError(f"cannot open output file {args.output}: {e.strerror}") from None
    if resume.num_lines:
        print(f"batchllm run: resuming: {resume.num_lines} results already in {args.output}"
              + (f" (cut a torn last line of {resume.truncated_bytes} bytes)" if resume.truncated_bytes else ""),
              file=sys.stderr)
    totals = JobTotals()
    try:
        writer = ResultWriter(args.output, args.sync_every, args.sync_interval)
    except OSError as e:
        raise JobError(f"cannot open output file {args.output}: {e.strerror}") from None
    extra: dict = {}
    with writer:
        try:
            pending = scan_input(args.input, validator, resume, writer, totals)
        except OSError as e:
            raise JobError(f"cannot read input file {args.input}: {e.strerror}") from None
        writer.sync()
        del resume  # the done set is not needed any more
        t_gen = time.monotonic()
        if pending.num_todo:
            t_gen, extra = pass2(args, pending, validator, writer, totals)
    t_end = time.monotonic()
    s = summary(totals, t_end - t_gen)
    s["job_elapsed_s"] = round(t_end - t0, 3)
    s.update(extra)
    print(format_summary(s), file=sys.stderr)
    if args.stats_json:
        write_stats_json(args.stats_json, s)
    if args.report:
        page = write_report(args.report, s, totals)
        print(f"batchllm run: report written to {page}", file=sys.stderr)
    return s

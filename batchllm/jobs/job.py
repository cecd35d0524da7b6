"""`batchllm run` as a job: an OpenAI Batch JSONL file in, an OpenAI Batch output file out, resumable.

Flow: recover OUT (cut a torn last line, index what is done) -> pass 1 over IN with the tokenizer only: every line
is parsed and validated, bad lines become error lines at once, the byte offsets of runnable lines are kept (8+8+1
bytes per line, never the prompts) -> the model loads -> pass 2 reads the runnable lines back in windows of
`--window` requests, each window one `llm.generate_stream` call, results appended to OUT as they finish -> summary,
stats JSON, HTML report. Memory holds one window of prompts, the set of custom_ids, and bounded trace bins.

Resume: windows are cut from all runnable lines, done or not, so a rerun makes the same engine calls as the first
run. A window with missing results runs again whole (up to `--window` - 1 finished requests are recomputed) and
only the missing results are written: they are then bit-identical to an uninterrupted run's, whatever the dtype,
because the engine is deterministic for the same batch.

With `--ray [ADDRESS]`, pass 2 runs on Ray actors instead (`batchllm.distributed.ray_runner.ray_pass`, which
`command.main` passes in); everything else here (validation, error lines, resume, result lines, summary) is the same
code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from batchllm.engine_args import EngineArgs
from batchllm.jobs import openai_batch as ob
from batchllm.jobs.generate import Progress, run_windows, served_model_name
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
    p.add_argument("-i", "--input", required=True, help="OpenAI Batch input file (JSONL)")
    p.add_argument("-o", "--output", required=True, help="output file (JSONL); appended to, resumed if it exists")
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
    if Path(output_path).exists() and Path(output_path).resolve() == inp.resolve():
        raise JobError("the output file must differ from the input file")
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise JobError(f"no model at {model_dir} (config.json not found)")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise JobError(f"cannot read {cfg_path}: {e}") from None


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
    start."""
    t0 = time.monotonic()
    if pass2 is None:
        pass2 = local_pass

    model_dir = resolve_job_model(args)
    config = check_paths(args.input, args.output, model_dir)
    encoder = load_encoder(model_dir, config)
    context = ob.read_context_length(config) or ENGINE_DEFAULT_CONTEXT
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

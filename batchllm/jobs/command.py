"""`batchllm run`: an OpenAI Batch JSONL file in, an OpenAI Batch output file out, resumable.

Flow: recover OUT (cut a torn last line, index what is done) -> pass 1 over IN with the tokenizer only: every line
is parsed and validated, bad lines become error lines at once, the byte offsets of runnable lines are kept (8+8+1
bytes per line, never the prompts) -> the model loads -> pass 2 reads the runnable lines back in windows of
`--window` requests, each window one `llm.generate_stream` call, results appended to OUT as they finish -> summary,
stats JSON, HTML report. Memory holds one window of prompts, the set of custom_ids, and bounded trace bins.

Resume: windows are cut from all runnable lines, done or not, so a rerun makes the same engine calls as the first
run. A window with missing results runs again whole (up to `--window` - 1 finished requests are recomputed) and
only the missing results are written: they are then bit-identical to an uninterrupted run's, whatever the dtype,
because the engine is deterministic for the same batch.

With `--ray [ADDRESS]`, pass 2 runs on Ray actors instead (`batchllm.distributed.ray_runner`); everything else here
(validation, error lines, resume, result lines, summary) is the same code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from batchllm.jobs import openai_batch as ob
from batchllm.jobs.report import JobTotals, format_summary, summary, write_report, write_stats_json
from batchllm.jobs.writer import CorruptOutput, ResultWriter, ResumeIndex, recover
from batchllm.sampling_params import derive_seed

POLICIES = ("batchllm", "fcfs-cache", "lpm-cache", "fcfs")
SCAN_CHUNK = 512  # lines validated (and tokenized) together
ENGINE_DEFAULT_CONTEXT = 2048  # the context the engine assumes when config.json names none


class JobError(Exception):
    """The job cannot run at all; the message is the one-line reason."""


@dataclass(frozen=True)
class Pending:
    """Every runnable input line, in input order: byte offset, line number and whether its result is already in OUT
    (compact arrays). Windows are cut from this full list, so a rerun forms exactly the engine calls of the first
    run and its results are bit-identical to an uninterrupted run, in bf16 and with sampling too."""

    offsets: array
    line_nos: array
    done: array

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def num_todo(self) -> int:
        return len(self.done) - sum(self.done)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Adds the `run` options to a (sub)parser."""
    p.add_argument("-i", "--input", required=True, help="OpenAI Batch input file (JSONL)")
    p.add_argument("-o", "--output", required=True, help="output file (JSONL); appended to, resumed if it exists")
    p.add_argument("--model", required=True,
                   help="an HF model folder, a .gguf file (or a folder holding one), or smollm2-135m-instruct")
    g = p.add_argument_group("engine")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default=None)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None, help="exact KV cache budget in bytes")
    g.add_argument("--kv-cache-commit", choices=("auto", "upfront", "lazy"), default=None,
                   help="CPU: write the KV cache's pages at start-up or as blocks fill (default auto: at start-up "
                        "when --kv-cache-memory-bytes is given)")
    g.add_argument("--block-size", type=int, default=None)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--policy", choices=POLICIES, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:N")
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


def main(args: argparse.Namespace) -> int:
    """Runs the job; 0 when it ran (whatever failed line by line), 2/1 with a one-line reason when it cannot run,
    130 when interrupted (rerun to resume)."""
    try:
        return run_job(args)
    except JobError as e:
        print(f"batchllm run: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("batchllm run: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # a one-line reason, no traceback; finished results are already synced
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"batchllm run: error: {type(e).__name__}: {msg}", file=sys.stderr)
        return 1


# ----------------------------------------------------------------------------------------------------------------
# setup


def resolve_job_model(args: argparse.Namespace) -> str:
    """The local HF folder of `--model` (a GGUF converted, a named model fetched, once; see batchllm.hub), in the
    dtype the engine will run. Raises JobError with the reason."""
    from batchllm import machine
    from batchllm.hub import resolve_model

    try:
        dtype = machine.resolve_dtype(args.dtype or "auto", machine.resolve_device(args.device or "auto"))
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


def load_encoder(model_dir: str, config: dict) -> ob.PromptEncoder:
    """The tokenizer of the model folder (no weights loaded). Raises JobError."""
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:
        raise JobError(f"cannot load the tokenizer of {model_dir}: {str(e).strip().splitlines()[0]}") from None
    vocab = config.get("vocab_size")
    return ob.PromptEncoder(tok, vocab if isinstance(vocab, int) else None)


def engine_params_factory() -> Callable[..., Any] | None:
    """The engine's SamplingParams class when the engine is importable, else None (validation then relies on
    the checks of openai_batch alone)."""
    try:
        from batchllm import SamplingParams
    except ImportError:
        return None
    return SamplingParams


# ----------------------------------------------------------------------------------------------------------------
# pass 1: validation


def iter_lines(path: str | Path, offsets: array | None = None) -> Iterator[tuple[int, int, bytes]]:
    """(line number, byte offset, raw line) of the non-blank lines of a file; with `offsets`, only those offsets
    (paired with line numbers by the caller) are read back, by seeking."""
    with open(path, "rb") as f:
        if offsets is None:
            pos = 0
            for n, raw in enumerate(f, start=1):
                if raw.strip():
                    yield n, pos, raw
                pos += len(raw)
        else:
            for off in offsets:
                f.seek(off)
                yield 0, off, f.readline()


def _chunks(it: Iterator, size: int) -> Iterator[list]:
    buf = []
    for x in it:
        buf.append(x)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf


@dataclass
class Validator:
    """Validates request lines: parameters, prompt tokens, context fit and engine SamplingParams. Stateless apart
    from the configuration it holds."""

    encoder: ob.PromptEncoder
    max_model_len: int | None
    default_max_tokens: int = ob.DEFAULT_MAX_TOKENS_CAP
    make_params: Callable[..., Any] | None = None
    job_seed: int = 0  # requests without a seed sample with derive_seed(job_seed, custom_id): stable across resumes

    def prepare(self, reqs: list[ob.BatchRequest]) -> list[tuple[list[int], Any] | ob.LineError]:
        """(prompt token ids, sampling params) per request, or its LineError. Sampling params are engine
        SamplingParams when make_params is set, else the keyword dict."""
        out: list[tuple[list[int], Any] | ob.LineError] = []
        for req, ids in zip(reqs, self.encoder.encode_many(reqs)):
            try:
                if isinstance(ids, ob.InvalidLine):
                    raise ids
                kw = dict(req.sampling)
                if kw.get("seed") is None:  # not the position in a window, which changes when a job resumes
                    kw["seed"] = derive_seed(self.job_seed, req.custom_id)
                kw["max_tokens"] = ob.resolve_max_tokens(kw.get("max_tokens"), len(ids), self.max_model_len,
                                                         self.default_max_tokens)
                params = kw
                if self.make_params is not None:
                    try:
                        params = self.make_params(**kw)
                    except (ValueError, TypeError) as e:
                        raise ob.InvalidLine(ob.E_PARAM, str(e)) from None
                out.append((ids, params))
            except ob.InvalidLine as e:
                out.append(ob.line_error(req.line_no, req.custom_id, e.code, e.message))
        return out


def scan_input(path: str | Path, validator: Validator, resume: ResumeIndex, writer: ResultWriter,
               totals: JobTotals, chunk: int = SCAN_CHUNK) -> Pending:
    """Pass 1. Validates every line; writes the error lines not yet in OUT; counts lines into totals; returns every
    runnable line, flagged when already done. First occurrence of a custom_id claims it; later lines with it are
    duplicates (error lines with custom_id null, so OUT never repeats a custom_id)."""
    seen: set[str] = set()
    pending = Pending(array("q"), array("q"), array("b"))
    for block in _chunks(iter_lines(path), chunk):
        parsed: list[tuple[int, ob.BatchRequest | ob.LineError]] = []
        for line_no, off, raw in block:
            totals.lines_total += 1
            item = ob.parse_line(raw, line_no)
            cid = item.custom_id
            if cid is not None and cid in seen:
                item = ob.line_error(line_no, None, ob.E_DUPLICATE, f"custom_id {cid!r} repeats an earlier line")
            elif cid is not None:
                seen.add(cid)
            done = _already_done(item, resume)
            if done:
                totals.skipped_done += 1
                if not isinstance(item, ob.BatchRequest):
                    continue  # a done error line: nothing to run again
            parsed.append((off, item, done))
        prepared = iter(validator.prepare([it for _, it, _ in parsed if isinstance(it, ob.BatchRequest)]))
        for off, item, done in parsed:
            if isinstance(item, ob.BatchRequest):
                res = next(prepared)  # prepare keeps the order of its input
                if isinstance(res, ob.LineError):
                    item = res
                else:
                    pending.offsets.append(off)
                    pending.line_nos.append(item.line_no)
                    pending.done.append(int(done))
                    continue
            if done:
                continue
            totals.failed_validation += 1
            writer.write(ob.error_line(item))
    return pending


def _already_done(item: ob.BatchRequest | ob.LineError, resume: ResumeIndex) -> bool:
    if item.custom_id is not None:
        return item.custom_id in resume.custom_ids
    return item.line_no in resume.error_lines


def read_pending(path: str | Path, pending: Pending, start: int, stop: int) -> list[ob.BatchRequest | ob.LineError]:
    """Pass 2: parses the runnable lines pending[start:stop] again (they passed pass 1)."""
    return read_lines_at(path, pending.offsets[start:stop], pending.line_nos[start:stop])


def read_lines_at(path: str | Path, offsets: Sequence[int], line_nos: Sequence[int]
                  ) -> list[ob.BatchRequest | ob.LineError]:
    """Parses the input lines at these byte offsets again, numbered `line_nos` (same length)."""
    return [ob.parse_line(raw, line_no) for (_, _, raw), line_no in zip(iter_lines(path, offsets), line_nos)]


def prepare_runnable(reqs: list[ob.BatchRequest], validator: Validator, writer: ResultWriter, totals: JobTotals
                     ) -> list[tuple[ob.BatchRequest, list[int], Any]]:
    """(request, prompt token ids, sampling params) of each request that validates; writes the error line of any
    that does not (cannot happen for an input file unchanged since pass 1; kept safe)."""
    out = []
    for req, res in zip(reqs, validator.prepare(reqs)):
        if isinstance(res, ob.LineError):
            totals.failed_validation += 1
            writer.write(ob.error_line(res))
        else:
            out.append((req, res[0], res[1]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# pass 2: generation


class Progress:
    """tqdm bar on stderr: requests done/total, tokens/s, prefix saving, KV use (from llm.progress)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="req", file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.5, desc="batchllm run")
        self._last = 0.0

    def advance(self, totals: JobTotals, live: dict | None, t_job: float) -> None:
        """One more request done; refreshes the figures at most twice a second."""
        if self.bar is None:
            return
        self.bar.update(1)
        now = time.monotonic()
        if now - self._last < 0.5 or not live:
            return
        self._last = now
        logical = totals.engine_prompt_tokens + int(live.get("prompt_tokens", 0) or 0)
        computed = totals.computed_prompt_tokens + int(live.get("computed_prompt_tokens", 0) or 0)
        tokens = totals.prompt_tokens + totals.output_tokens
        saving = 1.0 - computed / logical if logical else 0.0
        kv_total = live.get("kv_blocks_total") or 0
        kv = 100.0 * (live.get("kv_blocks_used") or 0) / kv_total if kv_total else 0.0
        self.bar.set_postfix_str(f"{tokens / max(now - t_job, 1e-9):.0f} tok/s, saving {100 * saving:.0f}%, "
                                 f"KV {kv:.0f}%", refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_windows(llm: Any, path: str | Path, pending: Pending, validator: Validator, writer: ResultWriter,
                totals: JobTotals, window: int, model_name: str, progress: Progress) -> None:
    """Pass 2: each window of runnable lines is one generate_stream call; every result not yet in OUT is written as
    it arrives (nothing accumulated). A window whose lines are all done is skipped; one with some done lines runs
    whole, as in the first run, and only its missing results are written."""
    tok_text = validator.encoder.token_text
    t_start = time.monotonic()
    window = max(1, window)
    for start in range(0, len(pending), window):
        if all(pending.done[start:start + window]):
            continue
        items = read_pending(path, pending, start, start + window)
        done = {ln for ln, d in zip(pending.line_nos[start:start + window], pending.done[start:start + window]) if d}
        prepared = prepare_runnable([it for it in items if isinstance(it, ob.BatchRequest)], validator, writer, totals)
        del items
        if not prepared:
            continue
        run_reqs = [req for req, _, _ in prepared]
        prompts = [{"prompt_token_ids": ids} for _, ids, _ in prepared]
        params = [sp for _, _, sp in prepared]
        del prepared
        t_call = time.monotonic() - t_start
        for idx, out in llm.generate_stream(prompts, params):
            req = run_reqs[idx]
            if req.line_no in done:
                continue
            write_result(writer, req, out, totals, model_name, tok_text)
            progress.advance(totals, getattr(llm, "progress", None), t_start)
        live = getattr(llm, "progress", None) or {}
        totals.kv_blocks_total = max(totals.kv_blocks_total, int(live.get("kv_blocks_total", 0) or 0))
        totals.add_engine_stats(llm.stats(), t_call)


def write_result(writer: ResultWriter, req: ob.BatchRequest, out: Any, totals: JobTotals, model_name: str,
                 token_text: Callable[[int], str] | None) -> None:
    """Writes the output line of one finished request and counts it into totals."""
    if getattr(out, "error", None) or any(o.finish_reason == "error" for o in out.outputs):
        msg = out.error or "the engine could not run this request"
        totals.failed_engine += 1
        writer.write(ob.error_line(ob.line_error(req.line_no, req.custom_id, ob.E_ENGINE, msg)))
        return
    totals.ok += 1
    totals.prompt_tokens += len(out.prompt_token_ids)
    totals.output_tokens += sum(len(o.token_ids) for o in out.outputs)
    writer.write(ob.response_line(req, out, model_name, int(time.time()), token_text))


ENGINE_OPTIONS = ("dtype", "kv_cache_memory_bytes", "kv_cache_commit", "block_size", "max_num_batched_tokens", "policy",
                  "seed", "device")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `LLM(...)` keyword arguments given on the command line (unset ones left to the engine's defaults)."""
    return {k: getattr(args, k) for k in ENGINE_OPTIONS if getattr(args, k, None) is not None}


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
    return t_gen, {}


def served_model_name(args: argparse.Namespace) -> str:
    """The model name written into result lines that name none: the model folder's name, the GGUF file's stem, or
    the name given."""
    path = Path(args.model)
    if path.exists():
        return path.resolve().stem if path.is_file() else path.resolve().name
    return str(args.model)


def run_job(args: argparse.Namespace, llm_factory: Callable[[argparse.Namespace], Any] = build_llm) -> int:
    """The whole job (see the module docstring); 0 when it ran. Raises JobError when it cannot start."""
    execute_job(args, llm_factory)
    return 0


def execute_job(args: argparse.Namespace, llm_factory: Callable[[argparse.Namespace], Any] = build_llm,
                pass2: Pass2 | None = None) -> dict:
    """Runs the job, prints the summary, writes the stats JSON and report; returns the summary dict. Pass 2 is
    `pass2` when given, else Ray's when `args.ray` is set, else the local engine's. Raises JobError when the job
    cannot start."""
    t0 = time.monotonic()
    if pass2 is None and getattr(args, "ray", None) is not None:
        from batchllm.distributed.ray_runner import import_ray, ray_pass

        try:  # before any work: a missing Ray is a one-line error, not a late crash
            import_ray()
        except ImportError as e:
            raise JobError(f"--ray: {e}") from None
        pass2 = ray_pass
    if pass2 is None:
        pass2 = partial(local_pass, llm_factory=llm_factory)

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

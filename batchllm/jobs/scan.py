"""`batchllm run`, pass 1 and the reading back of lines: every input line parsed and validated with the tokenizer only
(bad lines become error lines at once), the byte offsets of the runnable ones kept (8+8+1 bytes per line, never the
prompts), and pass 2's windows read back from those offsets."""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchllm.inputs import PromptEncoder
from batchllm.jobs import openai_batch as ob
from batchllm.jobs import openai_output as oo
from batchllm.jobs.report import JobTotals
from batchllm.jobs.writer import ResultWriter, ResumeIndex
from batchllm.sampling_params import derive_seed

SCAN_CHUNK = 512  # lines validated (and tokenized) together ...
SCAN_CHUNK_BYTES = 4 << 20  # ... or fewer, when they hold this many bytes
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
    tokens: array  # prompt tokens of each line: windows are bounded in tokens too

    def __len__(self) -> int:
        return len(self.offsets)

    @property
    def num_todo(self) -> int:
        return len(self.done) - sum(self.done)


def load_encoder(model_dir: str, config: dict) -> PromptEncoder:
    """The tokenizer of the model folder (no weights loaded). Raises JobError."""
    vocab = config.get("vocab_size")
    try:
        return PromptEncoder.load(model_dir, vocab if isinstance(vocab, int) else None)
    except Exception as e:
        raise JobError(f"cannot load the tokenizer of {model_dir}: {str(e).strip().splitlines()[0]}") from None


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


BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class LongLine:
    """A line longer than any request this model can run; skipped unread (only its size is known)."""

    size: int


def iter_lines(path: str | Path, offsets: array | None = None, max_bytes: int | None = None
               ) -> Iterator[tuple[int, int, bytes | LongLine]]:
    """(line number, byte offset, raw line) of the non-blank lines of a file; a UTF-8 byte order mark at its start
    is skipped. A line of more than `max_bytes` comes as a LongLine, never held in memory. With `offsets`, only
    those offsets (paired with line numbers by the caller) are read back, by seeking."""
    with open(path, "rb") as f:
        if offsets is not None:
            for off in offsets:
                f.seek(off)
                yield 0, off, f.readline()
            return
        pos, n = 0, 0
        limit = -1 if max_bytes is None else max_bytes + 1
        while raw := f.readline(limit):
            n += 1
            start = pos
            pos += len(raw)
            if max_bytes is not None and len(raw) > max_bytes and not raw.endswith(b"\n"):
                size = len(raw)
                while raw and not raw.endswith(b"\n"):  # the rest of the line, a block at a time
                    raw = f.readline(1 << 20)
                    size += len(raw)
                pos += size - limit
                yield n, start, LongLine(size)
                continue
            if n == 1 and raw.startswith(BOM):
                raw, start = raw[len(BOM):], start + len(BOM)
            if raw.strip():
                yield n, start, raw


def _chunks(it: Iterator, size: int, max_bytes: int = SCAN_CHUNK_BYTES) -> Iterator[list]:
    """Lists of at most `size` items and about `max_bytes` of raw line (the third element of each item)."""
    buf, nbytes = [], 0
    for x in it:
        buf.append(x)
        raw = x[2]
        nbytes += len(raw) if isinstance(raw, bytes) else 0
        if len(buf) >= size or nbytes >= max_bytes:
            yield buf
            buf, nbytes = [], 0
    if buf:
        yield buf


@dataclass
class Validator:
    """Validates request lines: parameters, prompt tokens, context fit, output constraints (compiled once each, and
    cached here) and engine SamplingParams."""

    encoder: PromptEncoder
    max_model_len: int | None
    default_max_tokens: int = ob.DEFAULT_MAX_TOKENS_CAP
    make_params: Callable[..., Any] | None = None
    job_seed: int = 0  # requests without a seed sample with derive_seed(job_seed, custom_id): stable across resumes

    @property
    def grammars(self):
        """The structured-output constraints compiled with this tokenizer (batchllm.structured, loaded on the first
        line that has one)."""
        if getattr(self, "_grammars", None) is None:
            from batchllm.structured import Grammars

            self._grammars = Grammars(self.encoder.tokenizer, self.encoder.vocab_size or len(self.encoder.tokenizer))
        return self._grammars

    @property
    def max_line_bytes(self) -> int | None:
        """The longest input line that could hold a request fitting the context: its prompt text at most the bytes
        of 4 x context tokens of the longest kind (PromptEncoder.too_long), each byte at most 6 in JSON
        ("\\u00e9"), plus 1 MiB for the other fields. Longer lines are refused unread."""
        if self.max_model_len is None:
            return None
        return 6 * 4 * self.encoder.max_token_bytes * self.max_model_len + (1 << 20)

    def prepare(self, reqs: list[ob.BatchRequest]) -> list[tuple[list[int], Any] | ob.LineError]:
        """(prompt token ids, sampling params) per request, or its LineError. Sampling params are engine
        SamplingParams when make_params is set, else the keyword dict."""
        out: list[tuple[list[int], Any] | ob.LineError] = []
        for req, ids in zip(reqs, self.encoder.encode_many([r.prompt_input for r in reqs], self.max_model_len)):
            try:
                if isinstance(ids, ob.InvalidLine):
                    raise ids
                kw = dict(req.sampling)
                if kw.get("seed") is None:  # not the position in a window, which changes when a job resumes
                    kw["seed"] = derive_seed(self.job_seed, req.custom_id)
                kw["max_tokens"] = ob.resolve_max_tokens(kw.get("max_tokens"), len(ids), self.max_model_len,
                                                         self.default_max_tokens)
                constraint = kw.get("structured_outputs")
                if constraint is not None:
                    error = self.grammars.check(constraint)  # compiled once per distinct constraint
                    if error is not None:
                        raise ob.InvalidLine(ob.E_PARAM, error)
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
    pending = Pending(array("q"), array("q"), array("b"), array("i"))
    for block in _chunks(iter_lines(path, max_bytes=validator.max_line_bytes), chunk):
        parsed: list[tuple[int, ob.BatchRequest | ob.LineError]] = []
        for line_no, off, raw in block:
            totals.lines_total += 1
            if isinstance(raw, LongLine):
                item = ob.line_error(line_no, None, ob.E_CONTEXT, f"the line is {raw.size} bytes, more than any "
                                     f"request fitting the model's context could be ({validator.max_line_bytes} "
                                     "bytes): refused unread")
            else:
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
                    pending.tokens.append(len(res[0]))
                    continue
            if done:
                continue
            totals.failed_validation += 1
            writer.write(oo.error_line(item))
    return pending


def _already_done(item: ob.BatchRequest | ob.LineError, resume: ResumeIndex) -> bool:
    if item.custom_id is not None:
        return item.custom_id in resume.custom_ids
    return item.line_no in resume.error_lines


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
            writer.write(oo.error_line(res))
        else:
            out.append((req, res[0], res[1]))
    return out

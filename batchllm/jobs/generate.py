"""`batchllm run`, pass 2 on one engine: windows of runnable lines, each one engine call, every result appended to the
output as it arrives, and the progress bar."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from batchllm.inputs import PromptEncoder
from batchllm.jobs import openai_batch as ob
from batchllm.jobs import openai_output as oo
from batchllm.jobs.report import JobTotals
from batchllm.jobs.scan import Pending, Validator, prepare_runnable, read_lines_at
from batchllm.jobs.writer import ResultWriter

WINDOW_TOKENS = 1 << 20  # prompt tokens per window at most: a window's prompts and plan stay within memory


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


def window_bounds(pending: Pending, window: int, window_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) of each window: at most `window` lines and `window_tokens` prompt tokens (at least one line),
    cut from every runnable line, done or not, so a rerun cuts the same windows."""
    bounds, start, tokens = [], 0, 0
    for i, n in enumerate(pending.tokens):
        if i > start and (i - start >= window or tokens + n > window_tokens):
            bounds.append((start, i))
            start, tokens = i, 0
        tokens += n
    if start < len(pending):
        bounds.append((start, len(pending)))
    return bounds


def run_windows(llm: Any, path: str | Path, pending: Pending, validator: Validator, writer: ResultWriter,
                totals: JobTotals, window: int, model_name: str, progress: Progress,
                window_tokens: int = WINDOW_TOKENS) -> None:
    """Pass 2: each window's lines not yet in OUT are one generate_stream call; every result is written as it
    arrives (nothing accumulated), so a rerun computes only the missing ones. A resumed window plans its remaining
    requests alone: in fp32 their tokens equal an uninterrupted run's; in bf16 a shared prefix may now be computed
    in other chunks, which can change the last bits of a logit and, at a near tie, a token."""
    encoder = validator.encoder
    t_start = time.monotonic()
    for start, stop in window_bounds(pending, max(1, window), window_tokens):
        todo = [i for i in range(start, stop) if not pending.done[i]]
        if not todo:
            continue
        items = read_lines_at(path, [pending.offsets[i] for i in todo], [pending.line_nos[i] for i in todo])
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
            write_result(writer, run_reqs[idx], out, totals, model_name, encoder)
            progress.advance(totals, getattr(llm, "progress", None), t_start)
        live = getattr(llm, "progress", None) or {}
        totals.kv_blocks_total = max(totals.kv_blocks_total, int(live.get("kv_blocks_total", 0) or 0))
        totals.add_engine_stats(llm.stats(), t_call)


def write_result(writer: ResultWriter, req: ob.BatchRequest, out: Any, totals: JobTotals, model_name: str,
                 encoder: PromptEncoder | None) -> None:
    """Writes the output line of one finished request and counts it into totals; `encoder` turns tokens into text
    (for logprobs and echo)."""
    if getattr(out, "error", None) or any(o.finish_reason == "error" for o in out.outputs):
        msg = out.error or "the engine could not run this request"
        totals.failed_engine += 1
        writer.write(oo.error_line(ob.line_error(req.line_no, req.custom_id, ob.E_ENGINE, msg)))
        return
    totals.ok += 1
    totals.prompt_tokens += len(out.prompt_token_ids)
    totals.output_tokens += sum(len(o.token_ids) for o in out.outputs)
    totals.structured_incomplete += sum(getattr(o, "structured_output_complete", None) is False for o in out.outputs)
    prompt_text = None
    if req.echo:
        prompt_text = req.prompt if req.prompt is not None else (
            encoder.tokenizer.decode(out.prompt_token_ids) if encoder is not None else "")
    writer.write(oo.response_line(req, out, model_name, int(time.time()),
                                  encoder.token_text if encoder is not None else None, prompt_text))


def served_model_name(args: argparse.Namespace) -> str:
    """The model name written into result lines that name none: the model folder's name, the GGUF file's stem, or
    the name given."""
    path = Path(args.model)
    if path.exists():
        return path.resolve().stem if path.is_file() else path.resolve().name
    return str(args.model)

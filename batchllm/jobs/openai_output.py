"""OpenAI Batch output lines: a finished request's response body (chat or completion, with usage and logprobs), or
an error line naming the input line. No torch.

Output line: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {...} | null}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from batchllm.jobs.openai_batch import BatchRequest, LineError


def output_id(line_no: int) -> str:
    """The output line's id; derived from the input line number so reruns can recognise error lines without a
    custom_id."""
    return f"batch_req_{line_no}"


def line_no_of_output_id(out_id: Any) -> int | None:
    """Inverse of output_id (None for ids this module did not write)."""
    if isinstance(out_id, str) and out_id.startswith("batch_req_") and out_id[10:].isdigit():
        return int(out_id[10:])
    return None


def error_line(err: LineError) -> dict:
    """The output line of a failed request."""
    return {"id": output_id(err.line_no), "custom_id": err.custom_id, "response": None,
            "error": {"code": err.code, "message": err.message}}


def response_line(req: BatchRequest, out: Any, model_name: str, created: int,
                  token_text: Callable[[int], str] | None = None, prompt_text: str | None = None) -> dict:
    """The output line of a finished request; `out` is a RequestOutput (finish_reason 'stop' or 'length');
    `prompt_text`: the prompt as text, for echo."""
    body = chat_body(req, out, model_name, created, token_text) if req.is_chat else \
        completion_body(req, out, model_name, created, token_text, prompt_text)
    return {"id": output_id(req.line_no), "custom_id": req.custom_id,
            "response": {"status_code": 200, "request_id": f"req_{req.line_no}", "body": body}, "error": None}


def usage(out: Any) -> dict:
    """OpenAI usage of a RequestOutput (completion tokens over all n choices)."""
    p = len(out.prompt_token_ids)
    c = sum(len(o.token_ids) for o in out.outputs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": int(out.num_cached_tokens or 0)}}


def chat_body(req: BatchRequest, out: Any, model_name: str, created: int,
              token_text: Callable[[int], str] | None = None) -> dict:
    choices = []
    for o in sorted(out.outputs, key=lambda c: c.index):
        k = req.sampling.get("logprobs")
        lp = _chat_logprobs(o, k, token_text) if k is not None else None
        choices.append(_constrained(o, {"index": o.index, "message": {"role": "assistant", "content": o.text},
                                        "logprobs": lp, "finish_reason": _finish(o.finish_reason)}))
    return {"id": f"chatcmpl-{req.line_no}", "object": "chat.completion", "created": created,
            "model": model_name, "choices": choices, "usage": usage(out)}


def completion_body(req: BatchRequest, out: Any, model_name: str, created: int,
                    token_text: Callable[[int], str] | None = None, prompt_text: str | None = None) -> dict:
    """With `echo`, each choice's text starts with the prompt's (`prompt_text`) and its logprobs with the prompt's
    tokens (the first one's logprob null, as the legacy API's)."""
    choices = []
    for o in sorted(out.outputs, key=lambda c: c.index):
        k = req.sampling.get("logprobs")
        entries = _token_entries(o, k, token_text) if k is not None else None
        text = o.text
        if req.echo:
            text = (prompt_text or "") + text
            if entries is not None:
                entries = _prompt_entries(out, k, token_text) + entries
        lp = _completion_logprobs(entries) if entries is not None else None
        choices.append(_constrained(o, {"index": o.index, "text": text, "logprobs": lp,
                                        "finish_reason": _finish(o.finish_reason)}))
    return {"id": f"cmpl-{req.line_no}", "object": "text_completion", "created": created,
            "model": model_name, "choices": choices, "usage": usage(out)}


def _constrained(o: Any, choice: dict) -> dict:
    """A constrained choice says whether its text is complete under the constraint (false: max_tokens cut it)."""
    complete = getattr(o, "structured_output_complete", None)
    if complete is not None:
        choice["structured_output_complete"] = complete
    return choice


def _finish(reason: Any) -> str:
    return "length" if reason == "length" else "stop"


Entry = tuple[str, float | None, list]  # (token text, its logprob, [(text, logprob) of the k most likely, best first])


def _entries(token_ids, logprobs, k: int, token_text: Callable[[int], str] | None) -> list[Entry]:
    """One entry per token, from its {token: logprob} dict (missing or None: no logprob)."""
    text_of = token_text or str
    entries = []
    for i, tid in enumerate(token_ids):
        d = (logprobs[i] if logprobs is not None and i < len(logprobs) else None) or {}
        top = sorted(d.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
        lp = d.get(tid)
        entries.append((text_of(tid), None if lp is None else float(lp), [(text_of(t), float(v)) for t, v in top]))
    return entries


def _token_entries(o: Any, k: int, token_text: Callable[[int], str] | None) -> list[Entry]:
    """The generated tokens' entries."""
    return _entries(o.token_ids, o.logprobs, k, token_text)


def _prompt_entries(out: Any, k: int, token_text: Callable[[int], str] | None) -> list[Entry]:
    """The prompt tokens' entries, from the output's prompt_logprobs (the first token has none)."""
    return _entries(out.prompt_token_ids, out.prompt_logprobs, k, token_text)


def _chat_logprobs(o: Any, k: int, token_text: Callable[[int], str] | None) -> dict:
    content = []
    for tok, lp, top in _token_entries(o, k, token_text):
        content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))}
                                         for t, v in top]})
    return {"content": content}


def _completion_logprobs(entries: list[Entry]) -> dict:
    offsets, pos = [], 0
    for tok, _, _ in entries:
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [dict(e[2]) for e in entries], "text_offset": offsets}

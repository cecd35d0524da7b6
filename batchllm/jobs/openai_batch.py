"""OpenAI Batch input lines: parse and validate them (their output lines are `batchllm.jobs.openai_output`).

Input line:  {"custom_id": str, "method": "POST", "url": "/v1/chat/completions" | "/v1/completions", "body": {...}}
Output line: {"id", "custom_id", "response": {"status_code", "request_id", "body"} | null, "error": {...} | null}

Nothing here imports torch or loads a model: validation needs only a tokenizer and the context length.
Defaults chosen here (documented for users):
- max_tokens absent: min(default cap, context length - prompt length), like servers that fill the remaining context.
- Unknown body fields are rejected (the OpenAI API does the same), except harmless ones listed in IGNORED_FIELDS.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from batchllm.inputs import E_CONTEXT, E_PARAM, InvalidPrompt, PromptInput, check_fits
from batchllm.sampling_params import StructuredOutputsParams

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"
URLS = (CHAT_URL, COMPLETIONS_URL)
DEFAULT_MAX_TOKENS_CAP = 1024

REQUIRED_FIELDS = ("custom_id", "method", "url", "body")
CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
# Accepted and ignored: they change nothing in an offline run.
IGNORED_FIELDS = frozenset({"model", "user", "metadata", "store", "service_tier", "parallel_tool_calls"})
COMMON_FIELDS = frozenset({
    "max_tokens", "temperature", "top_p", "n", "stop", "seed", "logprobs", "presence_penalty", "frequency_penalty",
    # extensions accepted by vLLM and SGLang servers
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids", "skip_special_tokens",
    # accepted only with their neutral value
    "stream", "stream_options", "logit_bias",
    # structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* fields
    "response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
})
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}

# Error codes of error lines (E_PARAM and E_CONTEXT come from batchllm.inputs, which checks prompts for every
# front end).
E_JSON = "invalid_json"
E_MISSING = "missing_field"
E_URL = "invalid_url"
E_METHOD = "invalid_method"
E_REQUEST = "invalid_request"
E_DUPLICATE = "duplicate_custom_id"
E_ENGINE = "request_failed"

# A line that cannot run: an error code and a message without the line prefix.
InvalidLine = InvalidPrompt


@dataclass(frozen=True)
class LineError:
    """One bad input line; becomes an error line in the output."""

    line_no: int
    custom_id: str | None
    code: str
    message: str  # already prefixed with "line N: "


@dataclass(frozen=True)
class BatchRequest:
    """A structurally valid input line. `sampling` holds SamplingParams keyword arguments; max_tokens may be None
    (filled in by `resolve_max_tokens` once the prompt length is known)."""

    line_no: int
    custom_id: str
    url: str
    model: str | None
    sampling: dict[str, Any] = field(default_factory=dict)
    messages: tuple[dict[str, str], ...] | None = None  # chat
    prompt: str | None = None  # completions, text prompt
    prompt_token_ids: tuple[int, ...] | None = None  # completions, token prompt
    echo: bool = False  # completions: the output's text and logprobs start with the prompt's

    @property
    def is_chat(self) -> bool:
        return self.url == CHAT_URL

    @property
    def prompt_input(self) -> PromptInput:
        if self.messages is not None:
            return PromptInput(messages=self.messages)
        if self.prompt_token_ids is not None:
            return PromptInput(token_ids=self.prompt_token_ids)
        return PromptInput(text=self.prompt)


def line_error(line_no: int, custom_id: str | None, code: str, message: str) -> LineError:
    """A LineError whose message names the input line number."""
    return LineError(line_no, custom_id, code, f"line {line_no}: {message}")


# ----------------------------------------------------------------------------------------------------------------
# parsing


def parse_line(text: str | bytes, line_no: int) -> BatchRequest | LineError:
    """Parse one non-blank input line; structural and parameter checks only (no tokenizer)."""
    custom_id = None
    try:
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidLine(E_JSON, f"not UTF-8 ({e.reason} at byte {e.start})") from None
        text = text.removeprefix("\ufeff")  # a byte order mark (files concatenated with one) is not content
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise InvalidLine(E_JSON, f"not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise InvalidLine(E_JSON, "not valid JSON here: nested too deeply") from None
        except ValueError as e:  # e.g. an integer of more digits than Python converts
            raise InvalidLine(E_JSON, f"not valid JSON here: {e}") from None
        if not isinstance(obj, dict):
            raise InvalidLine(E_JSON, f"expected a JSON object, got {type(obj).__name__}")
        cid = obj.get("custom_id")
        if isinstance(cid, str) and cid:
            custom_id = cid
        missing = [k for k in REQUIRED_FIELDS if k not in obj]
        if missing:
            raise InvalidLine(E_MISSING, "missing field(s): " + ", ".join(missing))
        if custom_id is None:
            raise InvalidLine(E_REQUEST, "custom_id must be a non-empty string")
        if obj["url"] not in URLS:
            raise InvalidLine(E_URL, f"unknown url {obj['url']!r}; supported: {', '.join(URLS)}")
        if obj["method"] != "POST":
            raise InvalidLine(E_METHOD, f"method must be 'POST', got {obj['method']!r}")
        body = obj["body"]
        if not isinstance(body, dict):
            raise InvalidLine(E_REQUEST, "body must be a JSON object")
        return _parse_body(body, obj["url"], custom_id, line_no)
    except InvalidLine as e:
        return line_error(line_no, custom_id, e.code, e.message)


def _parse_body(body: dict, url: str, custom_id: str, line_no: int) -> BatchRequest:
    """Check the endpoint body; raises InvalidLine."""
    chat = url == CHAT_URL
    allowed = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(k for k in body if k not in allowed and k not in IGNORED_FIELDS)
    if unknown:
        raise InvalidLine(E_PARAM, f"unsupported parameter(s) for {url}: {', '.join(unknown)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidLine(E_PARAM, "model must be a string")
    sampling = sampling_kwargs(body, chat)
    if chat:
        messages = _parse_messages(body.get("messages", _MISSING))
        return BatchRequest(line_no, custom_id, url, model, sampling, messages=messages)
    prompt, ids = _parse_prompt(body.get("prompt", _MISSING))
    return BatchRequest(line_no, custom_id, url, model, sampling, prompt=prompt, prompt_token_ids=ids,
                        echo=bool(body.get("echo")))


_MISSING = object()


def _parse_messages(messages: Any) -> tuple[dict[str, str], ...]:
    """Chat messages as (role, content-text) dicts; list-of-parts contents are joined text parts."""
    if messages is _MISSING:
        raise InvalidLine(E_MISSING, "body.messages is required for /v1/chat/completions")
    if not isinstance(messages, list) or not messages:
        raise InvalidLine(E_PARAM, "body.messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidLine(E_PARAM, f"body.messages[{i}] must be an object")
        role = m.get("role")
        if role not in CHAT_ROLES:
            raise InvalidLine(E_PARAM, f"body.messages[{i}].role must be one of {sorted(CHAT_ROLES)}, got {role!r}")
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise InvalidLine(E_PARAM, f"body.messages[{i}].content: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if not isinstance(content, str):
            raise InvalidLine(E_PARAM, f"body.messages[{i}].content must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    return tuple(out)


def _parse_prompt(prompt: Any) -> tuple[str | None, tuple[int, ...] | None]:
    """A completions prompt: a string, a list of token ids, or a list holding exactly one of those."""
    if prompt is _MISSING:
        raise InvalidLine(E_MISSING, "body.prompt is required for /v1/completions")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt, None
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return None, tuple(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise InvalidLine(E_PARAM, "body.prompt: one prompt per line (a batch of prompts is not supported)")
    raise InvalidLine(E_PARAM, "body.prompt must be a string or a non-empty list of non-negative token ids")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _num(body: dict, key: str, lo: float, hi: float, lo_open: bool = False) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_num(v) or v > hi or v < lo or (lo_open and v == lo):
        lo_s = f"({lo}" if lo_open else f"[{lo}"
        raise InvalidLine(E_PARAM, f"{key} must be a number in {lo_s}, {hi}], got {v!r}")
    return float(v)


def _int(body: dict, key: str, lo: int, hi: int | None = None) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise InvalidLine(E_PARAM, f"{key} must be an integer {rng}, got {v!r}")
    return v


def _neutral(body: dict, key: str, ok: Callable[[Any], bool], what: str) -> None:
    if key in body and body[key] is not None and not ok(body[key]):
        raise InvalidLine(E_PARAM, f"{key}: {what}")


def sampling_kwargs(body: dict, chat: bool) -> dict[str, Any]:
    """Map an endpoint body onto SamplingParams keyword arguments (only the fields present). Raises InvalidLine.

    max_tokens is always present in the result (None when absent: see resolve_max_tokens)."""
    _neutral(body, "stream", lambda v: v is False, "streaming is not supported in batch jobs")
    _neutral(body, "stream_options", lambda v: False, "not supported in batch jobs")
    _neutral(body, "logit_bias", lambda v: v == {}, "not supported")
    _neutral(body, "echo", lambda v: isinstance(v, bool), "echo must be a boolean")
    _neutral(body, "suffix", lambda v: False, "suffix is not supported")
    kw: dict[str, Any] = {}
    echo = bool(body.get("echo"))
    max_tokens = _int(body, "max_tokens", 0 if echo else 1)  # echo with max_tokens 0: score the prompt only
    if chat:
        mct = _int(body, "max_completion_tokens", 1)
        if mct is not None and max_tokens is not None and mct != max_tokens:
            raise InvalidLine(E_PARAM, "max_tokens and max_completion_tokens disagree")
        max_tokens = mct if mct is not None else max_tokens
    kw["max_tokens"] = max_tokens
    for key, lo, hi, lo_open in (("temperature", 0.0, 2.0, False), ("top_p", 0.0, 1.0, True),
                                 ("presence_penalty", -2.0, 2.0, False), ("frequency_penalty", -2.0, 2.0, False),
                                 ("min_p", 0.0, 1.0, False), ("repetition_penalty", 0.0, 2.0, True)):
        v = _num(body, key, lo, hi, lo_open)
        if v is not None:
            kw[key] = v
    n = _int(body, "n", 1, 128)
    if n is not None:
        kw["n"] = n
    best_of = _int(body, "best_of", 1, 128)
    if best_of is not None and best_of != (n or 1):
        raise InvalidLine(E_PARAM, "best_of other than n is not supported")
    seed = body.get("seed")
    if seed is not None:
        if not _is_int(seed):
            raise InvalidLine(E_PARAM, f"seed must be an integer, got {seed!r}")
        kw["seed"] = seed
    top_k = body.get("top_k")
    if top_k is not None:
        if not _is_int(top_k) or top_k < -1:
            raise InvalidLine(E_PARAM, f"top_k must be an integer >= -1, got {top_k!r}")
        kw["top_k"] = max(top_k, 0)
    min_tokens = _int(body, "min_tokens", 0)
    if min_tokens is not None:
        kw["min_tokens"] = min_tokens
    for key in ("ignore_eos", "skip_special_tokens"):
        v = body.get(key)
        if v is not None:
            if not isinstance(v, bool):
                raise InvalidLine(E_PARAM, f"{key} must be a boolean, got {v!r}")
            kw[key] = v
    stop = body.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not (isinstance(stop, list) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop)):
            raise InvalidLine(E_PARAM, "stop must be a non-empty string or a list of at most 4 non-empty strings")
        if stop:
            kw["stop"] = list(stop)
    sti = body.get("stop_token_ids")
    if sti is not None:
        if not (isinstance(sti, list) and all(_is_int(t) and t >= 0 for t in sti)):
            raise InvalidLine(E_PARAM, "stop_token_ids must be a list of non-negative integers")
        if sti:
            kw["stop_token_ids"] = list(sti)
    _logprobs_kwargs(body, chat, kw)
    constraint = structured_outputs(body)
    if constraint is not None:
        kw["structured_outputs"] = constraint
    if echo and kw.get("logprobs") is not None:
        kw["prompt_logprobs"] = kw["logprobs"]  # the legacy API's echo: logprobs of the prompt's tokens too
    if echo and max_tokens == 0 and "prompt_logprobs" not in kw:
        raise InvalidLine(E_PARAM, "max_tokens 0 with echo needs logprobs (what else would the line return?)")
    return kw


def structured_outputs(body: dict) -> StructuredOutputsParams | None:
    """The body's output constraint, from exactly one of: `response_format` ({"type": "json_object"} or
    {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}; {"type": "text"} is none), vLLM's
    `structured_outputs` object (json, regex, choice, grammar, json_object) or its older `guided_json`,
    `guided_regex`, `guided_choice`, `guided_grammar`. Raises InvalidLine naming the field. (Whether the grammar
    compiles is checked with the tokenizer, in `jobs.scan.Validator`.)"""
    given = [k for k in ("response_format", "structured_outputs", "guided_json", "guided_regex", "guided_choice",
                         "guided_grammar") if body.get(k) is not None]
    if not given or given == ["response_format"] and body["response_format"] == {"type": "text"}:
        return None
    if len(given) > 1:
        raise InvalidLine(E_PARAM, f"one output constraint per request, got {', '.join(given)}")
    field_name, value = given[0], body[given[0]]
    try:
        if field_name == "structured_outputs":
            return StructuredOutputsParams.from_dict(value)
        if field_name.startswith("guided_"):
            return StructuredOutputsParams(**{field_name[len("guided_"):]: value})
        return _response_format(value)
    except ValueError as e:
        raise InvalidLine(E_PARAM, f"{field_name}: {e}") from None


def _response_format(value: Any) -> StructuredOutputsParams | None:
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise ValueError("type must be 'text', 'json_object' or 'json_schema'")
    kind = value["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError("json_schema must be an object with a 'schema' object (and a 'name')")
    if "name" in spec and not isinstance(spec["name"], str):
        raise ValueError("json_schema.name must be a string")
    if "strict" in spec and not isinstance(spec["strict"], bool | None):
        raise ValueError("json_schema.strict must be a boolean")
    return StructuredOutputsParams(json=spec["schema"])


def _logprobs_kwargs(body: dict, chat: bool, kw: dict[str, Any]) -> None:
    """Chat: logprobs bool + top_logprobs int (0..20); completions: logprobs int (0..20). Writes kw["logprobs"]."""
    lp = body.get("logprobs")
    if chat:
        if lp is not None and not isinstance(lp, bool):
            raise InvalidLine(E_PARAM, f"logprobs must be a boolean for {CHAT_URL}, got {lp!r}")
        top = _int(body, "top_logprobs", 0, 20)
        if top is not None and not lp:
            raise InvalidLine(E_PARAM, "top_logprobs requires logprobs: true")
        if lp:
            kw["logprobs"] = top or 0
    elif lp is not None:
        if not _is_int(lp) or not 0 <= lp <= 20:
            raise InvalidLine(E_PARAM, f"logprobs must be an integer in [0, 20] for {COMPLETIONS_URL}, got {lp!r}")
        kw["logprobs"] = lp


def resolve_max_tokens(requested: int | None, prompt_len: int, max_model_len: int | None,
                       default_cap: int = DEFAULT_MAX_TOKENS_CAP) -> int:
    """The max_tokens a request runs with. Raises InvalidLine (context_length_exceeded) when it cannot fit."""
    if max_model_len is None:
        return requested if requested is not None else default_cap
    room = max_model_len - prompt_len
    if room < 1:
        raise InvalidLine(E_CONTEXT, f"the prompt has {prompt_len} tokens; the model's context is {max_model_len} "
                                     "tokens, which leaves no room for a completion")
    if requested is None:
        return min(default_cap, room)
    error = check_fits(prompt_len, requested, max_model_len)
    if error is not None:
        raise error
    return requested


def read_context_length(config: dict) -> int | None:
    """The model's context length from a HF config.json dict (None when it does not say)."""
    for src in (config, config.get("text_config") or {}):
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            v = src.get(key)
            if _is_int(v) and v > 0:
                return v
    return None

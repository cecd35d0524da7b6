"""Parsing, parameter mapping and output lines of the OpenAI Batch format (no model, no tokenizer)."""

import json
from types import SimpleNamespace

import pytest

from batchllm.jobs import openai_batch as ob
from batchllm.jobs import openai_output as oo


def line(custom_id="a", url=ob.CHAT_URL, body=None, **extra):
    if body is None:
        body = {"messages": [{"role": "user", "content": "hi"}]} if url == ob.CHAT_URL else {"prompt": "hi"}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra})


def err(text, n=7):
    r = ob.parse_line(text, n)
    assert isinstance(r, ob.LineError), r
    return r


def test_chat_line_maps_every_field():
    body = {"model": "m", "messages": [{"role": "system", "content": "s"},
                                       {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]}],
            "max_completion_tokens": 9, "temperature": 0, "top_p": 0.5, "n": 2, "stop": "x", "seed": 3,
            "logprobs": True, "top_logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": -1}
    r = ob.parse_line(line("c1", body=body), 4)
    assert isinstance(r, ob.BatchRequest)
    assert (r.line_no, r.custom_id, r.url, r.model, r.is_chat) == (4, "c1", ob.CHAT_URL, "m", True)
    assert r.messages == ({"role": "system", "content": "s"}, {"role": "user", "content": "ab"})
    assert r.sampling == {"max_tokens": 9, "temperature": 0.0, "top_p": 0.5, "n": 2, "stop": ["x"], "seed": 3,
                          "logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": -1.0}


def test_completion_line_maps_fields_and_token_prompt():
    r = ob.parse_line(line("c", ob.COMPLETIONS_URL, {"prompt": [5, 6, 7], "max_tokens": 3, "logprobs": 1,
                                                     "top_k": -1, "ignore_eos": True, "stop_token_ids": [2]}), 1)
    assert isinstance(r, ob.BatchRequest) and not r.is_chat
    assert (r.prompt, r.prompt_token_ids) == (None, (5, 6, 7))
    assert r.sampling == {"max_tokens": 3, "logprobs": 1, "top_k": 0, "ignore_eos": True, "stop_token_ids": [2]}
    r = ob.parse_line(line("c", ob.COMPLETIONS_URL, {"prompt": ["text"]}), 1)
    assert (r.prompt, r.prompt_token_ids, r.sampling) == ("text", None, {"max_tokens": None})
    # chat logprobs false -> no logprobs at all
    r = ob.parse_line(line(body={"messages": [{"role": "user", "content": "q"}], "logprobs": False}), 1)
    assert r.sampling == {"max_tokens": None}


@pytest.mark.parametrize("text,code,custom_id,words", [
    ("{not json", ob.E_JSON, None, "not valid JSON"),
    (b"\xff\xfe", ob.E_JSON, None, "not UTF-8"),
    ("[1, 2]", ob.E_JSON, None, "expected a JSON object"),
    (json.dumps({"custom_id": "k", "url": ob.CHAT_URL, "body": {}}), ob.E_MISSING, "k", "method"),
    (json.dumps({"method": "POST", "url": ob.CHAT_URL, "body": {}}), ob.E_MISSING, None, "custom_id"),
    (json.dumps({"custom_id": 5, "method": "POST", "url": ob.CHAT_URL, "body": {}}), ob.E_REQUEST, None,
     "custom_id must be"),
    (line(url="/v1/embeddings"), ob.E_URL, "a", "/v1/embeddings"),
    (line(method="GET"), ob.E_METHOD, "a", "GET"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": ob.CHAT_URL, "body": []}), ob.E_REQUEST, "a", "body"),
    (line(body={}), ob.E_MISSING, "a", "messages"),
    (line(url=ob.COMPLETIONS_URL, body={}), ob.E_MISSING, "a", "prompt"),
    (line(body={"messages": []}), ob.E_PARAM, "a", "non-empty"),
    (line(body={"messages": [{"role": "robot", "content": "x"}]}), ob.E_PARAM, "a", "role"),
    (line(body={"messages": [{"role": "user", "content": 3}]}), ob.E_PARAM, "a", "content"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "temperature": 3}), ob.E_PARAM, "a", "temperature"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "temperature": "0"}), ob.E_PARAM, "a", "temperature"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "top_p": 0}), ob.E_PARAM, "a", "top_p"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), ob.E_PARAM, "a", "max_tokens"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": True}), ob.E_PARAM, "a", "max_tokens"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "n": 0}), ob.E_PARAM, "a", "n must"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}), ob.E_PARAM,
     "a", "stop"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "seed": 1.5}), ob.E_PARAM, "a", "seed"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "logprobs": 2}), ob.E_PARAM, "a", "boolean"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}), ob.E_PARAM, "a",
     "requires logprobs"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "presence_penalty": -3}), ob.E_PARAM, "a",
     "presence_penalty"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "stream": True}), ob.E_PARAM, "a", "stream"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "tools": []}), ob.E_PARAM, "a", "tools"),
    (line(body={"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 4}),
     ob.E_PARAM, "a", "disagree"),
    (line(url=ob.COMPLETIONS_URL, body={"prompt": "x", "logprobs": True}), ob.E_PARAM, "a", "logprobs"),
    (line(url=ob.COMPLETIONS_URL, body={"prompt": ["x", "y"]}), ob.E_PARAM, "a", "one prompt per line"),
    (line(url=ob.COMPLETIONS_URL, body={"prompt": [1, -2]}), ob.E_PARAM, "a", "token ids"),
    (line(url=ob.COMPLETIONS_URL, body={"prompt": [1, 1.7]}), ob.E_PARAM, "a", "token ids"),
    (line(url=ob.COMPLETIONS_URL, body={"prompt": [1, True]}), ob.E_PARAM, "a", "token ids"),
    (line(url=ob.COMPLETIONS_URL, body={"prompt": "x", "echo": "yes"}), ob.E_PARAM, "a", "echo must be a boolean"),
    (line(url=ob.COMPLETIONS_URL, body={"prompt": "x", "echo": True, "max_tokens": 0}), ob.E_PARAM, "a",
     "echo needs logprobs"),
])
def test_bad_lines_give_error_with_line_number(text, code, custom_id, words):
    e = err(text, 7)
    assert (e.line_no, e.code, e.custom_id) == (7, code, custom_id)
    assert e.message.startswith("line 7: ")
    assert words in e.message
    out = oo.error_line(e)
    assert out == {"id": "batch_req_7", "custom_id": custom_id, "response": None,
                   "error": {"code": code, "message": e.message}}


def test_resolve_max_tokens_defaults_and_context():
    assert ob.resolve_max_tokens(None, 10, 100, 1024) == 90
    assert ob.resolve_max_tokens(None, 10, 2000, 1024) == 1024
    assert ob.resolve_max_tokens(5, 10, 100) == 5
    assert ob.resolve_max_tokens(90, 10, 100) == 90
    assert ob.resolve_max_tokens(None, 10, None, 7) == 7
    with pytest.raises(ob.InvalidLine) as e:
        ob.resolve_max_tokens(91, 10, 100)
    assert e.value.code == ob.E_CONTEXT and "101" in e.value.message
    with pytest.raises(ob.InvalidLine) as e:
        ob.resolve_max_tokens(None, 100, 100)
    assert e.value.code == ob.E_CONTEXT


def test_read_context_length():
    assert ob.read_context_length({"max_position_embeddings": 512, "n_positions": 9}) == 512
    assert ob.read_context_length({"n_positions": 9}) == 9
    assert ob.read_context_length({"text_config": {"max_position_embeddings": 64}}) == 64
    assert ob.read_context_length({}) is None


def test_output_id_round_trip():
    assert oo.output_id(12) == "batch_req_12"
    assert oo.line_no_of_output_id("batch_req_12") == 12
    assert oo.line_no_of_output_id("batch_req_x") is None
    assert oo.line_no_of_output_id(None) is None


def _out(choices, prompt_ids=(1, 2, 3), cached=2):
    return SimpleNamespace(request_id="0", prompt=None, prompt_token_ids=list(prompt_ids), num_cached_tokens=cached,
                           finished=True, error=None, outputs=[SimpleNamespace(**c) for c in choices])


def test_chat_response_line_field_by_field():
    req = ob.parse_line(line("q1", body={"messages": [{"role": "user", "content": "x"}], "n": 2}), 3)
    out = _out([{"index": 1, "text": "B", "token_ids": [9], "finish_reason": "length", "logprobs": None},
                {"index": 0, "text": "A!", "token_ids": [7, 8], "finish_reason": "stop", "logprobs": None}])
    got = oo.response_line(req, out, "tiny", 1700000000)
    assert got == {
        "id": "batch_req_3", "custom_id": "q1", "error": None,
        "response": {"status_code": 200, "request_id": "req_3", "body": {
            "id": "chatcmpl-3", "object": "chat.completion", "created": 1700000000, "model": "tiny",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "A!"}, "logprobs": None,
                 "finish_reason": "stop"},
                {"index": 1, "message": {"role": "assistant", "content": "B"}, "logprobs": None,
                 "finish_reason": "length"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                      "prompt_tokens_details": {"cached_tokens": 2}}}}}


def test_completion_response_line_with_logprobs():
    req = ob.parse_line(line("p", ob.COMPLETIONS_URL, {"prompt": "x", "model": "given", "logprobs": 1}), 5)
    out = _out([{"index": 0, "text": "ab", "token_ids": [1, 2], "finish_reason": "length",
                 "logprobs": [{1: -0.5, 3: -0.25}, {2: -0.125}]}], prompt_ids=(4,), cached=0)
    names = {1: "a", 2: "b", 3: "c"}
    got = oo.response_line(req, out, "tiny", 5, names.__getitem__)
    body = got["response"]["body"]
    # the model that ran, not the one the request named ("given")
    assert (body["id"], body["object"], body["model"]) == ("cmpl-5", "text_completion", "tiny")
    assert body["choices"] == [{"index": 0, "text": "ab", "finish_reason": "length", "logprobs": {
        "tokens": ["a", "b"], "token_logprobs": [-0.5, -0.125], "top_logprobs": [{"c": -0.25}, {"b": -0.125}],
        "text_offset": [0, 1]}}]
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_chat_logprobs_shape():
    req = ob.parse_line(line(body={"messages": [{"role": "user", "content": "x"}], "logprobs": True}), 1)
    out = _out([{"index": 0, "text": "é", "token_ids": [1], "finish_reason": "stop", "logprobs": [{1: -1.0, 2: -2.0}]}])
    lp = oo.response_line(req, out, "m", 0, {1: "é", 2: "z"}.__getitem__)["response"]["body"]["choices"][0]["logprobs"]
    # logprobs true without top_logprobs: the sampled token only, no alternatives
    assert lp == {"content": [{"token": "é", "logprob": -1.0, "bytes": [195, 169], "top_logprobs": []}]}

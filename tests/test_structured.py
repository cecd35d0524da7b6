"""Structured outputs: greedy constrained decoding equals HF transformers' generate with the same llguidance
constraint as a logits processor (fp32), every output parses and validates or matches, choices are always one of the
list, a constraint that cannot compile fails its request alone, max_tokens cutting an output says so, rows without a
constraint are untouched, and each distinct constraint compiles once."""

import json
import re

import jsonschema
import pytest
import torch
from hf_reference import load_hf_model
from kernel_paths import isa_params
from transformers import LogitsProcessor, LogitsProcessorList

from batchllm import LLM, SamplingParams, StructuredOutputsParams
from batchllm.structured import Grammars, apply_bitmask

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]},
                                                    "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}


class LLGuidanceProcessor(LogitsProcessor):
    """HF logits processor: the same llguidance matcher batchllm uses, one prompt (batch of 1)."""

    def __init__(self, matcher, prompt_len: int, vocab_size: int):
        self.matcher, self.prompt_len, self.vocab = matcher, prompt_len, vocab_size

    def __call__(self, input_ids, scores):
        import llguidance.torch as lt

        if input_ids.shape[1] > self.prompt_len:
            assert self.matcher.consume_token(int(input_ids[0, -1]))
        mask = lt.allocate_token_bitmask(1, self.vocab)
        lt.fill_next_token_bitmask(self.matcher, mask, 0)
        scores = scores.clone()
        apply_bitmask(scores, torch.tensor([0]), mask)
        return scores


def hf_constrained(model_dir, grammars: Grammars, params: StructuredOutputsParams, prompt: list[int],
                   max_new_tokens: int) -> list[int]:
    """HF greedy generate under the constraint; the output ends at EOS or at max_new_tokens."""
    model = load_hf_model(model_dir)
    proc = LLGuidanceProcessor(grammars.matcher(params), len(prompt), model.config.vocab_size)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             logits_processor=LogitsProcessorList([proc]), do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=sorted(grammars.eos_token_ids),
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def engine_vs_hf(model_dir, llm, prompts, params_list, max_tokens):
    outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=p)
                                  for p in params_list], use_tqdm=False)
    grammars, eos = llm.engine.grammars, llm.engine.eos_token_ids
    for out, params in zip(outs, params_list):
        got = out.outputs[0]
        want = hf_constrained(model_dir, grammars, params, out.prompt_token_ids, max_tokens)
        n = len(got.token_ids)
        if got.finish_reason == "stop" and (not n or got.token_ids[-1] not in eos):
            # the grammar ended the output: batchllm stops at once, HF can then only emit an EOS
            assert want[:n] == got.token_ids and (len(want) == n or (len(want) == n + 1 and want[n] in eos)), \
                (params, got.text, want)
        else:
            assert got.token_ids == want, (params, got.text)
    return outs


def test_constrained_greedy_equals_hf_with_the_same_constraint(tiny_llama):
    """A batch mixing JSON, regex, choice and grammar constraints over prompts sharing a prefix, small chunks and
    a tight KV budget: every output equals HF generate with the llguidance constraint, token for token."""
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, max_num_batched_tokens=24,
              kv_cache_memory_bytes=48 * 2048)
    shared = [1] + [(7 * i) % 400 + 4 for i in range(19)]
    prompts = [{"prompt_token_ids": shared + [5 + i, 9 + i]} for i in range(5)] + [{"prompt_token_ids": [1, 77, 78]}]
    params = [StructuredOutputsParams(json=PERSON), StructuredOutputsParams(regex=r"[a-c]{2,5}-\d{3}"),
              StructuredOutputsParams(choice=["the river", "a mountain", "the old station"]),
              StructuredOutputsParams(grammar='start: "(" item ("," item)* ")"\nitem: /[0-9]+/\n'),
              StructuredOutputsParams(json_object=True, disable_any_whitespace=True),
              StructuredOutputsParams(json=PERSON, disable_any_whitespace=True)]
    outs = engine_vs_hf(tiny_llama, llm, prompts, params, max_tokens=40)
    texts = [o.outputs[0] for o in outs]
    if texts[0].finish_reason == "stop":
        jsonschema.validate(json.loads(texts[0].text), PERSON)
    assert texts[2].text in ("the river", "a mountain", "the old station") and texts[2].finish_reason == "stop"


def test_smollm2_extraction_parses_validates_and_equals_hf(smollm2):
    llm = LLM(str(smollm2), dtype="float32", kv_cache_memory_bytes=64 << 20)
    tok = llm.get_tokenizer()
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    people = ["Ada Lovelace was 36 years old.", "Alan Turing died aged 41.", "Grace Hopper lived to 85."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": f"Extract name and age as JSON: {p}"}],
                                       tokenize=False, add_generation_prompt=True) for p in people]
    outs = engine_vs_hf(smollm2, llm, prompts, [StructuredOutputsParams(json=schema)] * 3, max_tokens=48)
    for out, person in zip(outs, people):
        value = json.loads(out.outputs[0].text)
        jsonschema.validate(value, schema)
        assert value["name"] in person and str(value["age"]) in person
        assert out.outputs[0].structured_output_complete is True


def test_sampled_outputs_always_validate_and_choices_are_from_the_list(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 20)
    choices = ["positive", "negative", "neutral", "mixed", "unrelated"]
    prompts = [{"prompt_token_ids": [1, 10 + i, 20 + i]} for i in range(12)]
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, n=2, seed=3, max_tokens=8,
                                                structured_outputs=StructuredOutputsParams(choice=choices)),
                        use_tqdm=False)
    for out in outs:
        for sample in out.outputs:
            assert sample.text in choices and sample.finish_reason == "stop"
    outs = llm.generate(prompts, SamplingParams(temperature=1.2, seed=5, max_tokens=200,
                                                structured_outputs=StructuredOutputsParams(json=PERSON)),
                        use_tqdm=False)
    for out in outs:
        sample = out.outputs[0]
        if sample.finish_reason == "stop":
            jsonschema.validate(json.loads(sample.text), PERSON)
            assert sample.structured_output_complete is True
        else:
            assert sample.structured_output_complete is False
    pattern = r"(19|20)\d{2}-(0[1-9]|1[0-2])-[0-3]\d"
    outs = llm.generate(prompts, SamplingParams(temperature=1.0, seed=9, max_tokens=20,
                                                structured_outputs=StructuredOutputsParams(regex=pattern)),
                        use_tqdm=False)
    assert all(re.fullmatch(pattern, o.outputs[0].text) for o in outs)


def test_single_token_choices_take_one_step(tiny_llama):
    """Choices that are single tokens: the output is that one token, no EOS step after it."""
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 20)
    tok = llm.get_tokenizer()
    words = [w for w in ("a", "b", "c", "d", "e", "x", "y") if len(tok(w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(words) >= 3
    outs = llm.generate([{"prompt_token_ids": [1, 40 + i]} for i in range(6)],
                        SamplingParams(temperature=0.0, max_tokens=5,
                                       structured_outputs=StructuredOutputsParams(choice=words[:3])), use_tqdm=False)
    for out in outs:
        assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].text in words[:3]
    assert llm.stats().output_tokens == 6


def test_a_constraint_that_cannot_compile_fails_its_request_alone(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 20)
    bad = [StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "nonsense"}}}),
           StructuredOutputsParams(regex="(unclosed"), StructuredOutputsParams(grammar="start: missing_rule\n")]
    params = [SamplingParams(max_tokens=4, structured_outputs=b) for b in bad] + [SamplingParams(max_tokens=4)]
    outs = llm.generate([{"prompt_token_ids": [1, 5, 6]}] * 4, params, use_tqdm=False)
    for out in outs[:3]:
        assert out.error is not None and "cannot be compiled" in out.error
    assert outs[3].error is None and len(outs[3].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json=PERSON, regex="a")
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice="yes")


def test_max_tokens_cutting_a_json_says_it_is_incomplete(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 20)
    out = llm.generate([{"prompt_token_ids": [1, 5, 6]}], SamplingParams(
        temperature=0.0, max_tokens=3, structured_outputs=StructuredOutputsParams(json=PERSON)), use_tqdm=False)[0]
    sample = out.outputs[0]
    assert (sample.finish_reason, sample.structured_output_complete, len(sample.token_ids)) == ("length", False, 3)
    with pytest.raises(ValueError):
        json.loads(sample.text)


def test_rows_without_a_constraint_are_untouched_and_a_constraint_compiles_once(tiny_llama, monkeypatch):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 20)
    prompts = [{"prompt_token_ids": [1, 30 + i, 31 + i, 32]} for i in range(8)]
    plain = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    alone = llm.generate(prompts, plain, use_tqdm=False)
    compiled = []
    real = Grammars._compile
    monkeypatch.setattr(Grammars, "_compile", lambda self, key: compiled.append(key) or real(self, key))
    llm2 = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 20)
    constrained = SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=StructuredOutputsParams(
        json=json.dumps(PERSON)))
    mixed = llm2.generate(prompts * 2, [plain] * 8 + [constrained] * 8, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:8]] == [o.outputs[0].token_ids for o in alone]
    assert len(compiled) == 1  # eight requests, one schema (given as text): compiled once


def test_batch_file_response_formats_and_constraints(tiny_llama, tmp_path):
    """response_format json_schema / json_object, vLLM's structured_outputs and guided_* fields on chat and
    completion lines: every output parses, validates or matches; a schema that cannot compile, or a malformed
    response_format, becomes that line's error and the rest of the job runs."""
    from test_jobs_e2e import by_id, job_args

    from batchllm.jobs import command

    def line(cid, body, chat=True):
        url = "/v1/chat/completions" if chat else "/v1/completions"
        content = {"messages": [{"role": "user", "content": f"Describe {cid}"}]} if chat else {"prompt": f"Say {cid}"}
        return json.dumps({"custom_id": cid, "method": "POST", "url": url,
                           "body": {**content, "max_tokens": 60, "temperature": 0, **body}})

    schema_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    lines = [line("schema", {"response_format": schema_format}),
             line("object", {"response_format": {"type": "json_object"}, "max_tokens": 200}, chat=False),
             line("choice", {"structured_outputs": {"choice": ["yes", "no", "maybe"]}}),
             line("regex", {"guided_regex": r"[0-9]{3}-[a-z]{2}"}, chat=False),
             line("text", {"response_format": {"type": "text"}}),
             line("bad-schema", {"response_format": {"type": "json_schema", "json_schema": {
                 "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}}),
             line("bad-format", {"response_format": {"type": "yaml"}}),
             line("two", {"guided_choice": ["a"], "guided_regex": "a"}, chat=False)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    assert command.main(job_args(tiny_llama, inp, out, "--stats-json", tmp_path / "stats.json")) == 0
    recs = {r["custom_id"]: r for r in by_id(out).values()}
    body = {k: r["response"]["body"]["choices"][0] for k, r in recs.items() if r["error"] is None}
    text = {k: c["message"]["content"] if "message" in c else c["text"] for k, c in body.items()}
    assert set(body) == {"schema", "object", "choice", "regex", "text"}
    for k in ("schema", "object"):
        if body[k]["finish_reason"] == "stop":
            value = json.loads(text[k])
            jsonschema.validate(value, PERSON if k == "schema" else {"type": "object"})
        assert body[k]["structured_output_complete"] is (body[k]["finish_reason"] == "stop")
    assert text["choice"] in ("yes", "no", "maybe") and re.fullmatch(r"[0-9]{3}-[a-z]{2}", text["regex"])
    assert "structured_output_complete" not in body["text"]
    assert "line 6: the json constraint cannot be compiled" in recs["bad-schema"]["error"]["message"]
    assert recs["bad-format"]["error"]["message"].startswith("line 7: response_format: type must be")
    assert "one output constraint per request" in recs["two"]["error"]["message"]
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["structured_outputs_cut_short"] == sum(c.get("structured_output_complete") is False
                                                        for c in body.values())


@pytest.mark.parametrize("isa", isa_params(need_bf16=False))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_token_bitmask_kernel_equals_the_bit_by_bit_reference(isa, dtype, monkeypatch):
    """The C++ pass of every kernel path and the torch path (CUDA's) give the bit-by-bit reference: -inf exactly
    where a row's bit is 0 (all-zero, all-one and mixed words; a mask narrower than the vocabulary), other rows
    untouched."""
    from batchllm.model.cpu_kernels import load_cpu_kernels

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 100, generator=gen).to(dtype)  # [B, V]
    rows = torch.tensor([5, 0, 3])
    mask = torch.randint(-2**31, 2**31 - 1, (3, 3), generator=gen, dtype=torch.int32)  # 96 bits < V = 100
    mask[0, 0], mask[1, 1] = 0, -1
    bits = ((mask[:, :, None] >> torch.arange(32)) & 1).view(3, -1).bool()  # [3, 96]
    want = x.clone()
    for i, r in enumerate(rows.tolist()):
        want[r, :96][~bits[i]] = float("-inf")
        want[r, 96:] = float("-inf")
    got = x.clone()
    load_cpu_kernels(isa).apply_token_bitmask(got, rows, mask)
    assert torch.equal(got, want)
    monkeypatch.setattr("batchllm.model.cpu_kernels.load_cpu_kernels", lambda *a: None)
    got = x.clone()
    apply_bitmask(got, rows, mask)
    assert torch.equal(got, want)

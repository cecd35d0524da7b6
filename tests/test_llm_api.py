"""The vLLM-shaped API: prompt forms, per-request errors, n > 1, stops, seeds, logprobs, chat and stats."""

import math
import random

import pytest
import torch
from hf_reference import hf_greedy, hf_logprobs

from batchllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=8 << 20, block_size=4,
               max_num_batched_tokens=32)


def greedy(n=8, **kw):
    return SamplingParams(temperature=0.0, max_tokens=n, **kw)


def test_prompt_forms_give_the_same_answer(llm):
    tok = llm.get_tokenizer()
    text = "The river runs past the old library"
    ids = tok(text)["input_ids"]
    outs = llm.generate([text, {"prompt": text}, {"prompt_token_ids": ids}], greedy(ignore_eos=True), use_tqdm=False)
    assert outs[0].prompt_token_ids == ids
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids == outs[2].outputs[0].token_ids
    assert [o.request_id for o in outs] == ["0", "1", "2"]
    assert outs[0].prompt == text


def test_bad_requests_fail_alone(llm, tiny_llama):
    ctx = llm.model_config.max_model_len
    good = [1, 20, 30, 40]
    prompts = [
        {"prompt_token_ids": good},
        {"prompt_token_ids": [1] * (ctx - 2)},  # prompt + max_tokens beyond the context
        {"prompt_token_ids": []},
        {"prompt_token_ids": [1, 10 ** 9]},
        {"bogus": 1},
        {"prompt_token_ids": [1, 1.7]},  # never silently truncated to 1
        {"prompt_token_ids": good},
    ]
    outs = llm.generate(prompts, greedy(ignore_eos=True), use_tqdm=False)
    ref = hf_greedy(str(tiny_llama), [good], 8)[0]
    assert outs[0].error is None and outs[0].outputs[0].token_ids == ref
    assert outs[6].outputs[0].token_ids == ref
    for o, words in zip(outs[1:6], ["context", "empty", "vocabulary", "prompt must be", "must hold integers, got 1.7"]):
        assert o.outputs[0].finish_reason == "error"
        assert words in o.error
    assert llm.stats()["num_errors"] == 5


def test_request_larger_than_the_kv_cache_is_an_error(tiny_llama):
    small = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=4 * 2048, block_size=4)
    outs = small.generate([{"prompt_token_ids": [1] * 10}, {"prompt_token_ids": [1, 5]}],
                          greedy(n=8, ignore_eos=True), use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "KV" in outs[0].error
    assert outs[1].outputs[0].finish_reason == "length"


def test_stop_token_ids_and_max_tokens(llm, tiny_llama):
    # A prompt whose greedy continuation we know; make its 3rd generated token the stop token.
    prompt = [1, 50, 60, 70]
    ref = hf_greedy(str(tiny_llama), [prompt], 8)[0]
    out = llm.generate({"prompt_token_ids": prompt}, greedy(stop_token_ids=[ref[2]]), use_tqdm=False)[0]
    first = ref.index(ref[2])
    assert out.outputs[0].token_ids == ref[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == ref[2]
    out = llm.generate({"prompt_token_ids": prompt}, greedy(n=5, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "length" and out.outputs[0].token_ids == ref[:5]


def test_eos_stops_unless_ignored(tiny_llama, tmp_path):
    """The same model with its config's eos_token_id set to the 3rd greedy token: generation ends there, the eos
    included (as vLLM's token_ids), stop_reason None; with ignore_eos it runs to max_tokens."""
    import json
    import shutil

    prompt = [1, 50, 60, 70]
    ref = hf_greedy(str(tiny_llama), [prompt], 8)[0]
    eos = ref[2]
    model = tmp_path / "eos"
    shutil.copytree(tiny_llama, model)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((model / name).read_text())
        cfg["eos_token_id"] = eos
        (model / name).write_text(json.dumps(cfg))
    llm = LLM(str(model), dtype="float32", kv_cache_memory_bytes=1 << 20, block_size=4)
    assert llm.engine.eos_token_ids == {eos}
    out = llm.generate({"prompt_token_ids": prompt}, greedy(), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[: ref.index(eos) + 1]
    assert (out.finish_reason, out.stop_reason) == ("stop", None)
    out = llm.generate({"prompt_token_ids": prompt}, greedy(ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert (out.token_ids, out.finish_reason) == (ref, "length")


def test_min_tokens_defers_a_stop(llm, tiny_llama):
    """The stop token is HF's first greedy choice: under min_tokens=3 it is masked for the first 3 tokens (so the
    second-best goes first) and stops generation when it comes later. The expectation is HF's fp32 logits with the
    same mask, step by step."""
    from hf_reference import hf_last_logits

    prompt = [1, 50, 60, 70]
    stop = hf_greedy(str(tiny_llama), [prompt], 1)[0][0]
    want: list[int] = []
    while len(want) < 8:
        logits = hf_last_logits(str(tiny_llama), [prompt + want])[0].clone()  # [V]
        if len(want) < 3:
            logits[stop] = float("-inf")
        want.append(int(torch.argmax(logits)))
        if want[-1] == stop:
            break
    out = llm.generate({"prompt_token_ids": prompt}, greedy(stop_token_ids=[stop], min_tokens=3), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == want
    assert out.outputs[0].finish_reason == ("stop" if want[-1] == stop else "length")


def test_stop_strings_are_removed_from_text(llm):
    prompt = "Tell me about the stars"
    base = llm.generate(prompt, greedy(n=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) > 4
    stop = text[2:4]
    out = llm.generate(prompt, greedy(n=12, ignore_eos=True, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_n_samples_share_the_prompt_kv_and_differ(llm):
    prompt = {"prompt_token_ids": [1] + list(range(40, 70))}
    params = SamplingParams(n=4, temperature=1.0, max_tokens=6, seed=11, ignore_eos=True)
    out = llm.generate(prompt, params, use_tqdm=False)[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    stats = llm.stats()
    # the 31-token prompt's first 30 tokens once (7 blocks and 2 tokens), and each sample's last token once
    assert stats["computed_prompt_tokens"] == stats["plan"]["plan_tokens"] == 30 + 4 * 1


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [1] + [rng.randrange(4, 400) for _ in range(rng.randrange(3, 20))]}
               for _ in range(6)]
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, max_tokens=8, seed=100 + i, ignore_eos=True)
              for i in range(6)]
    alone = [llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids for p, sp in zip(prompts, params)]
    together = [o.outputs[0].token_ids for o in llm.generate(prompts[::-1], params[::-1], use_tqdm=False)][::-1]
    assert alone == together


def test_logprobs_match_hf(llm, tiny_llama):
    prompt = [1, 33, 44, 55, 66]
    out = llm.generate({"prompt_token_ids": prompt}, greedy(n=4, ignore_eos=True, logprobs=3), use_tqdm=False)
    o = out[0].outputs[0]
    ref = hf_logprobs(str(tiny_llama), prompt + o.token_ids)  # [L, V]
    assert len(o.logprobs) == 4
    total = 0.0
    for i, tok in enumerate(o.token_ids):
        row = ref[len(prompt) - 1 + i]
        assert set(torch.topk(row, 3).indices.tolist()) <= set(o.logprobs[i])
        assert o.logprobs[i][tok] == pytest.approx(row[tok].item(), abs=1e-4)
        total += row[tok].item()
    assert o.cumulative_logprob == pytest.approx(total, abs=1e-3)
    assert math.isfinite(o.cumulative_logprob)


def test_chat_uses_the_template(llm):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = llm.chat([conv, "not a conversation"], greedy(ignore_eos=True), use_tqdm=False)
    assert out[0].prompt_token_ids == ids and out[0].prompt == text
    direct = llm.generate({"prompt_token_ids": ids}, greedy(ignore_eos=True), use_tqdm=False)[0]
    assert out[0].outputs[0].token_ids == direct.outputs[0].token_ids
    assert out[1].outputs[0].finish_reason == "error"


def test_stats_account_exactly(llm):
    shared = [1] + list(range(100, 140))  # 41 tokens shared: 10 full blocks of 4 and 1 token
    prompts = [{"prompt_token_ids": shared + [200 + i, 300 + i]} for i in range(5)]
    llm.generate(prompts, greedy(n=3, ignore_eos=True), use_tqdm=False)
    s = llm.stats()
    assert s["prompt_tokens"] == 5 * 43
    assert s["output_tokens"] == 15
    assert s["computed_prompt_tokens"] == 41 + 5 * 2  # the node (41 tokens) once, each own part (2 tokens) once
    assert s["plan"]["plan_tokens"] == 41 + 5 * 2
    assert s["preemptions"] == 0 and s["num_errors"] == 0
    assert sum(b["steps"] for b in s["trace"]) == s.steps  # the trace bins cover every step ...
    assert sum(b["prefill_tokens"] for b in s["trace"]) == 41 + 5 * 2  # ... and every computed prompt token
    assert sum(b["decode_tokens"] for b in s["trace"]) == 5 * 2  # each leaf feeds back its first 2 of 3 tokens
    assert s.computed_prompt_tokens == s["computed_prompt_tokens"] and s.prompt_tokens == 5 * 43  # attribute reads
    with pytest.raises(AttributeError):
        getattr(s, "no_such_figure")  # noqa: B009
    outs = llm.generate(prompts, greedy(n=3, ignore_eos=True), use_tqdm=False)
    assert [o.num_cached_tokens for o in outs] == [41] * 5

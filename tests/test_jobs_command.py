"""`batchllm run` pipeline with a real (locally trained) tokenizer and a fake engine: bad lines, resume after a
cut at many points, windows, stats JSON, HTML report and exit codes. The real engine is tested in
test_jobs_e2e.py."""

import argparse
import json
import shutil
from types import SimpleNamespace

import pytest

from batchllm.inputs import PromptEncoder
from batchllm.jobs import command, job, scan
from batchllm.jobs import openai_batch as ob
from batchllm.jobs import openai_output as oo

VOCAB = 300
CONTEXT = 48


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model folder with config.json and a byte-level BPE tokenizer with a chat template (no weights)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["the quick brown fox jumps over the lazy dog, says the user to the assistant"] * 8,
                           trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant:{% endif %}")
    d = tmp_path_factory.mktemp("model")
    fast.save_pretrained(d)
    (d / "config.json").write_text(json.dumps({"max_position_embeddings": CONTEXT, "vocab_size": VOCAB}))
    return d


class FakeLLM:
    """Deterministic stand-in for the engine: yields results in reverse order; prompts longer than `fail_len`
    tokens come back as errors (like requests beyond the KV budget)."""

    def __init__(self, tokenizer, fail_len=10**9):
        self.tok = tokenizer
        self.fail_len = fail_len
        self.calls = []
        self.progress = {}

    def generate_stream(self, prompts, params):
        self.calls.append(len(prompts))
        trace = []
        for step, i in enumerate(reversed(range(len(prompts)))):
            ids = prompts[i]["prompt_token_ids"]
            p = params[i]
            get = p.get if isinstance(p, dict) else (lambda k, d=None, p=p: getattr(p, k, d))
            n, max_tokens = get("n", 1) or 1, get("max_tokens")
            self.progress = {"computed_prompt_tokens": 0, "kv_blocks_used": 3, "kv_blocks_total": 10}
            trace.append({"t": 0.01 * (step + 1), "prefill_tokens": len(ids), "decode_tokens": 1, "num_seqs": 1,
                          "kv_blocks_used": 3})
            if len(ids) > self.fail_len:
                yield i, SimpleNamespace(prompt_token_ids=ids, outputs=[], num_cached_tokens=0, finished=True,
                                         error=f"needs {len(ids)} tokens of KV, budget is {self.fail_len}")
                continue
            outs = []
            for k in range(n):
                toks = [(sum(ids) * 7 + 13 * k + j) % (VOCAB - 2) + 2 for j in range(max_tokens)]
                outs.append(SimpleNamespace(index=k, text=self.tok.decode(toks), token_ids=toks,
                                            finish_reason="length", stop_reason=None, cumulative_logprob=None,
                                            logprobs=None))
            yield i, SimpleNamespace(prompt_token_ids=ids, outputs=outs, num_cached_tokens=len(ids) // 2,
                                     finished=True, error=None)
        logical = sum(len(p["prompt_token_ids"]) for p in prompts)
        self._stats = {"prompt_tokens": logical, "computed_prompt_tokens": logical - len(prompts),
                       "elapsed_s": 0.5, "preemptions": 1, "peak_kv_blocks": 3, "trace": trace,
                       "plan": {"num_groups": 1, "degree_histogram": {"2": 1, "3-4": len(prompts)}}}

    def stats(self):
        return self._stats


def parse_args(*argv):
    p = argparse.ArgumentParser()
    job.add_arguments(p)
    return p.parse_args([str(a) for a in argv])


def run(model_dir, inp, out, *extra, fail_len=10**9):
    """Runs the job with a FakeLLM; returns (exit code, the fakes made)."""
    made = []

    def factory(args):
        from transformers import AutoTokenizer

        made.append(FakeLLM(AutoTokenizer.from_pretrained(args.model), fail_len))
        return made[-1]

    args = parse_args("-i", inp, "-o", out, "--model", model_dir, "--no-progress", *extra)
    return command.run_job(args, llm_factory=factory), made


def req(cid, text="the quick brown fox", chat=True, **body):
    if chat:
        b = {"messages": [{"role": "user", "content": text}], "max_tokens": 3, **body}
        return json.dumps({"custom_id": cid, "method": "POST", "url": ob.CHAT_URL, "body": b})
    b = {"prompt": text, "max_tokens": 3, **body}
    return json.dumps({"custom_id": cid, "method": "POST", "url": ob.COMPLETIONS_URL, "body": b})


def read_out(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def normalized(records):
    """Output lines keyed by their id, with the wall-clock field removed."""
    out = {}
    for r in records:
        r = json.loads(json.dumps(r))
        if r["response"]:
            r["response"]["body"].pop("created")
        assert r["id"] not in out, f"{r['id']} written twice"
        out[r["id"]] = r
    return out


MIXED = [
    req("ok-1"),                                                        # 1
    "{oops",                                                            # 2 not JSON
    "",                                                                 # 3 blank: skipped
    json.dumps({"custom_id": "nf", "url": ob.CHAT_URL, "body": {}}),    # 4 lacks method
    json.dumps({"custom_id": "u", "method": "POST", "url": "/v1/embeddings", "body": {}}),  # 5 unknown url
    req("bad-param", temperature=-1),                                   # 6 invalid parameter
    req("ok-1"),                                                        # 7 duplicate custom_id
    req("long", "fox " * 60),                                           # 8 prompt beyond the context
    req("ok-2", "the lazy dog", chat=False, n=2),                       # 9
    req("too-many", "dog", chat=False, max_tokens=CONTEXT),             # 10 prompt + max_tokens beyond context
    "   ",                                                              # 11 blank
    req("ok-3", "jumps over", chat=False),                              # 12
    req("ok-4", "says the user"),                                       # 13
]


def write_input(tmp_path, lines, name="in.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_every_bad_line_kind_gives_its_error_line_and_the_rest_runs(model_dir, tmp_path):
    inp, out = write_input(tmp_path, MIXED), tmp_path / "out.jsonl"
    code, made = run(model_dir, inp, out)
    assert code == 0
    recs = read_out(out)
    errors = {r["id"]: (r["custom_id"], r["error"]["code"]) for r in recs if r["error"]}
    assert errors == {
        "batch_req_2": (None, ob.E_JSON), "batch_req_4": ("nf", ob.E_MISSING), "batch_req_5": ("u", ob.E_URL),
        "batch_req_6": ("bad-param", ob.E_PARAM), "batch_req_7": (None, ob.E_DUPLICATE),
        "batch_req_8": ("long", ob.E_CONTEXT), "batch_req_10": ("too-many", ob.E_CONTEXT)}
    for r in recs:
        if r["error"]:
            n = r["id"].split("_")[-1]
            assert r["error"]["message"].startswith(f"line {n}: ") and r["response"] is None
    ok = {r["custom_id"]: r for r in recs if not r["error"]}
    assert sorted(ok) == ["ok-1", "ok-2", "ok-3", "ok-4"]
    assert len(recs) == 11  # every non-blank line exactly once
    assert made[0].calls == [4]
    body = ok["ok-2"]["response"]["body"]
    assert body["object"] == "text_completion" and [c["index"] for c in body["choices"]] == [0, 1]
    assert body["usage"]["completion_tokens"] == 6
    assert ok["ok-1"]["response"]["body"]["object"] == "chat.completion"
    assert ok["ok-1"]["id"] == "batch_req_1" and ok["ok-1"]["response"]["status_code"] == 200


def test_prompt_tokens_go_through_the_chat_template(model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    inp, out = write_input(tmp_path, [req("c", "the fox"), req("p", "the fox", chat=False)]), tmp_path / "o.jsonl"
    assert run(model_dir, inp, out)[0] == 0
    usage = {r["custom_id"]: r["response"]["body"]["usage"]["prompt_tokens"] for r in read_out(out)}
    chat_ids = tok("<s>user: the fox\nassistant:", add_special_tokens=False)["input_ids"]
    assert usage == {"c": len(chat_ids), "p": len(tok("the fox")["input_ids"])}


def test_default_max_tokens_fills_remaining_context_up_to_cap(model_dir, tmp_path):
    lines = [json.dumps({"custom_id": "d", "method": "POST", "url": ob.COMPLETIONS_URL, "body": {"prompt": "fox"}}),
             json.dumps({"custom_id": "e", "method": "POST", "url": ob.COMPLETIONS_URL, "body": {"prompt": "dog"}})]
    inp, out = write_input(tmp_path, lines), tmp_path / "o.jsonl"
    assert run(model_dir, inp, out, "--default-max-tokens", 5)[0] == 0
    assert {r["response"]["body"]["usage"]["completion_tokens"] for r in read_out(out)} == {5}
    out.unlink()
    assert run(model_dir, inp, out, "--default-max-tokens", 1000)[0] == 0
    for r in read_out(out):
        u = r["response"]["body"]["usage"]
        assert u["total_tokens"] == CONTEXT


def test_engine_errors_become_error_lines(model_dir, tmp_path):
    inp = write_input(tmp_path, [req("short", "fox"), req("longer", "the quick brown fox jumps over the lazy dog")])
    out = tmp_path / "o.jsonl"
    assert run(model_dir, inp, out, fail_len=12)[0] == 0
    recs = {r["custom_id"]: r for r in read_out(out)}
    assert recs["short"]["error"] is None
    assert recs["longer"]["error"]["code"] == ob.E_ENGINE
    assert recs["longer"]["error"]["message"].startswith("line 2: needs ")


def same_job(ref, out):
    """`out` as a cut copy of `ref`'s job: its manifest beside it."""
    shutil.copy(f"{ref}.manifest.json", f"{out}.manifest.json")


def uninterrupted(model_dir, tmp_path, lines, *extra):
    inp = write_input(tmp_path, lines)
    ref = tmp_path / "ref.jsonl"
    assert run(model_dir, inp, ref, *extra)[0] == 0
    return inp, ref.read_bytes()


@pytest.mark.parametrize("window", [100, 3])
def test_resume_after_cut_at_every_line_gives_the_uninterrupted_output(model_dir, tmp_path, window):
    lines = MIXED + [req(f"more-{i}", "the lazy fox " * (i % 3 + 1), chat=bool(i % 2)) for i in range(6)]
    inp, ref = uninterrupted(model_dir, tmp_path, lines, "--window", window)
    ref_lines = ref.splitlines(keepends=True)
    expect = normalized(json.loads(x) for x in ref_lines)
    assert len(expect) == 17
    for cut in range(len(ref_lines) + 1):
        for torn in (b"", ref_lines[cut][: len(ref_lines[cut]) // 2] if cut < len(ref_lines) else b'{"id'):
            out = tmp_path / "out.jsonl"
            out.write_bytes(b"".join(ref_lines[:cut]) + torn)
            same_job(tmp_path / "ref.jsonl", out)
            code, made = run(model_dir, inp, out, "--window", window)
            assert code == 0
            recs = read_out(out)
            assert normalized(recs) == expect  # also asserts no id written twice
            cids = [r["custom_id"] for r in recs if r["custom_id"] is not None]
            assert len(cids) == len(set(cids))
            assert out.read_bytes().startswith(b"".join(ref_lines[:cut]))  # done lines kept, not rewritten
            ran = sum(made[0].calls) if made else 0
            assert ran == rerun_size(ref_lines, cut, window)


def rerun_size(ref_lines, cut, window):
    """Requests a rerun hands the engine: only the runnable lines (a response or an engine error) still missing a
    result, however the windows fall: a finished request is never computed again."""
    records = [json.loads(x) for x in ref_lines]
    runnable = {oo.line_no_of_output_id(r["id"]) for r in records
                if r["error"] is None or r["error"]["code"] == ob.E_ENGINE}
    done = {oo.line_no_of_output_id(r["id"]) for r in records[:cut]}
    return len(runnable - done)


def test_rerun_of_finished_job_loads_no_model(model_dir, tmp_path):
    inp, ref = uninterrupted(model_dir, tmp_path, MIXED)
    out = tmp_path / "out.jsonl"
    out.write_bytes(ref)
    same_job(tmp_path / "ref.jsonl", out)
    code, made = run(model_dir, inp, out)
    assert (code, made, out.read_bytes()) == (0, [], ref)


def test_windows_split_engine_calls(model_dir, tmp_path):
    lines = [req(f"w{i}", "fox dog " * (i + 1)) for i in range(7)]
    inp, ref = uninterrupted(model_dir, tmp_path, lines)
    out = tmp_path / "o.jsonl"
    code, made = run(model_dir, inp, out, "--window", 3)
    assert made[0].calls == [3, 3, 1]
    assert normalized(read_out(out)) == normalized(json.loads(x) for x in ref.splitlines())


def test_stats_json_and_report(model_dir, tmp_path):
    inp, out = write_input(tmp_path, MIXED), tmp_path / "o.jsonl"
    stats, rep = tmp_path / "s" / "stats.json", tmp_path / "rep"
    assert run(model_dir, inp, out, "--stats-json", stats, "--report", rep)[0] == 0
    s = json.loads(stats.read_text())
    recs = [r for r in read_out(out) if not r["error"]]
    prompt = sum(r["response"]["body"]["usage"]["prompt_tokens"] for r in recs)
    output = sum(r["response"]["body"]["usage"]["completion_tokens"] for r in recs)
    assert s["requests"] == {"total": 11, "ok": 4, "failed": 7, "failed_validation": 7, "failed_engine": 0,
                             "skipped_already_done": 0}
    assert s["tokens"] == {"prompt": prompt, "computed_prompt": prompt - 4, "output": output,
                           "total": prompt + output}
    assert s["prefix_saving"] == round(4 / prompt, 6)
    assert (s["preemptions"], s["peak_kv_blocks"], s["kv_blocks_total"], s["engine_calls"]) == (1, 3, 10, 1)
    page = (rep / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count("<svg") == 4 and "Throughput over time" in page and "group sizes" in page
    assert json.loads((rep / "stats.json").read_text()) == s


def test_exit_codes_and_one_line_reasons(model_dir, tmp_path, capsys):
    inp = write_input(tmp_path, [req("a")])
    out = tmp_path / "o.jsonl"
    cases = [
        (("-i", tmp_path / "missing.jsonl", "-o", out, "--model", model_dir), 2, "cannot read input file"),
        (("-i", inp, "-o", out, "--model", tmp_path / "nomodel"), 2, "no model at"),
        (("-i", inp, "-o", inp, "--model", model_dir), 2, "is the input file"),
    ]
    for argv, code, words in cases:
        assert command.main(parse_args(*argv, "--no-progress")) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err and err.startswith("batchllm run: error: ")
    out.write_text('{"id": "batch_req_1"\n{"id": "batch_req_2", "custom_id": "b"}\n')
    assert command.main(parse_args("-i", inp, "-o", out, "--model", model_dir, "--no-progress")) == 2
    assert "was not written by `batchllm run`" in capsys.readouterr().err  # and is left as it was
    assert out.read_text() == '{"id": "batch_req_1"\n{"id": "batch_req_2", "custom_id": "b"}\n'
    assert command.main(parse_args("-i", inp, "-o", out, "--model", model_dir, "--no-progress", "--force")) == 2
    assert "line 1 is not a complete JSON line" in capsys.readouterr().err
    # a model folder with a tokenizer but no weights: the engine cannot load -> 1, nothing written
    nw = tmp_path / "noweights"
    shutil.copytree(model_dir, nw)
    out.unlink()
    assert command.main(parse_args("-i", inp, "-o", out, "--model", nw, "--no-progress")) == 1
    err = capsys.readouterr().err
    assert err.startswith("batchllm run: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert out.read_text() == ""


def test_unseeded_requests_sample_with_a_seed_of_their_custom_id(model_dir):
    """A resumed job hands the remaining requests to the engine at other positions: their random streams must not
    depend on the position, or a resumed sampled run would differ from an uninterrupted one."""

    from batchllm import SamplingParams

    encoder = PromptEncoder.load(model_dir)
    v = scan.Validator(encoder, 512, make_params=SamplingParams, job_seed=3)
    a, b, s = (ob.parse_line(req(cid, temperature=0.7, **kw), n + 1)
               for n, (cid, kw) in enumerate([("a", {}), ("b", {}), ("s", {"seed": 5})]))
    first = v.prepare([a, b, s])
    later = v.prepare([b])
    assert first[1][1].seed == later[0][1].seed
    assert first[0][1].seed != first[1][1].seed
    assert first[2][1].seed == 5
    other_job = scan.Validator(encoder, 512, make_params=SamplingParams, job_seed=4).prepare([b])
    assert other_job[0][1].seed != later[0][1].seed


def test_engine_options_pass_only_what_the_command_line_set(tmp_path):
    args = parse_args("-i", tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tmp_path,
                      "--kv-cache-memory-bytes", 1 << 20, "--kv-cache-commit", "lazy", "--block-size", 8)
    assert job.engine_options(args) == {"kv_cache_memory_bytes": 1 << 20, "kv_cache_commit": "lazy",
                                            "block_size": 8}
    with pytest.raises(SystemExit):
        parse_args("-i", "a", "-o", "b", "--model", "m", "--kv-cache-commit", "eager")

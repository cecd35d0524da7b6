"""Jobs that cannot be broken, on the real engine (tiny fp32 Llama): lone surrogates, a BOM, a locked output, resume
only onto the same job's output, --retry-failed, lines too long to tokenize, SIGTERM / SIGINT, paths that cannot
hold a resumable output, options refused up front, and a fuzz test over mutated lines where every line is
answered exactly once."""

import io
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_jobs_e2e import BLOCK, by_id, context, job_args, kv_bytes, make_lines

from batchllm import LLM, SamplingParams
from batchllm.inputs import PromptEncoder
from batchllm.jobs import command, guard
from batchllm.jobs import openai_batch as ob

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model(tiny_llama):
    return Path(tiny_llama)


def write(path, lines, prefix=b""):
    path.write_bytes(prefix + "".join(x + "\n" for x in lines).encode("utf-8", "surrogatepass"))
    return path


def ids_of(path):
    return [json.loads(x)["id"] for x in Path(path).read_bytes().splitlines()]


def test_lone_surrogates_and_a_bom_are_answered_line_by_line_and_resume(model, tmp_path):
    """"\\ud800" is legal JSON: in a prompt it is that line's error; in a custom_id or a model name the line runs
    and its custom_id is written back escaped, so a rerun finds it done. A BOM before line 1 is not part of it."""
    half = "\\ud83d"  # JSON text of half an emoji
    lines = make_lines(2) + [
        '{"custom_id": "p", "method": "POST", "url": "/v1/completions", "body": {"prompt": "a' + half + 'b", '
        '"max_tokens": 2}}',
        '{"custom_id": "c' + half + '", "method": "POST", "url": "/v1/completions", "body": {"prompt": "ab", '
        '"max_tokens": 2, "model": "m' + half + '"}}',
        '{"custom_id": "m", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [{"role": "user", '
        '"content": "x' + half + '"}], "max_tokens": 2}}',
    ]
    inp, out = write(tmp_path / "in.jsonl", lines, prefix=b"\xef\xbb\xbf"), tmp_path / "out.jsonl"
    assert command.main(job_args(model, inp, out)) == 0
    recs = by_id(out)
    assert sorted(recs) == [f"batch_req_{i}" for i in range(1, 6)]
    assert recs["batch_req_1"]["error"] is None  # the BOM line
    for i in (3, 5):
        assert recs[f"batch_req_{i}"]["error"]["code"] == ob.E_PARAM
        assert "lone surrogate" in recs[f"batch_req_{i}"]["error"]["message"]
    assert recs["batch_req_4"]["custom_id"] == "c\ud83d" and recs["batch_req_4"]["error"] is None
    assert recs["batch_req_4"]["response"]["body"]["model"] == model.name  # the model that ran
    before = out.read_bytes()
    assert before.decode("utf-8")  # the escaped line keeps the file UTF-8
    assert command.main(job_args(model, inp, out)) == 0
    assert out.read_bytes() == before  # all done: nothing run or written again


def test_a_second_run_on_a_locked_output_exits_2_naming_the_holder(model, tmp_path, capsys):
    inp, out = write(tmp_path / "in.jsonl", make_lines(2)), tmp_path / "out.jsonl"
    with guard.OutputLock(str(out)):
        assert command.main(job_args(model, inp, out)) == 2
        err = capsys.readouterr().err
        assert f"being written by another batchllm run (pid {os.getpid()})" in err
        assert not out.exists()
    assert command.main(job_args(model, inp, out)) == 0  # the lock went with its holder
    assert not Path(f"{out}.lock").exists()


def test_resume_refuses_the_output_of_another_job_unless_forced(model, tmp_path, capsys):
    inp, out = write(tmp_path / "in.jsonl", make_lines(3)), tmp_path / "out.jsonl"
    assert command.main(job_args(model, inp, out)) == 0
    ours = out.read_bytes()
    other = write(tmp_path / "other.jsonl", [x.replace("Item", "Thing") for x in make_lines(3)])  # same custom_ids
    assert command.main(job_args(model, other, out)) == 2
    assert "the input file's contents differ" in capsys.readouterr().err
    assert command.main(job_args(model, inp, out, "--seed", "7")) == 2
    assert "seed 7 (the output's: 0)" in capsys.readouterr().err
    assert out.read_bytes() == ours
    assert command.main(job_args(model, other, out, "--force")) == 0  # forced: its custom_ids count as done
    assert out.read_bytes() == ours
    # -i and -o swapped: the request file is not an output of ours and stays as it was
    requests = inp.read_bytes()
    assert command.main(job_args(model, tmp_path / "out.jsonl", inp)) == 2
    assert "was not written by `batchllm run`" in capsys.readouterr().err
    assert inp.read_bytes() == requests


def test_retry_failed_reruns_only_the_error_lines(model, tmp_path):
    lines = make_lines(3) + [
        json.dumps({"custom_id": "big", "method": "POST", "url": ob.COMPLETIONS_URL,  # fits the context, not 6 blocks
                    "body": {"prompt": "item " * 60, "max_tokens": 60, "temperature": 0}}),
        "{not json"]
    inp, out = write(tmp_path / "in.jsonl", lines), tmp_path / "out.jsonl"
    assert command.main(job_args(model, inp, out, "--kv-cache-memory-bytes", kv_bytes(model, 6))) == 0
    first = by_id(out)
    assert first["batch_req_4"]["error"]["code"] == ob.E_ENGINE and first["batch_req_5"]["error"]["code"] == ob.E_JSON
    assert command.main(job_args(model, inp, out, "--retry-failed")) == 0
    again = by_id(out)
    assert sorted(again) == sorted(first)
    assert again["batch_req_4"]["error"] is None  # with a KV cache that holds it, it ran
    assert again["batch_req_5"]["error"]["code"] == ob.E_JSON  # still not JSON
    assert all(again[f"batch_req_{i}"] == first[f"batch_req_{i}"] for i in (1, 2, 3))  # not recomputed
    assert sorted(ids_of(out)[:3]) == ["batch_req_1", "batch_req_2", "batch_req_3"]  # kept in place


def test_lines_too_long_for_the_context_are_refused_before_tokenizing(model, tmp_path, monkeypatch):
    encoder = PromptEncoder.load(model)
    limit = 4 * encoder.max_token_bytes * context(model)  # text bytes no prompt within the context can exceed
    seen = []
    real = PromptEncoder._encode_batch

    def spy(self, texts, add_special_tokens):
        seen.extend(len(t) for t in texts)
        return real(self, texts, add_special_tokens)

    monkeypatch.setattr(PromptEncoder, "_encode_batch", spy)
    huge_text = json.dumps({"custom_id": "t", "method": "POST", "url": ob.COMPLETIONS_URL,
                            "body": {"prompt": "a" * (limit + 1), "max_tokens": 2}})
    huge_line = '{"custom_id": "l", "pad": "' + "b" * (6 * limit + (1 << 20)) + '"}'
    inp, out = write(tmp_path / "in.jsonl", make_lines(1) + [huge_text, huge_line] + make_lines(2)[1:]), \
        tmp_path / "out.jsonl"
    assert command.main(job_args(model, inp, out)) == 0
    recs = by_id(out)
    assert recs["batch_req_2"]["custom_id"] == "t" and recs["batch_req_2"]["error"]["code"] == ob.E_CONTEXT
    assert "refused without tokenizing" in recs["batch_req_2"]["error"]["message"]
    assert recs["batch_req_3"]["custom_id"] is None and "refused unread" in recs["batch_req_3"]["error"]["message"]
    assert recs["batch_req_4"]["error"] is None
    assert max(seen) < 1000  # neither long line reached the tokenizer


@pytest.mark.parametrize("signum,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_flushes_finished_results_and_a_rerun_completes(model, tmp_path, signum, code):
    n = 48
    inp, ref = write(tmp_path / "in.jsonl", make_lines(n)), tmp_path / "ref.jsonl"
    assert command.main(job_args(model, inp, ref, "--window", 2)) == 0
    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "batchllm", "run", "-i", str(inp), "-o", str(out), "--model", str(model),
           "--dtype", "float32", "--block-size", str(BLOCK), "--window", "2", "--sync-every", "1000",
           "--sync-interval", "1000", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and not (out.exists() and out.stat().st_size):
            time.sleep(0.01)  # results are being written (never synced: --sync-every 1000)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signum)
        t = time.monotonic()
        assert proc.wait(10) == code
        assert time.monotonic() - t < 5
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert f"stopped by {signal.Signals(signum).name}" in err and "rerun the same command to resume" in err
    written = out.read_bytes()
    assert written.endswith(b"\n") and all(json.loads(x) for x in written.splitlines())  # no torn line
    assert 0 < written.count(b"\n") < n  # the finished results were flushed, not lost in a buffer
    assert not Path(f"{out}.lock").exists()
    assert command.main(job_args(model, inp, out, "--window", 2)) == 0
    assert by_id(out) == by_id(ref)


def test_outputs_that_cannot_be_resumed_are_refused_and_dash_streams(model, tmp_path, capfd, monkeypatch):
    inp = write(tmp_path / "in.jsonl", make_lines(2))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for target, words in ((fifo, "is a pipe"), ("/dev/null", "terminal or device"), (tmp_path, "is a folder")):
        assert command.main(job_args(model, inp, target)) == 2
        assert words in capfd.readouterr().err
    assert command.main(job_args(model, inp, "-")) == 0
    streamed = [json.loads(x) for x in capfd.readouterr().out.splitlines()]
    assert [r["custom_id"] for r in streamed] == ["r0", "r1"]
    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(inp.read_bytes())))
    assert command.main(job_args(model, "-", out)) == 0
    assert sorted(by_id(out)) == ["batch_req_1", "batch_req_2"]
    assert not list(tmp_path.glob(".batchllm-stdin-*"))  # the spooled input is removed


@pytest.mark.parametrize("flags,words", [(("--default-max-tokens", "0"), "--default-max-tokens must be at least 1"),
                                         (("--block-size", "0"), "block_size"),
                                         (("--stats-json", "FILE/stats.json"), "cannot write there")])
def test_options_that_would_fail_every_line_are_refused_before_the_job(model, tmp_path, capsys, flags, words):
    inp, out = write(tmp_path / "in.jsonl", make_lines(1)), tmp_path / "out.jsonl"
    (tmp_path / "FILE").write_text("a file, not a folder")
    flags = [f.replace("FILE", str(tmp_path / "FILE")) for f in flags]
    assert command.main(job_args(model, inp, out, *flags)) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1
    assert not out.exists()


def test_prefix_saving_counts_every_sample_and_is_never_negative(model):
    """n = 3 samples of prompts shorter than a block: each sample computes its prompt (no full block to share), and
    the saving is measured against what no reuse computes (every sample's prompt)."""
    llm = LLM(str(model), dtype="float32", block_size=BLOCK, kv_cache_memory_bytes=1 << 20)
    prompts = [{"prompt_token_ids": [1, 5, 6, 7]}, {"prompt_token_ids": [1, 8, 9]}]
    llm.generate(prompts, SamplingParams(n=3, max_tokens=2, temperature=0.0), use_tqdm=False)
    s = llm.stats()
    assert (s.prompt_tokens, s.computed_prompt_tokens) == (3 * 4 + 3 * 3, 3 * 4 + 3 * 3)


# ---------------------------------------------------------------------------------------------------------------
# fuzz: whatever the bytes of a line, every line is answered exactly once

MUTATIONS = ["surrogate", "bom", "nul", "huge_number", "deep", "truncate", "byte_flip", "duplicate_id", "float_id",
             "wrong_type", "crlf", "bad_utf8", "empty_body", "huge_max_tokens"]


def mutate(line: str, how: str, rng: random.Random) -> bytes:
    raw = line.encode()
    if how == "surrogate":
        return raw.replace(b"Item", b"It\\udc80em", 1)
    if how == "bom":
        return b"\xef\xbb\xbf" + raw
    if how == "nul":
        return raw.replace(b"Item", b"It\\u0000em\x00", 1)
    if how == "huge_number":  # more digits than Python converts to an int
        return raw.replace(b'"max_tokens": ', b'"max_tokens": 1' + b"0" * 5000 + b", \"x\": ", 1)
    if how == "deep":
        return raw.replace(b'"body": ', b'"body": ' + b"[" * 5000 + b"]" * 5000 + b", \"b\": ", 1)
    if how == "truncate":
        return raw[: rng.randrange(1, len(raw))]
    if how == "byte_flip":
        i = rng.randrange(len(raw))
        return raw[:i] + bytes([rng.randrange(256)]) + raw[i + 1:]
    if how == "duplicate_id":
        return re.sub(rb'"custom_id": "r\d+"', b'"custom_id": "r0"', raw, count=1)
    if how == "float_id":
        return raw.replace(b'"custom_id": "', b'"custom_id": 1.5, "x": "', 1)
    if how == "wrong_type":
        return raw.replace(b'"temperature": 0', b'"temperature": "hot"', 1)
    if how == "crlf":
        return raw + b"\r"
    if how == "bad_utf8":
        return raw.replace(b"Item", b"It\xff\xfeem", 1)
    if how == "empty_body":
        return raw.split(b'"body"')[0] + b'"body": {}}'
    return raw.replace(b'"max_tokens": ', b'"max_tokens": 1000000000000, "x": ', 1)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.integers(0, 11), st.sampled_from(MUTATIONS + ["none"] * 4), st.integers(0, 2**16)),
                min_size=6, max_size=24))
def test_fuzzed_lines_each_get_exactly_one_answer(model, tmp_path_factory, plan):
    valid = make_lines(12)
    lines = [mutate(valid[i], how, random.Random(seed)) if how != "none" else valid[i].encode()
             for i, how, seed in plan]
    folder = tmp_path_factory.mktemp("fuzz")
    inp, out = folder / "in.jsonl", folder / "out.jsonl"
    inp.write_bytes(b"\n".join(lines) + b"\n")
    assert command.main(job_args(model, inp, out)) == 0
    raw_lines = inp.read_bytes().split(b"\n")
    expect = sorted(f"batch_req_{n}" for n, x in enumerate(raw_lines, 1)
                    if (x[3:] if n == 1 and x.startswith(b"\xef\xbb\xbf") else x).strip())
    got = ids_of(out)
    assert sorted(got) == expect  # every non-blank line once, none twice
    records = [json.loads(x) for x in out.read_bytes().splitlines()]
    cids = [r["custom_id"] for r in records if r["custom_id"] is not None]
    assert len(cids) == len(set(cids))
    assert command.main(job_args(model, inp, out)) == 0  # a rerun finds everything done
    assert sorted(ids_of(out)) == expect

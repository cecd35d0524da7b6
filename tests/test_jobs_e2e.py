"""`batchllm run` end to end on a tiny random-weight model: bad lines and engine rejections next to real results,
and a real `python -m batchllm run` process SIGKILLed mid-run, rerun, and compared with an uninterrupted run.
Greedy fp32 and one request per engine call (`--window 1`), so every output is deterministic."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchllm.jobs import command, job
from batchllm.jobs import openai_batch as ob

REPO = Path(__file__).resolve().parent.parent
BLOCK = 16


@pytest.fixture(scope="module")
def model(request, tmp_path_factory):
    """The session's tiny Llama when conftest provides one, else one built here."""
    try:
        return Path(request.getfixturevalue("tiny_llama"))
    except pytest.FixtureLookupError:
        from batchllm.tiny import build_tiny_checkpoint

        return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), hidden_size=64, num_layers=2, num_heads=4,
                                     num_kv_heads=2, intermediate_size=128, max_position_embeddings=256)


def kv_bytes(model_dir, blocks):
    """A KV budget of exactly `blocks` fp32 blocks of BLOCK tokens."""
    import torch

    from batchllm.kv.cache import KVCache
    from batchllm.model_config import ModelConfig

    return blocks * KVCache.bytes_per_block(ModelConfig.from_hf(model_dir), BLOCK, torch.float32)


def context(model_dir):
    return ob.read_context_length(json.loads((Path(model_dir) / "config.json").read_text()))


def make_lines(n):
    lines = []
    for i in range(n):
        if i % 2:
            body = {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": f"Tell me about item {i}."}],
                    "max_tokens": 4 + i % 3, "temperature": 0}
            url = ob.CHAT_URL
        else:
            body = {"prompt": f"Item {i} is", "max_tokens": 4 + i % 2, "temperature": 0, "logprobs": 2}
            url = ob.COMPLETIONS_URL
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": url, "body": body}))
    return lines


def job_args(model_dir, inp, out, *extra):
    p = argparse.ArgumentParser()
    job.add_arguments(p)
    return p.parse_args([str(a) for a in ("-i", inp, "-o", out, "--model", model_dir, "--dtype", "float32",
                                          "--block-size", BLOCK, "--no-progress", *extra)])


def by_id(path):
    out = {}
    for x in Path(path).read_text().splitlines():
        r = json.loads(x)
        if r["response"]:
            r["response"]["body"].pop("created")
        assert r["id"] not in out
        out[r["id"]] = r
    return out


def test_real_engine_bad_lines_and_rejections(model, tmp_path):
    lines = make_lines(4) + [
        "{nope",
        json.dumps({"custom_id": "toolong", "method": "POST", "url": ob.COMPLETIONS_URL,
                    "body": {"prompt": "word " * context(model), "max_tokens": 4}}),
        json.dumps({"custom_id": "kv", "method": "POST", "url": ob.COMPLETIONS_URL,  # fits the context, not the KV
                    "body": {"prompt": "item " * 60, "max_tokens": 60, "temperature": 0}}),
    ]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    stats = tmp_path / "stats.json"
    assert command.main(job_args(model, inp, out, "--kv-cache-memory-bytes", kv_bytes(model, 6),
                                 "--stats-json", stats)) == 0
    recs = by_id(out)
    assert len(recs) == 7
    assert recs["batch_req_5"]["error"]["code"] == ob.E_JSON
    assert recs["batch_req_6"]["error"]["code"] == ob.E_CONTEXT
    assert recs["batch_req_7"]["error"]["code"] == ob.E_ENGINE
    assert recs["batch_req_7"]["error"]["message"].startswith("line 7: ")
    for i in range(4):
        body = recs[f"batch_req_{i + 1}"]["response"]["body"]
        want = 4 + i % 3 if i % 2 else 4 + i % 2
        assert body["usage"]["completion_tokens"] == want
        assert body["choices"][0]["finish_reason"] == "length"
        if not i % 2:
            lp = body["choices"][0]["logprobs"]
            assert len(lp["tokens"]) == want and all(len(t) <= 2 for t in lp["top_logprobs"])
    s = json.loads(stats.read_text())
    assert s["requests"]["ok"] == 4 and s["requests"]["failed"] == 3 and s["requests"]["failed_engine"] == 1


def test_sigkill_mid_run_then_rerun_equals_uninterrupted_run(model, tmp_path):
    n = 8
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(make_lines(n)) + "\n{broken line\n")
    ref = tmp_path / "ref.jsonl"
    assert command.main(job_args(model, inp, ref, "--window", 1)) == 0
    expect = by_id(ref)
    assert len(expect) == n + 1

    out = tmp_path / "out.jsonl"
    cmd = [sys.executable, "-m", "batchllm", "run", "-i", str(inp), "-o", str(out), "--model", str(model),
           "--dtype", "float32", "--block-size", str(BLOCK), "--window", "1", "--sync-every", "1", "--no-progress"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") >= 3:  # the error line + some results
                break
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    done_before = out.read_bytes().count(b"\n")
    assert 3 <= done_before < n + 1
    with open(out, "ab") as f:  # as if the kill had torn a line in the middle
        f.write(b'{"id":"batch_req_99","custom_id":"r9')

    assert command.main(job_args(model, inp, out, "--window", 1)) == 0
    got = by_id(out)
    assert got == expect
    cids = [r["custom_id"] for r in got.values() if r["custom_id"] is not None]
    assert sorted(cids) == sorted(f"r{i}" for i in range(n))


def test_resumed_bf16_sampled_job_computes_only_the_missing_results(model, tmp_path):
    """Default dtype (bf16 on this CPU), the default window, sampled requests without a seed, prefix sharing: a
    rerun cut at any point computes only the requests without a result (its cached_tokens say how much of their
    prompt was shared in this run), and their texts equal the uninterrupted run's here. (In general a resumed
    request may attend to its prefix in one part instead of a shared part and its own merged, which can change
    the last bits of a logit: see generate.run_windows.)"""
    system = "You answer in one short sentence and never invent facts. " * 3
    lines = []
    for i in range(12):
        body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Item {i}?"}],
                "max_tokens": 3 + i % 5, "temperature": 0.8 if i % 2 else 0}
        lines.append(json.dumps({"custom_id": f"s{i}", "method": "POST", "url": ob.CHAT_URL, "body": body}))
    inp = tmp_path / "in.jsonl"
    inp.write_text("\n".join(lines) + "\n")

    def args(out):
        p = argparse.ArgumentParser()
        job.add_arguments(p)
        return p.parse_args(["-i", str(inp), "-o", str(out), "--model", str(model), "--no-progress",
                             "--stats-json", str(tmp_path / "stats.json")])

    ref = tmp_path / "ref.jsonl"
    assert command.main(args(ref)) == 0
    expect = by_id(ref)
    ref_lines = ref.read_bytes().splitlines(keepends=True)
    assert len(ref_lines) == 12
    for cut in (1, 6, 11):
        out = tmp_path / f"out{cut}.jsonl"
        out.write_bytes(b"".join(ref_lines[:cut]) + ref_lines[cut][:20])  # a torn line after `cut` results
        shutil.copy(f"{ref}.manifest.json", f"{out}.manifest.json")  # the same job's output
        assert command.main(args(out)) == 0
        got = by_id(out)
        assert list(got) == list(expect)
        for i, (rid, r) in enumerate(got.items()):
            usage, want = r["response"]["body"].pop("usage"), expect[rid]["response"]["body"]["usage"]
            assert r == {**expect[rid], "response": {**expect[rid]["response"], "body": {
                k: v for k, v in expect[rid]["response"]["body"].items() if k != "usage"}}}
            assert usage["prompt_tokens"] == want["prompt_tokens"]
            assert usage["completion_tokens"] == want["completion_tokens"]
            if i < cut:  # kept from the first run as it was
                assert usage == want
        stats = json.loads((tmp_path / "stats.json").read_text())
        assert (stats["requests"]["ok"], stats["requests"]["skipped_already_done"]) == (12 - cut, cut)

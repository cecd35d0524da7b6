"""Scale-out on a real local Ray cluster (2 CPUs, 2 engine actors, the tiny fp32 Llama): a `--ray` job equals the
local run line for line, computes about the single-machine prompt tokens, survives a killed worker and a torn
output file, and the Ray Data processor equals one `LLM.generate`. One Ray cluster for the module."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import ray
from test_jobs_e2e import BLOCK, job_args
from test_jobs_e2e import by_id as records
from transformers import AutoTokenizer

from batchllm import LLM, SamplingParams
from batchllm.distributed import PrefixAffinityProcessor, run_batch_file
from batchllm.jobs import command
from batchllm.jobs import openai_batch as ob

REPO = Path(__file__).resolve().parent.parent
PLAIN = "Plain text number {} goes"
PREAMBLE = "You answer for the batch team in one short sentence, and you never invent facts, names or numbers. "
SYSTEMS = [PREAMBLE + f"You are helper {g}. " + " ".join(f"rule-{g}-{k} applies." for k in range(8 + 3 * g))
           for g in range(4)]


@pytest.fixture(scope="module")
def cluster():
    """A local Ray with 2 CPUs for this module: no dashboard, no usage stats, no auth token written."""
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=256 << 20)
    yield
    ray.shutdown()
    mp.undo()


def job_lines():
    """4 chat groups sharing a system prompt (greedy, sampled with and without a seed, some with logprobs), 8
    standalone completions (one with n=2) and 4 bad lines."""
    lines = []
    for i in range(16):
        body = {"messages": [{"role": "system", "content": SYSTEMS[i % 4]},
                             {"role": "user", "content": f"Question {i}?"}], "max_tokens": 3 + i % 4}
        if i % 3 == 1:
            body["temperature"] = 0.9  # unseeded: derive_seed(job seed, custom_id)
        elif i % 3 == 2:
            body.update(temperature=0.7, seed=1000 + i)
        else:
            body.update(temperature=0, logprobs=True, top_logprobs=2)
        lines.append(json.dumps({"custom_id": f"chat-{i}", "method": "POST", "url": ob.CHAT_URL, "body": body}))
    for k in range(8):
        body = {"prompt": PLAIN.format(k), "max_tokens": 4, "temperature": 0.5 if k % 2 else 0}
        if k == 3:
            body["n"] = 2
        lines.append(json.dumps({"custom_id": f"text-{k}", "method": "POST", "url": ob.COMPLETIONS_URL,
                                 "body": body}))
    lines.insert(5, "{not json")
    lines.insert(9, lines[0])  # a duplicate custom_id
    lines.insert(12, json.dumps({"custom_id": "huge", "method": "POST", "url": ob.COMPLETIONS_URL,
                                 "body": {"prompt": "word " * 3000, "max_tokens": 4}}))
    lines.insert(20, json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {}}))
    return lines


def logprobs_apart(x, found):
    """`x` with every logprob value replaced by None; the values are appended to `found` in walk order."""
    if isinstance(x, dict):
        return {k: (found.append(v), None)[1] if k == "logprob" else logprobs_apart(v, found) for k, v in x.items()}
    if isinstance(x, list):
        return [logprobs_apart(v, found) for v in x]
    return x


def assert_same_results(got, want):
    """Records equal exactly, except logprobs, which equal up to fp32 rounding: the actors' engines run other
    batch shapes and thread counts, so the last bits of a log-softmax may differ (tokens and text do not)."""
    assert got.keys() == want.keys()
    for k in want:
        a, b = [], []
        assert logprobs_apart(got[k], a) == logprobs_apart(want[k], b), k
        assert a == pytest.approx(b, rel=1e-5, abs=1e-5), k


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_llama):
    """The input file and the local run's output and stats (the reference)."""
    d = tmp_path_factory.mktemp("job")
    inp = d / "in.jsonl"
    inp.write_text("\n".join(job_lines()) + "\n")
    assert command.main(job_args(tiny_llama, inp, d / "local.jsonl", "--stats-json", d / "local.json")) == 0
    local = records(d / "local.jsonl")
    assert len(local) == 28 and sum(r["error"] is not None for r in local.values()) == 4
    return inp, local, json.loads((d / "local.json").read_text())


@pytest.fixture(scope="module")
def ray_job(cluster, job, tiny_llama, tmp_path_factory):
    """`batchllm run --ray --ray-workers 2` on the job: its output file and stats."""
    inp = job[0]
    d = tmp_path_factory.mktemp("ray")
    assert command.main(job_args(tiny_llama, inp, d / "ray.jsonl", "--ray", "--ray-workers", 2,
                                 "--stats-json", d / "ray.json")) == 0
    return d / "ray.jsonl", json.loads((d / "ray.json").read_text())


def test_ray_run_equals_the_local_run(job, ray_job):
    _, local, local_stats = job
    out, stats = ray_job
    assert_same_results(records(out), local)
    assert stats["requests"] == local_stats["requests"]
    assert stats["tokens"]["prompt"] == local_stats["tokens"]["prompt"]
    assert stats["tokens"]["output"] == local_stats["tokens"]["output"]


def test_ray_run_computes_about_the_single_machine_prompt_tokens(job, ray_job, tiny_llama):
    local_computed = job[2]["tokens"]["computed_prompt"]
    stats = ray_job[1]
    r, computed = stats["ray"], stats["tokens"]["computed_prompt"]
    assert r["workers"] == 2 and r["workers_lost"] == 0 and r["pieces_rerun"] == 0
    assert all(c > 0 for c in r["computed_prompt_tokens_per_worker"])  # both workers got work
    assert sum(r["computed_prompt_tokens_per_worker"]) == computed
    # One engine computes what the driver's global plan says, plus the second sample of "text-3" (n=2): its
    # prompt is shorter than a KV block, so the two samples share nothing.
    text3 = len(AutoTokenizer.from_pretrained(tiny_llama)(PLAIN.format(3))["input_ids"])
    assert text3 < BLOCK
    assert local_computed == r["plan_prompt_tokens_single_machine"] + text3
    # The 16 chat requests are one group (template + preamble) over 4 system prompts, too big for one of 2
    # workers: it is cut once, between system prompts, so only the shared preamble is computed twice: the tokens
    # all 16 rendered prompts begin with (the group's top node ends there, to the token).
    assert r["pieces"] == r["plan_groups"] + 1
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    chats = [tok(tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": "Q?"}],
                                         tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"] for system in SYSTEMS]
    preamble = next(i for i in range(min(map(len, chats))) if len({c[i] for c in chats}) > 1)
    extra = r["plan_prompt_tokens_sharded"] - r["plan_prompt_tokens_single_machine"]
    assert preamble > BLOCK and extra == preamble and extra <= 0.05 * r["plan_prompt_tokens_single_machine"]
    # Each worker runs its pieces in one engine call and computes exactly its planned share.
    assert computed == r["plan_prompt_tokens_sharded"] + text3
    assert computed - local_computed == extra and computed <= 1.05 * local_computed


def test_killed_worker_loses_and_duplicates_nothing(cluster, job, tiny_llama, tmp_path):
    inp, local, _ = job
    killed = []

    def kill_busiest(dispatcher, worker, piece):
        """After the first delivered piece, kill the worker with the most undelivered pieces; with one piece per
        call (window 1) and 2 calls in flight, it still has queued calls, which must run on the other worker."""
        if killed:
            return
        victim = max(sorted(dispatcher.alive), key=dispatcher.undelivered)
        assert dispatcher.undelivered(victim) >= 3
        ray.kill(dispatcher.actors[victim])
        killed.append(victim)

    out = tmp_path / "out.jsonl"
    s = run_batch_file(inp, out, tiny_llama, num_workers=2, on_piece=kill_busiest, dtype="float32", window=1)
    assert len(killed) == 1
    assert s["ray"]["workers_lost"] == 1 and s["ray"]["pieces_rerun"] >= 1
    got = records(out)
    assert_same_results(got, local)
    cids = [r["custom_id"] for r in got.values() if r["custom_id"] is not None]
    assert len(cids) == len(set(cids)) == 24 + 2  # 24 results, the two error lines that have a custom_id


def cached_tokens_apart(records_by_id: dict) -> tuple[dict, dict]:
    """The records with `usage.prompt_tokens_details.cached_tokens` removed, and those counts by id."""
    rest, counts = {}, {}
    for k, r in records_by_id.items():
        r = json.loads(json.dumps(r))
        if r["response"] is not None:
            counts[k] = r["response"]["body"]["usage"]["prompt_tokens_details"].pop("cached_tokens")
        rest[k] = r
    return rest, counts


@pytest.mark.parametrize("cut", [13])
def test_resume_after_a_torn_output_equals_the_local_run(job, ray_job, tiny_llama, tmp_path, cut):
    """A resumed Ray run plans only the requests not yet in OUT, so a request whose group-mates were already done
    shares its prefix with fewer requests: its cached-token count may be lower than in an uninterrupted run (which
    requests the cut leaves undone depends on the order the first run's results came back). Everything else equals
    the local run; the results kept from before the cut are untouched."""
    inp, local, _ = job
    lines = ray_job[0].read_bytes().splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"".join(lines[:cut]) + lines[cut][:25])  # a driver killed in the middle of a write
    shutil.copy(f"{ray_job[0]}.manifest.json", f"{out}.manifest.json")  # written by the same job
    stats = tmp_path / "stats.json"
    assert command.main(job_args(tiny_llama, inp, out, "--ray", "--ray-workers", 2, "--stats-json", stats)) == 0
    got = records(out)
    kept = {r["id"] for r in map(json.loads, lines[:cut])}
    assert {k: got[k] for k in kept} == {k: records(ray_job[0])[k] for k in kept}
    got_rest, got_cached = cached_tokens_apart(got)
    local_rest, local_cached = cached_tokens_apart(local)
    assert_same_results(got_rest, local_rest)
    assert got_cached.keys() == local_cached.keys()
    for k, n in got_cached.items():
        prompt_tokens = got[k]["response"]["body"]["usage"]["prompt_tokens"]
        assert 0 <= n < prompt_tokens, k
        if k in kept:
            assert n == local_cached[k], k
    s = json.loads(stats.read_text())
    assert s["requests"]["skipped_already_done"] == cut
    assert s["requests"]["ok"] + s["requests"]["failed"] == 28 - cut


def test_ray_data_processor_equals_llm_generate(cluster, tiny_llama):
    rows = [{"id": i, "prompt": SYSTEMS[i % 3] + f" Now answer question {i}."} for i in range(12)]
    rows.append({"id": 12, "prompt": "word " * 3000})  # beyond the context: an error row, the rest runs
    sampling = {"max_tokens": 5, "temperature": 0.8}
    proc = PrefixAffinityProcessor(tiny_llama, sampling_params=sampling, num_workers=2, dtype="float32")
    got = sorted(proc(ray.data.from_items(rows)).take_all(), key=lambda r: r["id"])
    assert proc.stats["workers"] == 2
    assert proc.stats["plan_prompt_tokens_sharded"] <= 1.05 * proc.stats["plan_prompt_tokens_single_machine"]

    want = LLM(tiny_llama, dtype="float32").generate([r["prompt"] for r in rows], SamplingParams(**sampling),
                                                     use_tqdm=False)
    assert [r["id"] for r in got] == list(range(13))
    for row, out in zip(got, want):
        assert row["prompt"] == rows[row["id"]]["prompt"]
        assert list(row["generated_token_ids"]) == out.outputs[0].token_ids
        assert row["generated_text"] == out.outputs[0].text
        assert row["finish_reason"] == out.outputs[0].finish_reason
        assert row["num_cached_tokens"] == out.num_cached_tokens
        assert row["error"] == out.error
    assert got[12]["finish_reason"] == "error" and "context" in got[12]["error"]
    assert sum(r["num_cached_tokens"] > 0 for r in got) == 12  # every grouped row read its shared prefix


def test_without_ray_installed_the_flag_fails_with_the_install_hint(job, tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    out = tmp_path / "out.jsonl"
    assert command.main(job_args(tiny_llama, job[0], out, "--ray")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["batchllm run: error: --ray: Ray is not installed; pip install 'batchllm[ray]'"]
    assert not out.exists()
    with pytest.raises(ImportError, match=r"pip install 'batchllm\[ray\]'"):
        run_batch_file(job[0], out, tiny_llama)


def test_batchllm_imports_without_ray():
    code = ("import sys; sys.modules['ray'] = None\n"
            "import batchllm, batchllm.cli, batchllm.jobs.command, batchllm.distributed\n"
            "from batchllm.distributed import ray_runner, ray_data, run_batch_file, PrefixAffinityProcessor\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "ok"

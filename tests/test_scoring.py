"""Prompt logprobs and scoring: per-position logprobs equal HF's fp32 log-softmax to 1e-5 whatever the grouping,
chunking and KV pressure; shared positions are computed once; only the scored positions reach the lm_head; the
lm-evaluation-harness backend gives the accuracy of lm-eval's own HF backend; batch files echo prompt logprobs."""

import json
import os
import random

import pytest
import torch
from hf_reference import hf_logprobs

from batchllm import LLM, SamplingParams

TOL = 1e-5


def shared_prompts(seed: int = 0) -> list[list[int]]:
    """Two groups sharing 21- and 35-token prefixes (block size 4: nodes end mid-prompt), plus a loner."""
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(4, 400) for _ in range(n)]

    a, b = [1] + toks(20), [1] + toks(34)
    return [a + toks(rng.randrange(2, 9)) for _ in range(4)] + [b + toks(rng.randrange(2, 9)) for _ in range(3)] + [
        [1] + toks(7)]


def check_prompt_logprobs(model_dir, prompts, outs, k, first=1):
    for prompt, out in zip(prompts, outs):
        ref = hf_logprobs(str(model_dir), prompt)  # [L, V]: row j - 1 predicts token j
        assert out.prompt_token_ids == prompt and len(out.prompt_logprobs) == len(prompt)
        for j, entry in enumerate(out.prompt_logprobs):
            if j == 0 or j < first:
                assert entry is None
                continue
            row = ref[j - 1]
            assert abs(entry[prompt[j]] - row[prompt[j]].item()) < TOL, (j, entry[prompt[j]], row[prompt[j]].item())
            assert set(entry) == {prompt[j]} | set(torch.topk(row, k).indices.tolist())
            for t, v in entry.items():
                assert abs(v - row[t].item()) < TOL


@pytest.mark.parametrize("policy,chunk,kv_blocks", [("batchllm", 64, 64), ("batchllm", 5, 64), ("batchllm", 16, 14),
                                                    ("fcfs-cache", 7, 64), ("fcfs", 64, 64)])
def test_prompt_logprobs_equal_hf_whatever_the_grouping_chunking_and_kv_pressure(tiny_llama, policy, chunk,
                                                                                 kv_blocks):
    prompts = shared_prompts()
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, max_num_batched_tokens=chunk, policy=policy,
              kv_cache_memory_bytes=kv_blocks * 2048)  # 2 KiB per 4-token block of this model
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=3)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    check_prompt_logprobs(tiny_llama, prompts, outs, 3)
    assert [len(o.outputs[0].token_ids) for o in outs] == [3] * len(prompts)  # generation is unchanged
    if policy == "batchllm":
        stats = llm.stats()
        assert stats.computed_prompt_tokens == stats.plan["plan_tokens"] < stats.prompt_tokens


def test_scoring_only_sends_the_scored_positions_to_the_lm_head(tiny_llama):
    """max_tokens=0 scores without generating; with prompt_logprobs_from, the rows before it never reach the
    lm_head, and a shared prefix's rows are computed (and go to the lm_head) once for all its requests."""
    prompts = shared_prompts(1)
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 20)
    rows = []
    logits = llm.runner.model.logits
    llm.runner.model.logits = lambda h: rows.append(h.shape[0]) or logits(h)
    first = [len(p) - 3 for p in prompts]  # the last 3 tokens of each prompt are its "continuation"
    params = [SamplingParams(max_tokens=0, prompt_logprobs=0, prompt_logprobs_from=f) for f in first]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    assert sum(rows) == 3 * len(prompts)  # only the scored positions, and no sampling row
    assert all(o.outputs[0].token_ids == [] and o.outputs[0].finish_reason == "length" for o in outs)
    for prompt, out, f in zip(prompts, outs, first):
        check_prompt_logprobs(tiny_llama, [prompt], [out], 0, first=f)
    rows.clear()
    shared = [prompts[0][:21] + [5, 6], prompts[0][:21] + [7, 8]]  # the 21-token node holds rows 19 and 20
    llm.generate([{"prompt_token_ids": p} for p in shared], SamplingParams(max_tokens=0, prompt_logprobs=0,
                                                                          prompt_logprobs_from=20), use_tqdm=False)
    assert llm.stats().plan["plan_tokens"] == 21 + 2 * 2
    assert sum(rows) == 2 + 2 * 1  # rows 19 and 20 (tokens 20 and 5 / 7) once for both, then each request's row 21


def test_loglikelihood_equals_hf_and_shares_the_context(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 20)
    tok = llm.get_tokenizer()
    context = "The river runs past the old library and the quiet station, where the trains stop twice a day."
    choices = [" yes", " no", " maybe later", " the library"]
    results = llm.loglikelihood([(context, c) for c in choices])
    assert llm.stats().computed_prompt_tokens < llm.stats().prompt_tokens  # the context ran once
    for choice, (total, greedy) in zip(choices, results):
        ctx = tok(context)["input_ids"]
        whole = tok(context + choice)["input_ids"]
        ref = hf_logprobs(str(tiny_llama), whole)
        cont = whole[len(ctx):]
        want = sum(ref[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))
        assert abs(total - want) < TOL * len(cont)
        assert greedy == all(int(ref[len(ctx) - 1 + i].argmax()) == t for i, t in enumerate(cont))
    ids = llm.score_tokens([([1, 50, 60], [70, 80]), ([], [9])])
    ref = hf_logprobs(str(tiny_llama), [1, 50, 60, 70, 80])
    assert abs(ids[0][0] - (ref[2, 70] + ref[3, 80]).item()) < 2 * TOL
    assert abs(ids[1][0] - hf_logprobs(str(tiny_llama), [1, 9])[0, 9].item()) < TOL  # empty context: the bos


def test_loglikelihood_rolling_windows_the_context(tiny_llama):
    """A text longer than the context is scored in windows of max_model_len - 1 tokens, each seeing the token
    before it: the total equals the windows' logprobs summed, as HF computes them."""
    llm = LLM(str(tiny_llama), dtype="float32", block_size=4, kv_cache_memory_bytes=1 << 20, max_model_len=16)
    ids = [random.Random(2).randrange(4, 400) for _ in range(40)]
    total = llm.loglikelihood_rolling([ids])[0]
    want, previous = 0.0, [1]
    for start in range(0, 40, 15):
        window = ids[start:start + 15]
        ref = hf_logprobs(str(tiny_llama), previous + window)
        want += sum(ref[i, t].item() for i, t in enumerate(window))
        previous = ids[start + 14:start + 15]
    assert abs(total - want) < TOL * len(ids)


def write_task(folder, rows):
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "task.yaml").write_text(
        "task: local_mc\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")


def test_lm_eval_backend_scores_as_lm_evals_hf_backend(tiny_llama, tmp_path, monkeypatch):
    """A local multiple-choice task (no hub access) through `--model batchllm` and `--model hf` on the same fp32
    model: the same accuracy, and each choice's loglikelihood within 1e-4."""
    lm_eval = pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval.tasks import TaskManager

    import batchllm.lm_eval_backend  # noqa: F401  (registers "batchllm")

    rng = random.Random(0)
    words = ["river", "mountain", "library", "station", "garden", "window", "market", "harbour"]
    rows = [{"question": f"Where is the {rng.choice(words)} near the {rng.choice(words)}?",
             "choices": rng.sample(words, 4), "answer": rng.randrange(4)} for _ in range(24)]
    write_task(tmp_path, rows)
    tasks = TaskManager(include_path=str(tmp_path))
    results = {}
    for name, extra in (("batchllm", ",block_size=4,kv_cache_memory_bytes=4194304"), ("hf", ",device=cpu")):
        r = lm_eval.simple_evaluate(model=name, model_args=f"pretrained={tiny_llama},dtype=float32{extra}",
                                    tasks=["local_mc"], task_manager=tasks, log_samples=True, num_fewshot=0)
        results[name] = (r["results"]["local_mc"]["acc,none"], r["results"]["local_mc"]["acc_norm,none"],
                         [[x[0] for x in s["filtered_resps"]] for s in r["samples"]["local_mc"]])
    assert results["batchllm"][:2] == results["hf"][:2]
    for ours, theirs in zip(results["batchllm"][2], results["hf"][2]):
        assert max(abs(a - b) for a, b in zip(ours, theirs)) < 1e-5 * 8  # a choice is at most 8 tokens


def test_lm_eval_generate_until_stops_at_until(tiny_llama):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from batchllm.lm_eval_backend import BatchLLMLM

    lm = BatchLLMLM(pretrained=str(tiny_llama), dtype="float32", block_size="4", kv_cache_memory_bytes="1048576")
    plain = lm.llm.generate("Once upon a time", SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)
    text = plain[0].outputs[0].text
    until = text[3:5]
    req = Instance("generate_until", {}, ("Once upon a time", {"until": [until], "max_gen_toks": 12}), 0)
    assert lm.generate_until([req], disable_tqdm=True) == [text[: text.index(until)]]


def test_batch_file_echo_returns_the_prompt_logprobs(tiny_llama, tmp_path):
    """/v1/completions with echo, logprobs and max_tokens 0: the legacy API's prompt scoring."""
    from batchllm.cli import main

    prompt = "The old clockmaker opened the shutters of his workshop"
    line = {"custom_id": "s", "method": "POST", "url": "/v1/completions",
            "body": {"model": "x", "prompt": prompt, "echo": True, "logprobs": 2, "max_tokens": 0}}
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text(json.dumps(line) + "\n")
    assert main(["run", "-i", str(src), "-o", str(out), "--model", str(tiny_llama), "--dtype", "float32",
                 "--kv-cache-memory-bytes", str(1 << 20), "--no-progress"]) == 0
    body = json.loads(out.read_text())["response"]["body"]
    choice = body["choices"][0]
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=1 << 20)
    ids = llm.get_tokenizer()(prompt)["input_ids"]
    ref = hf_logprobs(str(tiny_llama), ids)
    assert choice["text"] == prompt and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None
    assert all(abs(v - ref[j - 1, ids[j]].item()) < TOL for j, v in enumerate(lp["token_logprobs"]) if j)
    assert all(len(t) == 2 for t in lp["top_logprobs"][1:]) and body["usage"]["completion_tokens"] == 0
    assert os.path.getsize(out) > 0


@pytest.mark.parametrize("command", ["batchllm eval", "lm_eval"])
def test_lm_evals_command_line_runs_model_batchllm(command, tiny_llama, tmp_path):
    """`batchllm eval --model batchllm ...` (lm_eval's command line with this backend registered first) and lm-eval's
    own `lm_eval --model batchllm ...` (found through batchllm_lm_eval.pth, which `make install` writes)."""
    pytest.importorskip("lm_eval")
    import subprocess
    import sys
    from pathlib import Path

    import batchllm_lm_eval

    if command == "lm_eval" and not batchllm_lm_eval.pth_path().exists():
        pytest.skip(f"{batchllm_lm_eval.pth_path()} is not installed (make install writes it)")
    argv = [sys.executable, "-m", "batchllm", "eval"] if command == "batchllm eval" else \
        [str(Path(sys.executable).parent / "lm_eval")]

    rng = random.Random(1)
    rows = [{"question": f"Is {rng.randrange(100)} even?", "choices": ["yes", "no"], "answer": rng.randrange(2)}
            for _ in range(6)]
    write_task(tmp_path, rows)
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", PYTHONPATH=str(repo))
    out = subprocess.run([*argv, "--model", "batchllm", "--model_args",
                          f"pretrained={tiny_llama},dtype=float32,kv_cache_memory_bytes=4194304", "--tasks", "local_mc",
                          "--include_path", str(tmp_path), "--output_path", str(tmp_path / "results"),
                          "--device", "cpu", "--batch_size", "auto", "--max_batch_size", "16"],
                         capture_output=True, text=True, env=env, cwd=repo, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "local_mc" in out.stdout and "acc" in out.stdout
    saved = list((tmp_path / "results").rglob("results_*.json"))
    assert len(saved) == 1 and json.loads(saved[0].read_text())["config"]["model"] == "batchllm"


def test_the_lm_eval_pth_line_registers_lazily_and_is_a_no_op_once_batchllm_is_gone(tmp_path):
    """The line site runs at every interpreter start: it must not fail where batchllm was uninstalled, and where it
    is installed it imports neither batchllm nor torch until lm-eval asks for the model."""
    import subprocess
    import sys

    import batchllm_lm_eval

    gone = batchllm_lm_eval.PTH_LINE.replace("batchllm_lm_eval as m", "batchllm_uninstalled_xyz as m")
    scope: dict = {}
    exec(gone, scope)
    assert scope["m"] is None
    pytest.importorskip("lm_eval")
    probe = ("import sys; exec(open(sys.argv[1]).read()); import lm_eval.models; "
             "from lm_eval.api.registry import model_registry as r; "
             "print('batchllm' in r, 'torch' in sys.modules, 'batchllm' in sys.modules)")
    pth = tmp_path / "line.pth"
    pth.write_text(batchllm_lm_eval.PTH_LINE)
    out = subprocess.run([sys.executable, "-S", "-c", probe, str(pth)], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)), timeout=120)
    assert out.stdout.split() == ["True", "False", "False"], out.stderr[-2000:]

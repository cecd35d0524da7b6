"""fp32 greedy outputs are token-identical to HF transformers, whatever the policy, grouping, order, chunking or
KV pressure."""

import random

import pytest
import torch
from hf_reference import hf_greedy, hf_logprobs
from kernel_paths import isa_params

from batchllm import LLM, SamplingParams
from batchllm.prefix import plan_batch

MAX_NEW = 10


def nested_workload(seed: int, vocab: int = 400) -> list[list[int]]:
    """Shuffled prompts with nested shared prefixes, duplicates, a prompt that is exactly another's prefix, and
    standalone prompts. Token ids avoid the special ids 0-3."""
    rng = random.Random(seed)

    def toks(n):
        return [rng.randrange(4, vocab) for _ in range(n)]

    prompts = []
    for _ in range(3):
        system = [1] + toks(rng.randrange(9, 30))
        for _ in range(2):
            shots = toks(rng.randrange(5, 20))
            for _ in range(rng.randrange(1, 4)):
                prompts.append(system + shots + toks(rng.randrange(1, 12)))
        prompts.append(system + toks(rng.randrange(1, 6)))
    prompts.append(list(prompts[0]))  # a duplicate
    prompts.append(prompts[1][: len(prompts[1]) - 3])  # exactly a prefix of another prompt
    prompts.append(prompts[2][:9])
    for _ in range(3):
        prompts.append([1] + toks(rng.randrange(2, 25)))
    rng.shuffle(prompts)
    return prompts


def run(model_dir, prompts, max_new=MAX_NEW, **kw):
    kw.setdefault("kv_cache_memory_bytes", 8 << 20)
    kw.setdefault("block_size", 4)
    llm = LLM(str(model_dir), dtype="float32", **kw)
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.stats()


@pytest.fixture(scope="module")
def workload():
    return nested_workload(0)


@pytest.fixture(scope="module")
def llama_reference(tiny_llama, workload):
    return hf_greedy(str(tiny_llama), workload, MAX_NEW)


@pytest.mark.parametrize("policy", ["batchllm", "fcfs-cache", "lpm-cache", "fcfs"])
@pytest.mark.parametrize("chunk", [7, 64])
def test_every_policy_matches_hf(tiny_llama, workload, llama_reference, policy, chunk):
    outs, stats = run(tiny_llama, workload, policy=policy, max_num_batched_tokens=chunk)
    assert outs == llama_reference
    assert stats["preemptions"] == 0
    logical = sum(len(p) for p in workload)
    assert stats["prompt_tokens"] == logical
    if policy == "fcfs":
        assert stats["computed_prompt_tokens"] == logical
    if policy == "batchllm":
        assert stats["computed_prompt_tokens"] == stats["plan"]["plan_tokens"] < logical
        ends = [n.end for n in plan_batch(workload, 4).nodes]
        assert sum(e % 4 != 0 for e in ends) >= 3  # nodes that end mid-block: sequences below start mid-block


@pytest.mark.parametrize("isa", isa_params(need_bf16=True))
def test_fp32_on_every_vector_kernel_path_runs_the_fused_ops_and_matches_hf(tiny_llama, workload, llama_reference,
                                                                            isa, monkeypatch):
    """dtype=float32 on each kernel path with vector kernels: the fused fp32 element-wise ops (norms, residual
    adds, rotary + cache write, SiLU * up, the merge) run, the tokens are HF's and the logprobs HF's fp32
    log-softmax to 1e-5."""
    monkeypatch.setenv("BATCHLLM_ISA", isa)
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=8 << 20, block_size=4,
              max_num_batched_tokens=16)
    assert llm.runner.model.kernels is not None and llm.runner.model.kernels.isa() == isa
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True, logprobs=1)
    outs = llm.generate([{"prompt_token_ids": p} for p in workload], params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == llama_reference
    for prompt, out in list(zip(workload, outs))[:4]:
        o = out.outputs[0]
        ref = hf_logprobs(str(tiny_llama), prompt + o.token_ids)  # [L, V]
        errors = [abs(entry[tok] - ref[len(prompt) - 1 + i, tok].item())
                  for i, (tok, entry) in enumerate(zip(o.token_ids, o.logprobs))]
        assert max(errors) < 1e-5, errors
    assert llm.runner.model.dtype == torch.float32


@pytest.mark.parametrize("fixture", ["tiny_qwen2", "tiny_mistral", "tiny_llama_mqa", "tiny_llama3_rope"])
def test_architectures_match_hf(request, fixture):
    model_dir = request.getfixturevalue(fixture)
    prompts = nested_workload(1)
    ref = hf_greedy(str(model_dir), prompts, MAX_NEW)
    outs, _ = run(model_dir, prompts, max_num_batched_tokens=16)
    assert outs == ref


def test_shuffled_order_and_block_size_do_not_change_answers(tiny_llama, workload, llama_reference):
    order = list(range(len(workload)))
    random.Random(5).shuffle(order)
    outs, _ = run(tiny_llama, [workload[i] for i in order], block_size=8, max_num_batched_tokens=24)
    assert outs == [llama_reference[i] for i in order]


@pytest.mark.parametrize("policy", ["batchllm", "fcfs-cache", "lpm-cache", "fcfs"])
def test_tight_kv_budget_matches_hf(tiny_llama, workload, llama_reference, policy):
    # 2 layers x 2 kv heads x 16 dims x 2 (K, V) x 4 bytes = 512 bytes per token; 4-token blocks: 2 KiB per block.
    budget = 18 * 2048  # 18 blocks: enough for the largest request, far less than the batch needs
    longest = max(len(p) for p in workload) + MAX_NEW
    assert -(-longest // 4) <= 18 < sum(-(-(len(p) + MAX_NEW) // 4) for p in workload) // 3
    outs, stats = run(tiny_llama, workload, policy=policy, kv_cache_memory_bytes=budget, max_num_batched_tokens=16)
    assert outs == llama_reference
    assert stats["peak_kv_blocks"] <= 18
    if policy != "batchllm":
        assert stats["preemptions"] > 0  # streaming admission overcommits under this budget


def test_a_cache_that_holds_only_the_longest_request_gets_block_ends(tiny_llama, workload, llama_reference):
    """16 blocks hold the longest request alone (16 blocks) but not its chain under nodes that end mid-block (17):
    the plan ends its nodes at blocks, and the batch still runs to HF's answers."""
    totals = [len(p) + MAX_NEW for p in workload]
    assert max(-(-t // 4) for t in totals) == 16 < plan_batch(workload, 4).max_chain_blocks(totals)
    outs, stats = run(tiny_llama, workload, kv_cache_memory_bytes=16 * 2048, max_num_batched_tokens=16)
    assert outs == llama_reference
    assert stats["plan"]["plan_tokens"] == plan_batch(workload, 4, token_ends=False).stats.plan_tokens
    assert stats["peak_kv_blocks"] <= 16


def test_batchllm_recovers_from_a_too_low_decode_estimate(tiny_llama):
    """The history estimator learns from 16 requests that stop after one token, then long requests arrive: it
    overcommits the KV and must preempt, yet every answer stays exact."""
    rng = random.Random(3)
    quick = [[1] + [rng.randrange(4, 400) for _ in range(3)] for _ in range(16)]
    slow = [[1] + [rng.randrange(4, 400) for _ in range(12)] for _ in range(12)]
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=20 * 2048, block_size=4,
              max_num_batched_tokens=64)
    stop_all = SamplingParams(temperature=0.0, max_tokens=40, stop_token_ids=list(range(512)))
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in quick + slow], [stop_all] * 16 + [long] * 12,
                        use_tqdm=False)
    assert llm.stats()["preemptions"] > 0
    ref_quick = hf_greedy(str(tiny_llama), quick, 1)
    ref_slow = hf_greedy(str(tiny_llama), slow, 40)
    assert [o.outputs[0].token_ids for o in outs] == ref_quick + ref_slow
    assert [o.outputs[0].finish_reason for o in outs] == ["stop"] * 16 + ["length"] * 12


def test_one_level_plan_matches_too(tiny_llama, workload, llama_reference):
    outs, stats = run(tiny_llama, workload, plan_mode="one-level")
    assert outs == llama_reference
    nested_outs, nested_stats = run(tiny_llama, workload)
    assert nested_outs == llama_reference
    assert nested_stats["computed_prompt_tokens"] <= stats["computed_prompt_tokens"]


def test_mistral_sliding_window_matches_hf(tmp_path, tokenizer_dir):
    """A window shorter than the prompts: shared-prefix parts partly or wholly out of sight still merge exactly."""
    from batchllm.tiny import build_tiny_checkpoint

    model_dir = build_tiny_checkpoint(tmp_path / "mistral-sw", arch="mistral", sliding_window=8, seed=7,
                                      tokenizer_dir=tokenizer_dir)
    prompts = nested_workload(2)
    ref = hf_greedy(str(model_dir), prompts, MAX_NEW)
    for policy in ("batchllm", "fcfs"):
        outs, _ = run(model_dir, prompts, policy=policy, max_num_batched_tokens=16)
        assert outs == ref

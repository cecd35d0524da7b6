"""Qwen3, Gemma 3 (text) and Phi-3: fp32 greedy tokens equal HF transformers' on tiny random checkpoints, under
every policy, chunk size and KV pressure the Llama tests use; their configs read as HF reads them; what is not
supported is named."""

import json
import random
import shutil

import pytest
import torch
from conftest import PHI3_LONGROPE
from hf_reference import hf_greedy, hf_logprobs
from test_engine_vs_hf import MAX_NEW, nested_workload, run

from batchllm import LLM, SamplingParams
from batchllm.model_config import ModelConfig

ARCHS = ["tiny_qwen3", "tiny_gemma3", "tiny_phi3"]


@pytest.fixture(scope="module")
def workload():
    return nested_workload(4)


@pytest.fixture(scope="module")
def references(request, workload):
    """HF's greedy tokens of the workload, per architecture fixture (computed once)."""
    cache = {}

    def get(fixture):
        if fixture not in cache:
            cache[fixture] = hf_greedy(str(request.getfixturevalue(fixture)), workload, MAX_NEW)
        return cache[fixture]

    return get


@pytest.mark.parametrize("fixture", ARCHS)
@pytest.mark.parametrize("policy", ["batchllm", "fcfs-cache", "lpm-cache", "fcfs"])
@pytest.mark.parametrize("chunk", [7, 64])
def test_every_policy_and_chunk_size_matches_hf(request, fixture, references, workload, policy, chunk):
    outs, stats = run(request.getfixturevalue(fixture), workload, policy=policy, max_num_batched_tokens=chunk)
    assert outs == references(fixture)
    if policy == "batchllm":
        assert stats["computed_prompt_tokens"] == stats["plan"]["plan_tokens"] < sum(len(p) for p in workload)


@pytest.mark.parametrize("fixture", ARCHS)
@pytest.mark.parametrize("policy", ["batchllm", "fcfs"])
def test_tight_kv_budget_matches_hf(request, fixture, references, workload, policy):
    model_dir = request.getfixturevalue(fixture)
    cfg = ModelConfig.from_hf(model_dir)
    per_block = 4 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4  # 4-token blocks, K and V, fp32
    longest = max(len(p) for p in workload) + MAX_NEW
    blocks = -(-longest // 4) + 1
    assert blocks < sum(-(-(len(p) + MAX_NEW) // 4) for p in workload) // 3  # far less than the batch needs
    outs, stats = run(model_dir, workload, policy=policy, kv_cache_memory_bytes=blocks * per_block,
                      max_num_batched_tokens=16)
    assert outs == references(fixture)
    assert stats["peak_kv_blocks"] <= blocks


def test_gemma3_shared_prefix_longer_than_the_window_matches_hf(tiny_gemma3):
    """Prompts share a 45-token prefix, five times the windowed layers' 8 keys: on those layers the shared part is
    partly or wholly out of sight of each request's own tokens, on the global layers wholly visible."""
    rng = random.Random(7)
    prefix = [1] + [rng.randrange(4, 400) for _ in range(44)]
    prompts = [prefix + [rng.randrange(4, 400) for _ in range(rng.randrange(1, 9))] for _ in range(6)]
    ref = hf_greedy(str(tiny_gemma3), prompts, 12)
    for policy, chunk in (("batchllm", 16), ("batchllm", 5), ("fcfs-cache", 16)):
        outs, stats = run(tiny_gemma3, prompts, max_new=12, policy=policy, max_num_batched_tokens=chunk)
        assert outs == ref, (policy, chunk)
    assert stats["computed_prompt_tokens"] < sum(len(p) for p in prompts)


def test_gemma3_logprobs_equal_hf_log_softmax(tiny_gemma3):
    """Soft-capped logits, scaled embeddings and (1 + w) norms: the sampled tokens' logprobs equal HF's fp32
    log-softmax to 1e-5."""
    prompts = nested_workload(5)[:6]
    llm = LLM(str(tiny_gemma3), dtype="float32", kv_cache_memory_bytes=8 << 20, block_size=4)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=3), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        o = out.outputs[0]
        ref = hf_logprobs(str(tiny_gemma3), prompt + o.token_ids)  # [L, V]
        for i, (tok, entry) in enumerate(zip(o.token_ids, o.logprobs)):
            row = ref[len(prompt) - 1 + i]
            assert abs(entry[tok] - row[tok].item()) < 1e-5
            assert set(entry) == {tok} | set(torch.topk(row, 3).indices.tolist())


def test_phi3_long_context_uses_the_long_factors_as_hf(tiny_phi3):
    """With max_model_len past the original context (128), the long factors rotate every position, as HF does for
    sequences longer than the original context; within it (the default) the short ones, as HF does for short
    sequences (the other tests)."""
    rng = random.Random(3)
    prompts = [[1] + [rng.randrange(4, 400) for _ in range(rng.randrange(130, 150))] for _ in range(3)]
    ref = hf_greedy(str(tiny_phi3), prompts, 8)
    llm = LLM(str(tiny_phi3), dtype="float32", kv_cache_memory_bytes=16 << 20, block_size=4, max_model_len=512)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    default = LLM(str(tiny_phi3), dtype="float32", kv_cache_memory_bytes=16 << 20, block_size=4)
    assert default.model_config.max_model_len == 128
    out = default.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(max_tokens=8), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "error" and "128" in out.error


def test_configs_read_as_hf_reads_them(tiny_qwen3, tiny_gemma3, tiny_phi3):
    qwen3 = ModelConfig.from_hf(tiny_qwen3)
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.layer_windows == (None, None)
    gemma = ModelConfig.from_hf(tiny_gemma3)
    assert gemma.layer_windows == (8, None, 8, None) and gemma.sliding_window == 8
    assert (gemma.rope.theta, gemma.local_rope.theta) == (1_000_000.0, 10_000.0)
    assert gemma.rope_of(0) is gemma.local_rope and gemma.rope_of(1) is gemma.rope
    assert (gemma.norm_offset, gemma.embed_scale, gemma.scale, gemma.final_logit_softcap) == (1.0, 8.0, 24 ** -0.5,
                                                                                               3.0)
    assert gemma.sandwich_norms and gemma.qk_norm and gemma.hidden_act == "gelu_tanh" and gemma.tie_word_embeddings
    phi = ModelConfig.from_hf(tiny_phi3)
    assert phi.fused_checkpoint and phi.rope.rope_type == "longrope"
    assert phi.rope.short_factor == tuple(PHI3_LONGROPE["short_factor"])
    assert phi.rope.attention_factor == pytest.approx((1 + torch.log(torch.tensor(4.0)).item()
                                                       / torch.log(torch.tensor(128.0)).item()) ** 0.5)


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_what_is_not_supported_is_named(tiny_phi3, tiny_gemma3, tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        ModelConfig.from_hf(_edited(tiny_phi3, tmp_path / "p", rope_parameters={**PHI3_LONGROPE,
                                                                                "partial_rotary_factor": 0.5}))
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        ModelConfig.from_hf(_edited(tiny_gemma3, tmp_path / "g", attn_logit_softcapping=50.0))
    with pytest.raises(ValueError, match="activation 'relu'"):
        ModelConfig.from_hf(_edited(tiny_llama, tmp_path / "r", hidden_act="relu"))
    with pytest.raises(ValueError, match="Gemma3ForCausalLM, Phi3ForCausalLM"):
        ModelConfig.from_hf(_edited(tiny_llama, tmp_path / "x", architectures=["FalconForCausalLM"]))
    broken = _edited(tiny_llama, tmp_path / "k")
    cfg = json.loads((broken / "config.json").read_text())
    del cfg["hidden_size"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="lacks the field 'hidden_size'"):
        ModelConfig.from_hf(broken)

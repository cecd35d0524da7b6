"""The last layer runs on the logits rows only (ForwardBatch.attn_last): it must give the logits of the full last
layer, on every kind of step (prefill chunks that sample nothing, chunks that finish a prompt, decodes, shared-prefix
parts), in fp32 (torch paths) and in bf16 (the AVX512-BF16 kernels where built)."""

import dataclasses

import pytest
from test_engine_vs_hf import nested_workload

from batchllm import LLM, SamplingParams
from batchllm.tiny import build_tiny_checkpoint


def _checked_run(model_dir, dtype):
    """Generate with a small token budget (so prompts are chunked); at every step compare the logits of the batch as
    built against the same batch without `attn_last`. Returns (steps with attn_last, steps sampling nothing, worst
    abs difference, worst relative difference)."""
    llm = LLM(str(model_dir), dtype=dtype, kv_cache_memory_bytes=8 << 20, block_size=4, max_num_batched_tokens=24)
    model = llm.runner.model
    forward = model.forward
    seen = {"restricted": 0, "empty": 0, "diff": 0.0, "rel": 0.0}

    def checked(batch, kv_caches):
        got = forward(batch, kv_caches)  # [B, V]
        if batch.attn_last is not None:
            seen["restricted"] += 1
            seen["empty"] += int(batch.logits_rows.numel() == 0)
            assert batch.attn_last[0].num_tokens == batch.logits_rows.numel()
            # the full last layer again: the step's K/V writes are idempotent, so running it twice is harmless
            full = forward(dataclasses.replace(batch, attn_last=None), kv_caches)  # [B, V]
            assert got.shape == full.shape
            if got.numel():
                diff = (got - full).abs().max().item()
                seen["diff"] = max(seen["diff"], diff)
                seen["rel"] = max(seen["rel"], diff / full.abs().max().item())
        return got

    model.forward = checked
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    long_prompt = [1] + [5 + (7 * i) % 300 for i in range(70)]  # 71 tokens in chunks of 24: two steps sample nothing
    for prompts in ([long_prompt], nested_workload(3)):
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 4 for o in outs)

    return seen


def test_fp32_last_layer_on_logits_rows_matches_the_full_layer(tiny_llama):
    seen = _checked_run(tiny_llama, "float32")
    assert seen["restricted"] >= 5 and seen["empty"] >= 1  # chunked prefill: some steps sample nothing
    assert seen["rel"] < 1e-5, seen  # same math (measured 5e-7): only the attention routing of those rows differs


def test_bf16_last_layer_on_logits_rows_matches_the_full_layer(tmp_path_factory, tokenizer_dir):
    model_dir = build_tiny_checkpoint(tmp_path_factory.mktemp("d32"), "llama", hidden_size=128, num_heads=4,
                                      num_kv_heads=2, intermediate_size=256, tokenizer_dir=tokenizer_dir, seed=5)
    seen = _checked_run(model_dir, "bfloat16")  # head_dim 32: the AVX512-BF16 kernels run where they were built
    assert seen["restricted"] >= 5 and seen["empty"] >= 1
    assert seen["rel"] < 2e-2, seen  # bf16 rounding in another order (measured 0.006), nothing more


def test_decode_only_steps_need_no_restriction(tiny_llama):
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=8 << 20, block_size=4)
    batches = []
    forward = llm.runner.model.forward
    llm.runner.model.forward = lambda batch, kv: batches.append(batch) or forward(batch, kv)
    llm.generate([{"prompt_token_ids": [1, 5, 6, 7]}, {"prompt_token_ids": [1, 9]}],
                 SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    first = batches[0]  # both prompts whole: their last rows (positions 3 and 1) want logits
    assert first.attn_last is not None and sorted(first.positions[first.logits_rows].tolist()) == [1, 3]
    assert [b.attn_last for b in batches[1:]] == [None, None]  # decodes: every row is a logits row


if __name__ == "__main__":
    pytest.main([__file__, "-q"])

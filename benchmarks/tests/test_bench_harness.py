"""Fast checks of the benchmark harness: workloads (shapes, determinism, special ids, KV arithmetic), the table
figures (FLOPs, agreement, ratios) and the runners' shared helpers. No engine is run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import summary, workloads
from benchmarks.models import matmul_params, safetensors_shapes

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "peers"))
import common  # noqa: E402

SPACE = workloads.TokenSpace(bos=1, low=0, high=512, special=frozenset({0, 1, 2, 3, 4, 5}))


def _make(name: str, quick: bool = True, seed: int = 0) -> dict:
    return workloads.make_workload(name, SPACE, quick=quick, kv_bytes_per_tok=8192, seed=seed)


def test_batchllm_quick_shape_groups_and_shuffle():
    w = _make("batchllm")
    shape = workloads.QUICK_SHAPES["batchllm"]
    assert len(w["prompts"]) == shape.groups * shape.degree == 64
    assert all(len(p) == 384 + 32 for p in w["prompts"])
    assert w["max_tokens"] == [16] * 64
    heads = [tuple(p[:384]) for p in w["prompts"]]
    assert sorted(heads.count(h) for h in set(heads)) == [16, 16, 16, 16]
    # the 385th token is distinct per prompt: no sharing beyond the group's context
    assert len({tuple(p[:385]) for p in w["prompts"]}) == 64
    # shuffled: the first 16 prompts are not one group
    assert len(set(heads[:16])) > 1


def test_prompts_start_with_bos_and_avoid_special_ids():
    for name in workloads.WORKLOAD_NAMES:
        w = _make(name)
        for p in w["prompts"]:
            assert p[0] == 1
            assert all(t not in SPACE.special and 0 <= t < 512 for t in p[1:])


def test_workloads_are_deterministic_and_seeded():
    assert _make("mixed-output") == _make("mixed-output")
    assert _make("mixed-output")["prompts"] != _make("mixed-output", seed=1)["prompts"]
    assert _make("batchllm")["prompts"] != _make("sglang-gsp")["prompts"]


def test_sglang_gsp_groups_adjacent_and_no_sharing_distinct():
    w = _make("sglang-gsp")
    heads = [tuple(p[:256]) for p in w["prompts"]]
    assert len(set(heads[:16])) == 1 and len(set(heads[16:])) == 1 and heads[0] != heads[16]
    assert w["max_tokens"] == [32] * 32
    ns = _make("no-sharing")
    assert len({tuple(p[:2]) for p in ns["prompts"]}) == 32  # only bos is common


def test_mixed_output_lengths_in_range():
    w = _make("mixed-output")
    assert min(w["max_tokens"]) >= 8 and max(w["max_tokens"]) <= 64
    assert len(set(w["max_tokens"])) > 5


def test_kv_tokens_needed_exact():
    prompts = [[1, 7, 8, 9], [1, 7, 8, 10], [1, 6]]
    assert workloads.kv_tokens_needed(prompts, [2, 2, 3], shared=False) == 4 + 4 + 2 + 7
    # trie nodes: 1,7,8,9,10,6 = 6, plus 7 output slots
    assert workloads.kv_tokens_needed(prompts, [2, 2, 3], shared=True) == 13


def test_tight_kv_budget_is_a_third_of_perfect_sharing():
    w = _make("tight-kv")
    base = _make("batchllm")
    assert w["prompts"] == base["prompts"] and w["max_tokens"] == base["max_tokens"]
    need = 1 + 4 * 383 + 64 * (32 + 16)  # bos, each group's context once, each prompt's own part and outputs
    assert w["kv_tokens_perfect_sharing"] == need
    assert w["kv_cache_memory_bytes"] == int(need / 3) * 8192
    assert base["kv_cache_memory_bytes"] is None


def test_kv_bytes_per_token():
    cfg = {"num_attention_heads": 8, "num_key_value_heads": 4, "hidden_size": 512, "num_hidden_layers": 8}
    assert workloads.kv_bytes_per_token(cfg) == 2 * 8 * 4 * 64 * 2


def test_token_space_from_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3, "vocab_size": 1000}))
    (tmp_path / "tokenizer.json").write_text(json.dumps(
        {"added_tokens": [{"id": 0}, {"id": 1}, {"id": 2}, {"id": 3}, {"id": 4}],
         "model": {"vocab": {"a": 5, "b": 299}}}))
    space = workloads.token_space_from_model(tmp_path)
    assert space == workloads.TokenSpace(bos=1, low=0, high=300, special=frozenset({0, 1, 2, 3, 4}))


def test_matmul_params_from_safetensors_header(tmp_path):
    header = {"model.embed_tokens.weight": {"dtype": "F32", "shape": [100, 8], "data_offsets": [0, 3200]},
              "model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [16, 8], "data_offsets": [3200, 3712]},
              "model.layers.0.input_layernorm.weight": {"dtype": "F32", "shape": [8], "data_offsets": [3712, 3744]},
              "__metadata__": {"format": "pt"}}
    raw = json.dumps(header).encode()
    (tmp_path / "model.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(3744))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 100, "hidden_size": 8}))
    assert safetensors_shapes(tmp_path)["model.layers.0.mlp.up_proj.weight"] == [16, 8]
    assert matmul_params(tmp_path) == (128, 800)


def _record(engine: str, wall: float, outputs, computed=None, **extra) -> dict:
    w = {"name": "w", "prompts": [[1, 2, 3, 4], [1, 2, 3, 5]], "max_tokens": [2, 2]}
    return common.make_result(engine, {}, w, wall, outputs, computed_prompt_tokens=computed, extra=extra)


def test_make_result_throughput():
    r = _record("x", 2.0, [[7, 8], [9, 9]], computed=5)
    assert (r["prompt_tokens"], r["output_tokens"], r["total_tok_s"], r["output_tok_s"]) == (8, 4, 6.0, 2.0)
    assert r["computed_prompt_tokens"] == 5 and r["num_requests"] == 2


def test_forward_flops_counts_layers_and_head():
    r = _record("x", 1.0, [[7, 8], [9, 9]], computed=5)
    # layers: 5 prompt tokens + (4 outputs - 2 first tokens) decode steps; head: 4 sampled tokens
    assert summary.forward_flops(r, 10, 3) == 2 * 10 * 7 + 2 * 3 * 4
    padded = _record("hf", 1.0, [[7, 8], [9, 9]], computed=8, decode_tokens_computed=6)
    assert summary.forward_flops(padded, 10, 3) == 2 * 10 * (8 + 4) + 2 * 3 * 6


def test_agreement():
    assert summary.agreement([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == (0.5, 0.75)
    assert summary.agreement([[1]], [[1], [2]]) == (0.0, 0.0)


def test_build_rows_ratio_peak_and_reference():
    results = {
        ("w", "batchllm"): _record("batchllm", 1.0, [[7, 8], [9, 9]], computed=5),
        ("w", "vllm"): _record("vllm", 3.0, [[7, 8], [9, 1]], computed=8),
        ("w", "hf"): _record("hf", 4.0, [[7, 8], [9, 9]], computed=8),
        ("w", "batchllm-fcfs"): {"error": "exit 1"},
    }
    rows = summary.build_rows(results, ["w"], ["batchllm", "batchllm-fcfs", "vllm", "hf"], "hf", 1000.0, 10, 3)
    by = {r.engine: r for r in rows}
    assert by["batchllm"].ours_ratio is None
    assert by["vllm"].ours_ratio == pytest.approx(3.0)
    assert by["hf"].ours_ratio == pytest.approx(4.0)
    assert by["batchllm"].same_as_ref == 1.0 and by["vllm"].same_as_ref == 0.5 and by["hf"].same_as_ref is None
    assert by["batchllm"].peak_fraction == pytest.approx((2 * 10 * 7 + 2 * 3 * 4) / 1.0 / 1000.0)
    assert by["batchllm-fcfs"].error == "exit 1"
    table = summary.to_markdown(rows, "hf")
    assert "| w | vllm | 3.00 | 8 | 8 (0%) | 4 | 4 | 1 | 3.00 |" in table
    assert "| w | batchllm | 1.00 | 8 | 5 (38%) |" in table
    assert "FAILED: exit 1" in table and "(ref)" in table


def test_warmup_prompts_unrelated_and_fixed():
    w = _make("batchllm")
    warm = common.warmup_prompts(w)
    assert warm == common.warmup_prompts(w)
    assert len(warm) == 4 and all(len(p) == 48 and p[0] == 1 for p in warm)
    starts = {tuple(p[:8]) for p in w["prompts"]}
    assert all(tuple(p[:8]) not in starts for p in warm)


def test_kv_bytes_of_default():
    assert common.kv_bytes_of({"kv_cache_memory_bytes": None}, 7) == 7
    assert common.kv_bytes_of({"kv_cache_memory_bytes": 5}, 7) == 5


def test_no_sharing_shares_only_bos():
    w = _make("no-sharing")
    assert all(len(p) == 256 for p in w["prompts"])
    assert w["kv_tokens_perfect_sharing"] == 1 + 32 * 255 + 32 * 16
    assert w["kv_tokens_no_sharing"] == 32 * (256 + 16)
    assert "32 prompts of 256 tokens" in w["description"]


def test_default_kv_bytes_covers_the_batch_and_is_clamped():
    from benchmarks.run import default_kv_bytes

    mib = 1 << 20
    loads = [{"kv_tokens_no_sharing": 100_000, "kv_cache_memory_bytes": None},
             {"kv_tokens_no_sharing": 10**9, "kv_cache_memory_bytes": 5}]  # fixed budgets are not considered
    assert default_kv_bytes(loads, 8192) == -(-int(100_000 * 8192 * 1.1) // mib) * mib == 860 * mib
    assert default_kv_bytes([{"kv_tokens_no_sharing": 10, "kv_cache_memory_bytes": None}], 8192) == 256 * mib
    assert default_kv_bytes([{"kv_tokens_no_sharing": 10**7, "kv_cache_memory_bytes": None}], 8192) == 4096 * mib


def test_run_args_engine_defaults_and_validation():
    from benchmarks.run import ENGINES, QUICK_ENGINES, parse_args

    assert parse_args(["--quick"]).engines == list(QUICK_ENGINES)
    assert parse_args([]).engines == list(ENGINES)
    assert parse_args(["--workloads", "tight-kv,batchllm"]).workloads == ["tight-kv", "batchllm"]
    with pytest.raises(SystemExit):
        parse_args(["--engines", "sglang"])
    with pytest.raises(SystemExit):
        parse_args(["--workloads", "nope"])
    assert parse_args([]).rounds == 1 and parse_args(["--rounds", "3"]).rounds == 3
    with pytest.raises(SystemExit):
        parse_args(["--rounds", "0"])


def test_round_ratios_median_and_range():
    rounds = [
        {("w", "batchllm"): _record("batchllm", 1.0, [[1]]), ("w", "vllm"): _record("vllm", 2.0, [[1]])},
        {("w", "batchllm"): _record("batchllm", 1.0, [[1]]), ("w", "vllm"): {"error": "exit 1"}},
        {("w", "batchllm"): _record("batchllm", 2.0, [[1]]), ("w", "vllm"): _record("vllm", 3.0, [[1]])},
        {("w", "batchllm"): _record("batchllm", 1.0, [[1]]), ("w", "vllm"): _record("vllm", 1.5, [[1]])},
    ]
    ratios = summary.round_ratios(rounds, ["w"], ["batchllm", "vllm", "hf"])
    assert [(w, e) for w, e, _ in ratios] == [("w", "vllm")]  # hf never ran: no line
    assert ratios[0][2] == pytest.approx([2.0, None, 1.5, 1.5])
    table = summary.rounds_markdown(ratios)
    assert "| w | vllm | 2.00 | - | 1.50 | 1.50 | 1.50 | 1.50 - 2.00 |" in table
    assert table.splitlines()[0].count("round") == 4


def test_pairwise_agreement_lists_successful_pairs():
    results = {
        ("w", "a"): _record("a", 1.0, [[7, 8], [9, 9]]),
        ("w", "b"): _record("b", 1.0, [[7, 8], [9, 1]]),
        ("w", "c"): {"error": "boom"},
    }
    assert summary.pairwise_agreement(results, ["w"], ["a", "b", "c"]) == "- w: a~b 50% (75%)\n"

"""The tiny checkpoint builder, its tokenizer and the HF reference helpers."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch
from hf_reference import check_greedy_close, hf_greedy, hf_last_logits, hf_logprobs
from safetensors.torch import load_file
from transformers import AutoTokenizer

from batchllm.tiny import BENCH_SHAPE, CHAT_TEMPLATE, build_tiny_checkpoint, default_model_dir, train_tokenizer

MULTIBYTE = "Café crème brûlée, Łódź — 日本語のテキスト, 你好世界, 안녕하세요, emoji 😀🚀👨‍👩‍👧 ∑√π."


def _digest(folder, name: str) -> str:
    return hashlib.sha256((folder / name).read_bytes()).hexdigest()


def _config(folder) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_tokenizer_files_are_deterministic(tmp_path, tokenizer_dir):
    again = train_tokenizer(tmp_path / "again")
    names = sorted(p.name for p in tokenizer_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert _digest(tokenizer_dir, name) == _digest(again, name), name


def test_tokenizer_special_ids_bos_and_multibyte_round_trip(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tok) == 512
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [4, 5]
    ids = tok.encode(MULTIBYTE)
    assert ids[0] == 1 and ids.count(1) == 1
    assert tok.encode(MULTIBYTE, add_special_tokens=False) == ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == MULTIBYTE
    # Some ids are pieces of one character: decoding them alone cannot give text back (incremental detok must wait).
    assert any("\ufffd" in tok.decode([i]) for i in ids[1:])
    # Frequent English words are merged into few tokens (the BPE actually learned something).
    assert [len(tok.encode(w, add_special_tokens=False)) for w in (" the", " and", " of")] == [1, 1, 1]
    english = "The quick brown fox jumps over the lazy dog."
    assert len(tok.encode(english, add_special_tokens=False)) < 0.6 * len(english)


def test_chat_template_renders(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                    "<|im_start|>assistant\n")
    no_prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert no_prompt == text[: -len("<|im_start|>assistant\n")]
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [1, 4] and ids.count(1) == 1 and ids[-4:-2] != [5, 5]


def test_builder_is_deterministic_and_layer_count_independent(tmp_path, tokenizer_dir, tiny_llama):
    again = build_tiny_checkpoint(tmp_path / "a", "llama", tokenizer_dir=tokenizer_dir)
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert _digest(tiny_llama, name) == _digest(again, name), name
    # Training the tokenizer inside the builder gives the same files as copying the fixture's.
    fresh = build_tiny_checkpoint(tmp_path / "b", "llama")
    assert _digest(fresh, "model.safetensors") == _digest(tiny_llama, "model.safetensors")
    assert _digest(fresh, "tokenizer.json") == _digest(tiny_llama, "tokenizer.json")
    # A deeper model shares the first layers' weights; another seed changes them.
    deeper = load_file(build_tiny_checkpoint(tmp_path / "c", num_layers=3, tokenizer_dir=tokenizer_dir)
                       / "model.safetensors")
    base = load_file(tiny_llama / "model.safetensors")
    assert set(deeper) - set(base) == {k for k in deeper if k.startswith("model.layers.2.")}
    for k, v in base.items():
        assert torch.equal(v, deeper[k]), k
    other = load_file(build_tiny_checkpoint(tmp_path / "d", seed=1, tokenizer_dir=tokenizer_dir) / "model.safetensors")
    assert not torch.equal(other["model.embed_tokens.weight"], base["model.embed_tokens.weight"])


def test_llama_config_and_weights(tiny_llama):
    cfg = _config(tiny_llama)
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["intermediate_size"], cfg["head_dim"], cfg["vocab_size"]) == (64, 2, 4, 2, 128, 16, 512)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 3)
    assert cfg["tie_word_embeddings"] is False and cfg["torch_dtype" if "torch_dtype" in cfg else "dtype"] == "float32"
    assert cfg["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    w = load_file(tiny_llama / "model.safetensors")
    assert w["model.embed_tokens.weight"].shape == (512, 64) and w["lm_head.weight"].shape == (512, 64)
    assert w["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (32, 64)
    assert w["model.layers.1.mlp.down_proj.weight"].shape == (64, 128)
    assert all(t.dtype == torch.float32 for t in w.values())
    norms = [k for k in w if k.endswith("norm.weight")]
    assert len(norms) == 5 and all(not torch.equal(w[k], torch.ones(64)) for k in norms)
    layer0 = "model.layers.0."
    assert not torch.equal(w[layer0 + "input_layernorm.weight"], w[layer0 + "post_attention_layernorm.weight"])


def test_qwen2_has_bias_and_tied_embeddings(tiny_qwen2):
    cfg = _config(tiny_qwen2)
    assert cfg["architectures"] == ["Qwen2ForCausalLM"] and cfg["tie_word_embeddings"] is True
    w = load_file(tiny_qwen2 / "model.safetensors")
    assert "lm_head.weight" not in w
    assert w["model.layers.0.self_attn.q_proj.bias"].shape == (64,)
    assert w["model.layers.0.self_attn.k_proj.bias"].shape == (32,)
    assert w["model.layers.0.self_attn.v_proj.bias"].abs().sum() > 0
    assert "model.layers.0.self_attn.o_proj.bias" not in w


def test_mistral_mqa_and_llama3_rope_configs(tiny_mistral, tiny_llama_mqa, tiny_llama3_rope):
    assert _config(tiny_mistral)["architectures"] == ["MistralForCausalLM"]
    assert _config(tiny_mistral)["sliding_window"] is None
    assert _config(tiny_llama_mqa)["num_key_value_heads"] == 1
    assert load_file(tiny_llama_mqa / "model.safetensors")["model.layers.0.self_attn.v_proj.weight"].shape == (16, 64)
    assert _config(tiny_llama3_rope)["rope_parameters"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64, "rope_theta": 500000.0,
    }


def test_every_fixture_loads_in_hf(tmp_path, tokenizer_dir, tiny_mistral, tiny_llama_mqa, tiny_llama3_rope):
    prompt = [1, 100, 200, 300, 400, 5, 6]
    for folder in (tiny_mistral, tiny_llama_mqa, tiny_llama3_rope):
        assert len(hf_greedy(folder, [prompt], max_new_tokens=3)[0]) == 3
    # The llama3 rope scaling is live: the same weights without it give other log-probs (position 0 is unrotated).
    plain = build_tiny_checkpoint(tmp_path / "plain", rope_theta=500000.0, seed=4, tokenizer_dir=tokenizer_dir)
    scaled_lp, plain_lp = hf_logprobs(tiny_llama3_rope, prompt), hf_logprobs(plain, prompt)
    assert torch.equal(scaled_lp[0], plain_lp[0]) and not torch.allclose(scaled_lp[1:], plain_lp[1:], atol=1e-4)


def test_builder_rejects_bad_arguments(tmp_path, tokenizer_dir):
    with pytest.raises(ValueError, match="arch"):
        build_tiny_checkpoint(tmp_path / "a", "gpt2", tokenizer_dir=tokenizer_dir)
    with pytest.raises(ValueError, match="sliding_window"):
        build_tiny_checkpoint(tmp_path / "b", "llama", sliding_window=16, tokenizer_dir=tokenizer_dir)
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_checkpoint(tmp_path / "c", "llama", vocab_size=300, tokenizer_dir=tokenizer_dir)


def test_padded_vocab_and_bench_shape_config(tmp_path, tokenizer_dir):
    small = dict(BENCH_SHAPE, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    out = build_tiny_checkpoint(tmp_path / "padded", tokenizer_dir=tokenizer_dir, **small)
    assert _config(out)["vocab_size"] == 32000
    assert load_file(out / "model.safetensors")["lm_head.weight"].shape == (32000, 32)
    assert len(AutoTokenizer.from_pretrained(out)) == 512
    assert (BENCH_SHAPE["hidden_size"], BENCH_SHAPE["num_layers"], BENCH_SHAPE["intermediate_size"]) == (512, 8, 1408)


def test_hf_greedy_lengths_and_eos(tiny_llama, tiny_qwen2):
    prompts = [[1, 40, 70, 75], [1, 100, 200, 300, 400, 5, 6]]
    out = hf_greedy(tiny_llama, prompts, max_new_tokens=7)
    assert [len(o) for o in out] == [7, 7]
    assert out == hf_greedy(str(tiny_llama), prompts, max_new_tokens=7)
    # The first greedy token is the argmax of the last position's logits.
    last = hf_last_logits(tiny_llama, prompts)
    assert [o[0] for o in out] == [int(lg.argmax()) for lg in last]
    # Continuing a prompt with its own greedy tokens gives the rest of the sequence.
    assert hf_greedy(tiny_llama, [prompts[0] + out[0][:3]], max_new_tokens=4)[0] == out[0][3:]
    qwen = hf_greedy(tiny_qwen2, prompts, max_new_tokens=5)
    assert [len(o) for o in qwen] == [5, 5]


def test_hf_greedy_stops_after_eos(tmp_path, tiny_llama):
    prompt = [1, 100, 200, 300, 400, 5, 6]
    tokens = hf_greedy(tiny_llama, [prompt], max_new_tokens=6)[0]
    # Same weights, but the third greedy token declared as eos: generation must stop right after it.
    eos_dir = tmp_path / "eos"
    shutil.copytree(tiny_llama, eos_dir)
    cfg = _config(eos_dir)
    cfg["eos_token_id"] = tokens[2]
    (eos_dir / "config.json").write_text(json.dumps(cfg))
    assert tokens[2] not in tokens[:2]
    assert hf_greedy(eos_dir, [prompt], max_new_tokens=6, ignore_eos=False) == [tokens[:3]]
    assert hf_greedy(eos_dir, [prompt], max_new_tokens=6, ignore_eos=True) == [tokens]
    assert hf_greedy(eos_dir, [prompt], max_new_tokens=2, ignore_eos=False) == [tokens[:2]]


def test_hf_logprobs_shape_and_normalised(tiny_llama):
    lp = hf_logprobs(tiny_llama, [1, 40, 70, 75, 359])
    assert lp.shape == (5, 512) and lp.dtype == torch.float32
    assert torch.allclose(lp.exp().sum(-1), torch.ones(5), atol=1e-5)
    last = hf_last_logits(tiny_llama, [[1, 40, 70, 75, 359]])[0]
    assert torch.equal(lp[-1].argmax(), last.argmax())


def test_default_model_dir_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHLLM_CACHE", str(tmp_path / "cache"))
    first = default_model_dir()
    assert first.parent == tmp_path / "cache" and (first / "model.safetensors").is_file()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no leftover temp folder
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    cfg = _config(first)
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (
        256, 4, 8, 4)


def test_check_greedy_close_accepts_only_near_ties(tiny_llama):
    prompts = [[1, 100, 200, 300, 400, 5, 6], [1, 52, 83, 323]]
    ref = hf_greedy(tiny_llama, prompts, max_new_tokens=5)
    assert check_greedy_close(tiny_llama, prompts, ref, max_new_tokens=5) == 2
    logits = hf_last_logits(tiny_llama, [prompts[0] + ref[0][:2]])[0]  # [V]
    runner_up = int(torch.topk(logits, 2).indices[1])
    gap = float(logits[ref[0][2]] - logits[runner_up])
    diverged = [ref[0][:2] + [runner_up, 7, 7], ref[1]]
    with pytest.raises(AssertionError, match="logit gap"):
        check_greedy_close(tiny_llama, prompts, diverged, max_new_tokens=5, tol=gap / 2)
    assert check_greedy_close(tiny_llama, prompts, diverged, max_new_tokens=5, tol=gap * 2) == 1
    with pytest.raises(AssertionError, match="lengths differ"):
        check_greedy_close(tiny_llama, prompts, [ref[0][:4], ref[1]], max_new_tokens=5)

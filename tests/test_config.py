"""ModelConfig.from_hf and engine construction: architectures, rope, dtype and KV budget."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from batchllm import LLM
from batchllm.config import EngineConfig
from batchllm.kv.cache import KVCache
from batchllm.machine import resolve_dtype
from batchllm.model_config import ModelConfig


def test_configs_of_the_three_architectures(tiny_llama, tiny_qwen2, tiny_mistral, tiny_llama_mqa, tiny_llama3_rope):
    llama = ModelConfig.from_hf(tiny_llama)
    assert (llama.architecture, llama.num_heads, llama.num_kv_heads, llama.head_dim) == ("LlamaForCausalLM", 4, 2, 16)
    assert not llama.qkv_bias and not llama.tie_word_embeddings and llama.sliding_window is None
    qwen = ModelConfig.from_hf(tiny_qwen2)
    assert qwen.architecture == "Qwen2ForCausalLM" and qwen.qkv_bias and qwen.tie_word_embeddings
    assert ModelConfig.from_hf(tiny_mistral).architecture == "MistralForCausalLM"
    assert ModelConfig.from_hf(tiny_llama_mqa).num_kv_heads == 1
    rope = ModelConfig.from_hf(tiny_llama3_rope).rope
    assert (rope.rope_type, rope.factor, rope.theta, rope.original_max_position_embeddings) == ("llama3", 8.0,
                                                                                               500000.0, 64)
    with pytest.raises(dataclasses_frozen_error()):
        llama.hidden_size = 1


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_unknown_architecture_is_named(tiny_llama, tmp_path):
    d = tmp_path / "gpt"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf(d)
    with pytest.raises(ValueError, match="GPT2LMHeadModel"):
        LLM(str(d))


def test_missing_weights_are_reported(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "broken"
    shutil.copytree(tiny_llama, d)
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, d / "model.safetensors")
    with pytest.raises(KeyError, match="down_proj"):
        LLM(str(d), dtype="float32", kv_cache_memory_bytes=1 << 20)


@pytest.mark.parametrize("keep", [0.5, 0.001])  # cut in the tensor data, cut in the header
def test_a_truncated_checkpoint_is_named(tiny_llama, tmp_path, keep):
    d = tmp_path / "cut"
    shutil.copytree(tiny_llama, d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:max(9, int(len(data) * keep))])
    with pytest.raises(ValueError, match=f"cannot read {d / 'model.safetensors'}: .* truncated or corrupt"):
        LLM(str(d), dtype="float32", kv_cache_memory_bytes=1 << 20)


def test_kv_budget_is_honoured_exactly(tiny_llama):
    cfg = ModelConfig.from_hf(tiny_llama)
    per_block = KVCache.bytes_per_block(cfg, 4, torch.float32)
    assert per_block == 4 * 2 * 2 * 2 * 16 * 4  # tokens x (K,V) x layers x kv heads x head_dim x bytes
    llm = LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=10 * per_block + per_block - 1, block_size=4)
    assert llm.config.kv_cache_blocks == 10
    assert sum(t.numel() * t.element_size() for t in llm.kv.layers) == 10 * per_block
    with pytest.raises(ValueError, match="no KV block"):
        LLM(str(tiny_llama), dtype="float32", kv_cache_memory_bytes=per_block - 1, block_size=4)


def test_kv_cache_commit_auto_commits_an_explicit_budget_only(tiny_llama, monkeypatch):
    path = str(tiny_llama)
    assert LLM(path, dtype="float32", kv_cache_memory_bytes=1 << 20).kv.committed
    assert not LLM(path, dtype="float32", kv_cache_memory_bytes=1 << 20, kv_cache_commit="lazy").kv.committed
    monkeypatch.setattr("batchllm.machine.default_kv_budget", lambda device: 1 << 20)
    assert not LLM(path, dtype="float32").kv.committed  # the default budget is a guess: committed as blocks fill
    assert LLM(path, dtype="float32", kv_cache_commit="upfront").kv.committed
    with pytest.raises(ValueError, match="kv_cache_commit"):
        LLM(path, dtype="float32", kv_cache_commit="eager")


def test_a_committed_budget_beyond_available_memory_fails_at_start(tiny_llama, monkeypatch):
    path = str(tiny_llama)
    monkeypatch.setattr("batchllm.machine.available_memory", lambda: 4 << 20)
    with pytest.raises(ValueError, match="more than the 4194304 bytes of memory available"):
        LLM(path, dtype="float32", kv_cache_memory_bytes=8 << 20)
    assert LLM(path, dtype="float32", kv_cache_memory_bytes=2 << 20).kv.committed  # within it: committed
    assert not LLM(path, dtype="float32", kv_cache_memory_bytes=8 << 20, kv_cache_commit="lazy").kv.committed


def test_dtype_resolution():
    cpu = torch.device("cpu")
    assert resolve_dtype("float32", cpu) is torch.float32
    assert resolve_dtype("bfloat16", cpu) is torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) is torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int8", cpu)


def test_engine_config_validates():
    with pytest.raises(ValueError, match="policy"):
        EngineConfig(policy="lifo")
    with pytest.raises(ValueError, match="block_size"):
        EngineConfig(block_size=0)


@pytest.mark.parametrize("commit", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpu_kv_cache_is_zeroed_writable_and_of_its_dtype(tiny_llama, dtype, commit):
    cfg = ModelConfig.from_hf(tiny_llama)
    kv = KVCache(cfg, 5, 4, dtype, torch.device("cpu"), commit=commit)
    assert kv.committed is commit
    assert len(kv.layers) == cfg.num_layers
    for t in kv.layers:
        assert t.dtype is dtype and t.is_contiguous()
        assert t.shape == (2, 5, 4, cfg.num_kv_heads, cfg.head_dim)
        assert torch.count_nonzero(t) == 0
    kv.layers[0][1, 2, 3] = 1.5
    assert kv.layers[0][1, 2, 3].float().eq(1.5).all() and torch.count_nonzero(kv.layers[1]) == 0


_RSS_PROBE = """
import os, sys, torch
from batchllm.model_config import ModelConfig
from batchllm.kv.cache import KVCache

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

cfg = ModelConfig.from_hf(sys.argv[1])
blocks = int(sys.argv[2])
cpu = torch.device("cpu")
KVCache(cfg, 4, 16, torch.bfloat16, cpu, commit=False)  # one-time start-up allocations happen before measuring
KVCache(cfg, 4, 16, torch.bfloat16, cpu, commit=True)
before = rss()
lazy = KVCache(cfg, blocks, 16, torch.bfloat16, cpu, commit=False)
after_lazy = rss()
committed = KVCache(cfg, blocks, 16, torch.bfloat16, cpu, commit=True)
after_commit = rss()
lazy.layers[0].fill_(1.0)
after_write = rss()
assert all(torch.count_nonzero(t) == 0 for t in committed.layers)
print(after_lazy - before, after_commit - after_lazy, after_write - after_commit)
"""


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads the resident set from /proc")
def test_cpu_kv_cache_commit_writes_its_pages_now_and_lazy_does_not(tiny_llama):
    """In a fresh process (freed memory of other tests would already be resident), after one small cache of each
    kind: the lazy cache adds nothing to the resident set until written, the committed one all of its bytes."""
    cfg = ModelConfig.from_hf(tiny_llama)
    per_block = cfg.num_layers * 2 * 16 * cfg.num_kv_heads * cfg.head_dim * 2  # bf16 bytes, K and V, 16 tokens
    blocks = (64 << 20) // per_block  # 64 MiB: large enough to read from the resident set
    total, layer = blocks * per_block, blocks * per_block // cfg.num_layers
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tiny_llama), str(blocks)], env=env, check=True,
                         capture_output=True, text=True).stdout
    lazy, committed, first_write = map(int, out.split())
    assert lazy < total // 8
    assert committed >= total * 9 // 10
    assert first_write >= layer * 9 // 10  # the lazy cache's pages arrive on first write


def test_a_half_dtype_without_a_fast_path_runs_float32_and_says_so(tiny_llama, monkeypatch, capsys):
    """On the portable kernel path bf16 would run torch's reference kernels (orders of magnitude slower on CPUs
    without native bf16): the engine runs fp32 and says why, once; fp16 has no CPU fast path anywhere."""
    from batchllm.model import cpu_kernels

    cpu_kernels._say_once.cache_clear()
    monkeypatch.setenv("BATCHLLM_ISA", "portable")
    assert LLM(str(tiny_llama), dtype="bfloat16", kv_cache_memory_bytes=1 << 20).dtype == torch.float32
    assert LLM(str(tiny_llama), dtype="bfloat16", kv_cache_memory_bytes=1 << 20).dtype == torch.float32
    assert LLM(str(tiny_llama), kv_cache_memory_bytes=1 << 20).dtype == torch.float32  # auto
    err = capsys.readouterr().err
    assert err.count("bfloat16 has no fast path on this CPU (kernel path portable); running float32") == 1
    monkeypatch.delenv("BATCHLLM_ISA")
    assert LLM(str(tiny_llama), dtype="float16", kv_cache_memory_bytes=1 << 20).dtype == torch.float32
    assert "float16 has no fast path" in capsys.readouterr().err

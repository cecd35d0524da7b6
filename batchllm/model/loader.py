"""Load HF safetensors checkpoints (one file or many shards) into `LlamaModel`, fusing q/k/v and gate/up, then let
the model pack its projections for the matmul library (`LlamaModel.pack_weights`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from batchllm.model.llama import LlamaModel

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def load_weights(model: LlamaModel, model_dir: str | Path) -> None:
    """Copy the checkpoint's tensors into `model` (cast to its dtype) and pack them; raise KeyError listing missing
    weights."""
    cfg = model.cfg
    t = _read_tensors(Path(model_dir))
    used: set[str] = set()
    missing: list[str] = []

    def take(name: str) -> torch.Tensor | None:
        if name not in t:
            missing.append(name)
            return None
        used.add(name)
        return t[name]

    def fill(param: torch.nn.Parameter | None, *names: str) -> None:
        parts = [take(n) for n in names]
        if param is None or any(p is None for p in parts):
            return
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if value.shape != param.shape:
            raise ValueError(f"shape mismatch for {names}: checkpoint {tuple(value.shape)}, model {tuple(param.shape)}")
        param.data.copy_(value.to(param.dtype))

    fill(model.embed, "model.embed_tokens.weight")
    fill(model.norm, "model.norm.weight")
    if not cfg.tie_word_embeddings:
        fill(model.lm_head.weight, "lm_head.weight")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        a, m = p + "self_attn.", p + "mlp."
        fill(layer.input_norm, p + "input_layernorm.weight")
        fill(layer.post_attn_norm, p + "post_attention_layernorm.weight")
        fill(layer.qkv.weight, a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")
        fill(layer.o_proj.weight, a + "o_proj.weight")
        fill(layer.gate_up.weight, m + "gate_proj.weight", m + "up_proj.weight")
        fill(layer.down.weight, m + "down_proj.weight")
        if cfg.qkv_bias:
            fill(layer.qkv.bias, a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
        if cfg.o_bias:
            fill(layer.o_proj.bias, a + "o_proj.bias")
        if cfg.mlp_bias:
            fill(layer.gate_up.bias, m + "gate_proj.bias", m + "up_proj.bias")
            fill(layer.down.bias, m + "down_proj.bias")
    if missing:
        raise KeyError(f"checkpoint {model_dir} lacks {len(missing)} weights, e.g. {missing[:5]}")
    unexpected = [n for n in t if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected and not (cfg.tie_word_embeddings and unexpected == ["lm_head.weight"]):
        raise KeyError(f"checkpoint {model_dir} has {len(unexpected)} unexpected weights, e.g. {unexpected[:5]}")
    model.pack_weights()

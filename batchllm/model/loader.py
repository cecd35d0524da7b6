"""Load HF safetensors checkpoints (one file or many shards) into `DecoderModel`, fusing q/k/v and gate/up where the
checkpoint keeps them apart, then let the model pack its projections for the matmul library
(`DecoderModel.pack_weights`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from batchllm.model.decoder import DecoderModel

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise ValueError(f"cannot read {path}: {e} (a truncated or corrupt file?)") from e
    return tensors


def load_weights(model: DecoderModel, model_dir: str | Path) -> None:
    """Copy the checkpoint's tensors into `model` (cast to its dtype; norms as offset + weight where the model's norms
    scale by that) and pack them; raise KeyError listing missing or unexpected weights."""
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

    def fill(param: torch.nn.Parameter | None, *names: str, norm: bool = False) -> None:
        parts = [take(n) for n in names]
        if param is None or any(p is None for p in parts):
            return
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if value.shape != param.shape:
            raise ValueError(f"shape mismatch for {names}: checkpoint {tuple(value.shape)}, model {tuple(param.shape)}")
        if norm and cfg.norm_offset:  # HF Gemma: x_normed * (1.0 + w.float()), the sum in fp32
            value = cfg.norm_offset + value.float()
        param.data.copy_(value.to(param.dtype))

    fill(model.embed, "model.embed_tokens.weight")
    fill(model.norm, "model.norm.weight", norm=True)
    if not cfg.tie_word_embeddings:
        fill(model.lm_head.weight, "lm_head.weight")
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        a, m, attn = p + "self_attn.", p + "mlp.", layer.attn
        fill(layer.input_norm, p + "input_layernorm.weight", norm=True)
        fill(layer.post_attn_norm, p + "post_attention_layernorm.weight", norm=True)
        if layer.pre_ff_norm is not None:
            fill(layer.pre_ff_norm, p + "pre_feedforward_layernorm.weight", norm=True)
            fill(layer.post_ff_norm, p + "post_feedforward_layernorm.weight", norm=True)
        if attn.q_norm is not None:
            fill(attn.q_norm, a + "q_norm.weight", norm=True)
            fill(attn.k_norm, a + "k_norm.weight", norm=True)
        if cfg.fused_checkpoint:
            fill(attn.qkv.weight, a + "qkv_proj.weight")
            fill(layer.gate_up.weight, m + "gate_up_proj.weight")
        else:
            fill(attn.qkv.weight, a + "q_proj.weight", a + "k_proj.weight", a + "v_proj.weight")
            fill(layer.gate_up.weight, m + "gate_proj.weight", m + "up_proj.weight")
        fill(attn.o_proj.weight, a + "o_proj.weight")
        fill(layer.down.weight, m + "down_proj.weight")
        if cfg.qkv_bias:
            fill(attn.qkv.bias, a + "q_proj.bias", a + "k_proj.bias", a + "v_proj.bias")
        if cfg.o_bias:
            fill(attn.o_proj.bias, a + "o_proj.bias")
        if cfg.mlp_bias:
            fill(layer.gate_up.bias, m + "gate_proj.bias", m + "up_proj.bias")
            fill(layer.down.bias, m + "down_proj.bias")
    if missing:
        raise KeyError(f"checkpoint {model_dir} lacks {len(missing)} weights, e.g. {missing[:5]}")
    unexpected = [n for n in t if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected and not (cfg.tie_word_embeddings and unexpected == ["lm_head.weight"]):
        raise KeyError(f"checkpoint {model_dir} has {len(unexpected)} unexpected weights, e.g. {unexpected[:5]}")
    model.pack_weights()

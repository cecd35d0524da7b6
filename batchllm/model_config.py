"""What the model code knows of a checkpoint (`ModelConfig`, `RopeConfig`: frozen), and how the `config.json` of each
supported decoder architecture maps onto it.

One reader per family, each stating only where it differs from Llama. Facts follow HF transformers' `modeling_*.py`
for each architecture (the numerics reference). No torch.

    Llama, Mistral      RMSNorm, rotate_half RoPE, SiLU-gated MLP; Mistral windows every layer
    Qwen2               q/k/v biases; windowed layers from `layer_types` (or max_window_layers)
    Qwen3               no biases; RMSNorm of every query and key head before the rotation
    Gemma 3 (text)      (1 + w) norms, norms after attention and MLP too, q/k norms, GELU-tanh MLP, embeddings times
                        sqrt(hidden), windowed layers with their own rope base interleaved with global ones,
                        query_pre_attn_scalar, final logit soft-capping
    Phi-3               qkv_proj and gate_up_proj fused in the checkpoint, longrope scaling
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters; `rope_type` is "default", "linear", "llama3" or "longrope"."""

    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    short_factor: tuple[float, ...] = ()  # longrope: per-frequency divisors within the original context
    long_factor: tuple[float, ...] = ()  # longrope: ... beyond it
    attention_factor: float = 1.0  # cos and sin are multiplied by it (longrope)


@dataclass(frozen=True)
class ModelConfig:
    """What the model code needs to know about a checkpoint of a supported decoder architecture.

    Per layer `i`: attention sees the last `layer_windows[i]` keys (None: all), rotated by `local_rope` on windowed
    layers where the model gives those their own (Gemma 3), else by `rope`.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None  # the window of the windowed layers (None: no layer is windowed)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    layer_windows: tuple[int | None, ...] = ()
    local_rope: RopeConfig | None = None
    qk_norm: bool = False  # RMSNorm of each query and key head before the rotation (Qwen3, Gemma 3)
    sandwich_norms: bool = False  # RMSNorm of the attention and MLP outputs too (Gemma 3)
    norm_offset: float = 0.0  # norms scale by (offset + weight) (Gemma: 1)
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" or "gelu_tanh"
    embed_scale: float | None = None  # embeddings multiplied by it (Gemma: sqrt(hidden_size))
    attn_scale: float | None = None  # query scaling (None: head_dim ** -0.5)
    final_logit_softcap: float | None = None  # logits = cap * tanh(logits / cap)
    fused_checkpoint: bool = False  # the checkpoint holds qkv_proj and gate_up_proj already fused (Phi-3)

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> ModelConfig:
        """Read `model_dir/config.json`; raise ValueError naming an unsupported architecture or rope type."""
        return read_hf_config(Path(model_dir))

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim ** -0.5

    def window(self, layer: int) -> int | None:
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    def rope_of(self, layer: int) -> RopeConfig:
        return self.local_rope if self.local_rope is not None and self.window(layer) else self.rope

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K and V for one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_bytes



_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def read_hf_config(model_dir: Path) -> ModelConfig:
    """`model_dir/config.json` as a ModelConfig; ValueError naming what is not supported (architecture, rope type,
    activation, ...), FileNotFoundError naming the file when it is missing."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: a model folder needs an HF config.json")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else None
    reader = READERS.get(arch)
    if reader is None:
        raise ValueError(f"unsupported architecture {arch!r} in {path}; batchllm supports "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    try:
        return reader(cfg, arch)
    except KeyError as e:
        raise ValueError(f"{path} lacks the field {e.args[0]!r}, which {arch} needs") from None


def _base(cfg: dict, arch: str, **overrides) -> ModelConfig:
    """The Llama reading of `cfg`; `overrides` replace fields."""
    num_heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    act = cfg.get("hidden_act") or cfg.get("hidden_activation") or "silu"
    if act not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {act!r} for {arch}; supported: {', '.join(_ACTIVATIONS)}")
    fields = dict(
        architecture=arch,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope=_rope(cfg, cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}, cfg.get("rope_theta")),
        max_model_len=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=bool(cfg.get("attention_bias", False)),
        o_bias=bool(cfg.get("attention_bias", False)),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        sliding_window=None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        hidden_act=_ACTIVATIONS[act],
    )
    fields.update(overrides)
    windows = fields.pop("layer_windows", None)
    if windows is None:
        windows = (fields["sliding_window"],) * fields["num_layers"]
    if not any(windows):
        fields["sliding_window"] = None
    return ModelConfig(layer_windows=tuple(windows), **fields)


def _windows_from_layer_types(cfg: dict, default_sliding) -> tuple[int | None, ...] | None:
    """Per-layer windows from `layer_types` ("sliding_attention" layers get `sliding_window`), or from
    `default_sliding(i)` where the config has no layer types; None when the config has no window."""
    window = cfg.get("sliding_window")
    if not window:
        return None
    types = cfg.get("layer_types")
    n = cfg["num_hidden_layers"]
    if types is None:
        types = ["sliding_attention" if default_sliding(i) else "full_attention" for i in range(n)]
    unknown = set(types) - {"sliding_attention", "full_attention"}
    if unknown:
        raise ValueError(f"unsupported layer types {sorted(unknown)}; supported: sliding_attention, full_attention")
    return tuple(int(window) if t == "sliding_attention" else None for t in types)


def _llama(cfg: dict, arch: str) -> ModelConfig:
    return _base(cfg, arch)


def _mistral(cfg: dict, arch: str) -> ModelConfig:
    return _base(cfg, arch, sliding_window=cfg.get("sliding_window"))


def _qwen2(cfg: dict, arch: str) -> ModelConfig:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    first = cfg.get("max_window_layers", 0)
    windows = _windows_from_layer_types({**cfg, "sliding_window": window}, lambda i: i >= first)
    return _base(cfg, arch, qkv_bias=True, o_bias=False, sliding_window=window,
                 tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)), layer_windows=windows)


def _qwen3(cfg: dict, arch: str) -> ModelConfig:
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", False) else None
    first = cfg.get("max_window_layers", 0)
    windows = _windows_from_layer_types({**cfg, "sliding_window": window}, lambda i: i >= first)
    return _base(cfg, arch, qk_norm=True, sliding_window=window, layer_windows=windows)


def _gemma3(cfg: dict, arch: str) -> ModelConfig:
    if cfg.get("use_bidirectional_attention"):
        raise ValueError("Gemma 3 with use_bidirectional_attention is not supported (not a causal decoder)")
    if cfg.get("attn_logit_softcapping"):
        raise ValueError("attention logit soft-capping (attn_logit_softcapping) is not supported")
    pattern = cfg.get("sliding_window_pattern", 6)
    windows = _windows_from_layer_types(cfg, lambda i: (i + 1) % pattern != 0)
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers 5: one rope per layer type
        rope = _rope(cfg, params["full_attention"], 1_000_000.0)
        local = _rope(cfg, params.get("sliding_attention") or {}, 10_000.0)
    else:
        rope = _rope(cfg, cfg.get("rope_scaling") or {}, cfg.get("rope_theta", 1_000_000.0))
        local = RopeConfig(theta=float(cfg.get("rope_local_base_freq", 10_000.0)))
    hidden = cfg["hidden_size"]
    return _base(
        cfg, arch, rope=rope, local_rope=local, sliding_window=cfg.get("sliding_window"), layer_windows=windows,
        qk_norm=True, sandwich_norms=True, norm_offset=1.0, embed_scale=hidden ** 0.5,
        attn_scale=float(cfg.get("query_pre_attn_scalar", 256)) ** -0.5,
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id", 2),
    )


def _phi3(cfg: dict, arch: str) -> ModelConfig:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0
    if partial != 1.0:
        raise ValueError(f"partial rotary embeddings (partial_rotary_factor={partial}) are not supported")
    return _base(cfg, arch, sliding_window=cfg.get("sliding_window"), fused_checkpoint=True)


def _rope(cfg: dict, scaling: dict, theta) -> RopeConfig:
    """A RopeConfig from a rope dict (transformers 5 `rope_parameters` or older `rope_scaling`)."""
    theta = float(scaling.get("rope_theta", theta if theta is not None else 10000.0))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type in ("su", "yarn") and "short_factor" in scaling:  # Phi-3's older names for longrope
        rope_type = "longrope"
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(scaling["factor"]))
    if rope_type == "llama3":
        return RopeConfig(
            theta=theta,
            rope_type="llama3",
            factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
        )
    if rope_type == "longrope":
        original = int(scaling.get("original_max_position_embeddings")
                       or cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"])
        factor = scaling.get("factor")
        if factor is None:
            factor = cfg["max_position_embeddings"] / original
        attention = scaling.get("attention_factor")
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return RopeConfig(theta=theta, rope_type="longrope", factor=float(factor),
                          original_max_position_embeddings=original,
                          short_factor=tuple(float(x) for x in scaling["short_factor"]),
                          long_factor=tuple(float(x) for x in scaling["long_factor"]),
                          attention_factor=float(attention))
    raise ValueError(f"unsupported rope type {rope_type!r}; supported: default, linear, llama3, longrope")


READERS = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _mistral,
    "Qwen2ForCausalLM": _qwen2,
    "Qwen3ForCausalLM": _qwen3,
    "Gemma3ForCausalLM": _gemma3,
    "Phi3ForCausalLM": _phi3,
}
SUPPORTED_ARCHITECTURES = tuple(READERS)

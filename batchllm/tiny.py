"""Tiny, locally built checkpoints: a byte-level BPE tokenizer and random-weight Llama/Qwen2/Mistral models.

Nothing here downloads anything. The tokenizer is trained on an embedded corpus, the weights are drawn from seeded
generators (one per tensor, keyed by the tensor's name, so the same arguments always give byte-identical files and a
layer's weights do not depend on how many layers the model has). The checkpoints are standard Hugging Face folders
(`config.json`, `model.safetensors`, tokenizer files) that HF transformers and our engine both load.

Used by the `demo` command (`default_model_dir`), by the benchmarks (the "bench" shape) and by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import Any

from batchllm.machine import cache_root

__all__ = [
    "BENCH_SHAPE",
    "CHAT_TEMPLATE",
    "DEFAULT_MODEL_SHAPE",
    "SPECIAL_TOKENS",
    "TOKENIZER_MAX_VOCAB",
    "build_tiny_checkpoint",
    "cache_root",
    "default_init_std",
    "default_model_dir",
    "train_tokenizer",
]

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <|im_start|>=4, <|im_end|>=5.
SPECIAL_TOKENS = (UNK, BOS, EOS, PAD, IM_START, IM_END)

# The embedded corpus cannot support much more than this many merges; larger model vocabularies are padded
# (ids past the tokenizer's size exist in the model but are never produced by the tokenizer).
TOKENIZER_MAX_VOCAB = 512

# ChatML-like template. It starts with the bos token the way Llama's templates do, so a rendered conversation must be
# encoded with add_special_tokens=False (otherwise bos appears twice).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Shapes used elsewhere: the demo's default model and the ~56M parameter benchmark model.
# Read-only; use as `build_tiny_checkpoint(out, **BENCH_SHAPE)`.
DEFAULT_MODEL_SHAPE: MappingProxyType[str, Any] = MappingProxyType(dict(
    arch="llama", hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=688,
    max_position_embeddings=4096, vocab_size=512, seed=0,
))
BENCH_SHAPE: MappingProxyType[str, Any] = MappingProxyType(dict(  # ~56.4M parameters
    arch="llama", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408,
    max_position_embeddings=4096, vocab_size=32000, seed=0,
))
# Bump when the builder's output changes, so cached default models are rebuilt.
_BUILD_VERSION = 1

_CORPUS_EN = """\
The quick brown fox jumps over the lazy dog. A small language model reads text one token at a time and guesses
what comes next. When many requests share the same long instructions, a careful engine computes that shared prefix
only once and reuses its keys and values for every request in the group.
Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker named Tobias. Every
morning he opened the shutters of his workshop, brewed a pot of strong black tea, and listened to the ticking of a
hundred clocks. Children from the village came by after school to watch him work. "Why do you fix clocks that
nobody wants?" asked a girl with red boots. Tobias smiled. "Because every clock remembers the hands that wound it."
Summary of the quarterly report: revenue grew by 12 percent to 4.8 million dollars, while operating costs fell by
3 percent. The board approved a dividend of 0.35 per share, payable on March 14. Risks include supply delays,
currency swings, and the rising price of memory chips.
Recipe for a simple tomato soup: chop two onions and three cloves of garlic. Warm olive oil in a heavy pot, add the
onions, and cook them slowly until soft. Add one kilogram of ripe tomatoes, a pinch of salt, and a cup of water.
Simmer for twenty minutes, blend until smooth, and finish with fresh basil and black pepper.
Q: What is the capital of France? A: Paris. Q: How many legs does a spider have? A: Eight. Q: Which planet is known
as the red planet? A: Mars. Q: What is twelve times seven? A: Eighty-four.
def fibonacci(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a

for i in range(10):
    print(i, fibonacci(i))
{"custom_id": "request-1", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "tiny", "max_tokens": 32}}
Dear customer, thank you for your message. We have received your request and will reply within two business days.
Please keep your order number, 58213, at hand when you contact us again. Kind regards, the support team.
The weather today will be cloudy in the morning with light rain in the afternoon. Temperatures will reach 17 degrees,
and winds from the north-west will be moderate. Tomorrow looks brighter, with sunshine across most of the country.
In mathematics, a prime number is a natural number greater than one that has no divisors other than one and itself.
The first primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29. Euclid proved that there are infinitely many of them.
The history of the printing press begins in the fifteenth century, when movable metal type made books far cheaper.
Ideas travelled faster than ever before; letters, maps, and pamphlets crossed borders and changed how people argued.
You are a helpful assistant. Answer briefly and truthfully. If you do not know the answer, say that you do not know.
Translate the following sentence into French. Classify the sentiment of this review as positive or negative.
Write a short poem about the sea. Explain the difference between a list and a tuple. Summarize the article below.
The train leaves at 9:45 from platform 3 and arrives at 13:20. Tickets cost 27.50 euros; children travel for half.
Roses are red, violets are blue, sugar is sweet, and so are you. The rain in Spain stays mainly in the plain.
"""

_CORPUS_MULTIBYTE = """\
Café, naïve, façade, jalapeño, Ångström, crème brûlée, über, São Paulo, Kraków, Dvořák, Łódź, smörgåsbord.
Voilà! C'est déjà l'été à Genève. Señor Muñoz está en la montaña. Grüße aus München und Köln.
Ελληνικά: καλημέρα κόσμε. Русский: привет, мир, как дела? Українська: добрий день.
日本語: こんにちは世界。東京は今日も晴れです。 中文: 你好，世界。今天天气很好，我们去公园散步吧。
한국어: 안녕하세요 세계. 감사합니다.
Emoji: 😀 😂 🚀 🌍 🍕 ❤️ 👍🏽 👨‍👩‍👧 🎉 ✨ 🐍 — math: ∑ ∫ √ π ≈ 3.14159, ∞ ≠ ≤ ≥ → ← ∀ ∃.
"""

CORPUS = _CORPUS_EN + _CORPUS_MULTIBYTE


def default_init_std(hidden_size: int) -> float:
    """The weight std used when `init_std` is None: 1.5 / sqrt(hidden_size).

    With unit-RMS hidden states this gives logits with a std of about 1.5 whatever the width, so the greedy choice is
    clear (median top-1/top-2 margin well above fp32 noise) while generations still vary with context.
    """
    return 1.5 / hidden_size**0.5


def _training_corpus() -> list[str]:
    """The corpus as training lines, repeated so that frequent pairs dominate the merges (returns a new list)."""
    lines = [line for line in CORPUS.splitlines() if line.strip()]
    return lines * 4


def _build_tokenizer_object(vocab_size: int):
    """Train the byte-level BPE `tokenizers.Tokenizer` (pure function of `vocab_size`)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def train_tokenizer(out_dir: str | Path, vocab_size: int = TOKENIZER_MAX_VOCAB) -> Path:
    """Train the byte-level BPE tokenizer and save it (HF format) into `out_dir`, which is created if needed.

    Writes `tokenizer.json`, `tokenizer_config.json` (special tokens) and `chat_template.jinja` (transformers 5
    layout; AutoTokenizer reads it into `.chat_template`). `vocab_size` is capped at TOKENIZER_MAX_VOCAB.
    Deterministic: the same files every time. Returns `out_dir` as a Path.
    """
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} for a byte-level BPE")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _build_tokenizer_object(min(vocab_size, TOKENIZER_MAX_VOCAB))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=DEFAULT_MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return out


def _special_ids(tokenizer_dir: Path) -> dict[str, int]:
    """Read bos/eos/pad ids and the tokenizer's vocabulary size from a saved `tokenizer.json`."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))
    ids = {t["content"]: t["id"] for t in data["added_tokens"]}
    size = max(max(data["model"]["vocab"].values()), max(ids.values())) + 1
    return {"bos": ids[BOS], "eos": ids[EOS], "pad": ids[PAD], "size": size}


# arch -> (transformers config class, model class), both by name (imported on use)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}


def _make_config(arch: str, *, vocab_size: int, hidden_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
                 intermediate_size: int, head_dim: int | None, max_position_embeddings: int, rope_theta: float,
                 rope_scaling: dict | None, tie_word_embeddings: bool | None, sliding_window: int | None,
                 init_std: float, special: dict[str, int], dtype: str, extra: dict | None = None):
    """Build the transformers config object for `arch` (no side effects). `extra`: more config fields (e.g.
    Gemma 3's layer_types or query_pre_attn_scalar); they override the ones derived here."""
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if num_heads % num_kv_heads or (head_dim is None and hidden_size % num_heads):
        raise ValueError("num_heads must divide by num_kv_heads (and hidden_size by num_heads when head_dim is None)")
    rope_parameters = {"rope_type": "default", "rope_theta": float(rope_theta)}
    if rope_scaling:
        rope_parameters = {**{k: v for k, v in rope_scaling.items() if k != "type"}, "rope_theta": float(rope_theta)}
        rope_parameters.setdefault("rope_type", rope_scaling.get("type", "default"))
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        head_dim=head_dim if head_dim is not None else hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope_parameters,
        initializer_range=init_std,
        rms_norm_eps=1e-6,
        bos_token_id=special["bos"],
        eos_token_id=special["eos"],
        pad_token_id=special["pad"],
        tie_word_embeddings=arch in ("qwen2", "gemma3") if tie_word_embeddings is None else tie_word_embeddings,
        dtype=dtype,
    )
    if arch in ("qwen2", "qwen3"):
        fields.update(use_sliding_window=sliding_window is not None, sliding_window=sliding_window,
                      max_window_layers=num_layers if sliding_window is None else 0)
    elif arch == "gemma3":  # one rope per layer type; sliding layers keep their own base
        fields.update(sliding_window=sliding_window or 4096, rope_parameters={
            "full_attention": rope_parameters, "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    elif arch != "llama":
        fields.update(sliding_window=sliding_window)
    elif sliding_window is not None:
        raise ValueError("sliding_window: Llama has no sliding window")
    fields.update(extra or {})
    return getattr(transformers, ARCHS[arch][0])(**fields)


def _tensor_seed(seed: int, name: str) -> int:
    """A generator seed for one named tensor: depends only on `seed` and the name (not on layer count or order)."""
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def _random_weights(model, seed: int, std: float, dtype, norm_center: float = 1.0) -> dict:
    """Fresh tensors for every parameter of `model` (which may live on the meta device), keyed by parameter name.

    Each tensor comes from its own generator seeded by (seed, name). Linear weights, embeddings and biases
    ~ N(0, std); RMSNorm weights ~ norm_center + N(0, 0.1) (not all equal, so a loader that swaps the two norms of a
    layer is caught). A tied lm_head is not listed (named_parameters() yields a shared tensor once). Changes nothing.
    """
    import torch

    weights = {}
    for name, param in sorted(model.named_parameters()):
        gen = torch.Generator(device="cpu").manual_seed(_tensor_seed(seed, name))
        noise = torch.randn(tuple(param.shape), generator=gen, dtype=torch.float32)  # [*param.shape]
        value = norm_center + 0.1 * noise if name.endswith("norm.weight") else std * noise
        weights[name] = value.to(dtype).contiguous()
    return weights


def build_tiny_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    head_dim: int | None = None,
    max_position_embeddings: int = 1024,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    tie_word_embeddings: bool | None = None,
    sliding_window: int | None = None,
    init_std: float | None = None,
    seed: int = 0,
    vocab_size: int = TOKENIZER_MAX_VOCAB,
    dtype: str = "float32",
    tokenizer_dir: str | Path | None = None,
    config: dict | None = None,
) -> Path:
    """Write a random-weight HF checkpoint (config.json, model.safetensors, tokenizer files) into `out_dir`.

    `arch` is one of ARCHS: "llama", "qwen2" (qkv bias; tied embeddings unless `tie_word_embeddings=False`),
    "mistral", "qwen3" (q/k norms), "gemma3" (text; tied) or "phi3" (fused projections in the file). `config` adds
    or overrides fields of the HF config (e.g. Gemma 3's layer_types, Phi-3's longrope `rope_parameters`).
    `init_std` None means `default_init_std(hidden_size)`. `rope_scaling` is an HF rope dict (e.g. llama3:
    rope_type, factor, low_freq_factor, high_freq_factor, original_max_position_embeddings); it is written, with
    `rope_theta`, as the config's `rope_parameters` (transformers 5 layout). A `vocab_size` above the tokenizer's
    size pads the model vocabulary. `tokenizer_dir`, if given, is a folder from `train_tokenizer` to copy instead of
    training again (saves time when building many checkpoints). Same arguments give byte-identical files.
    Creates `out_dir` (and parents) if needed; overwrites files of the same names. Returns `out_dir` as a Path.
    """
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copyfile(f, out / f.name)
    else:
        train_tokenizer(out, min(vocab_size, TOKENIZER_MAX_VOCAB))
    special = _special_ids(out)
    if vocab_size < special["size"]:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {special['size']}")
    std = default_init_std(hidden_size) if init_std is None else float(init_std)
    hf_config = _make_config(
        arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, intermediate_size=intermediate_size, head_dim=head_dim,
        max_position_embeddings=max_position_embeddings, rope_theta=rope_theta, rope_scaling=rope_scaling,
        tie_word_embeddings=tie_word_embeddings, sliding_window=sliding_window, init_std=std, special=special,
        dtype=dtype, extra=config,
    )
    with torch.device("meta"):  # only the parameter names and shapes are needed; nothing is allocated
        model = getattr(transformers, ARCHS[arch][1])(hf_config)
    # Gemma's norms scale by (1 + w): draw w around 0 so they stay near 1 as the others
    weights = _random_weights(model, seed, std, getattr(torch, dtype), norm_center=0.0 if arch == "gemma3" else 1.0)
    _save_checkpoint(weights, hf_config, type(model).__name__, out)
    return out


def _save_checkpoint(weights: dict, config, architecture: str, out: Path) -> None:
    """Write config.json, generation_config.json and one model.safetensors holding `weights` into `out`."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config.architectures = [architecture]
    config.save_pretrained(str(out))
    GenerationConfig.from_model_config(config).save_pretrained(str(out))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})


def default_model_dir() -> Path:
    """The embedded default model for `python -m batchllm demo`; built on first use, then returned at once.

    Lives under `cache_root()`. It is built in a temporary sibling folder and renamed into place, so an interrupted
    or concurrent build never leaves a half-written folder (the loser of a race discards its copy).
    """
    root = cache_root()
    target = root / f"tiny-llama-h{DEFAULT_MODEL_SHAPE['hidden_size']}-v{_BUILD_VERSION}"
    if (target / "config.json").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        build_tiny_checkpoint(tmp, **DEFAULT_MODEL_SHAPE)
        os.chmod(tmp, 0o755)  # mkdtemp made it private; the cached model is shared like any other cache entry
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real error
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target

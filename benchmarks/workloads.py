"""Benchmark workloads: random token-id prompts every engine receives identically (fixed seed).

A workload is a plain JSON-able dict:
    {name, description, prompts: [[ids...]], max_tokens: [...], ignore_eos: true,
     kv_cache_memory_bytes: int | None, shape: {...}}
`kv_cache_memory_bytes` is None except for `tight-kv`; the orchestrator fills in a shared default for the others so
every engine gets the same KV budget. Prompt ids avoid the tokenizer's special ids and start with bos, the way a
tokenizer would encode text. Pure Python (no torch): the peers' venvs can read the files with the stdlib only.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

WORKLOAD_NAMES = ("batchllm", "sglang-gsp", "no-sharing", "tight-kv", "mixed-output")


@dataclass(frozen=True)
class TokenSpace:
    """Which ids a prompt may use: `bos` first, then ids drawn from [low, high) minus `special`."""

    bos: int
    low: int
    high: int
    special: frozenset[int]


@dataclass(frozen=True)
class SharedShape:
    """Groups of `degree` prompts sharing `shared` tokens (bos included), then `distinct` tokens of their own."""

    groups: int
    degree: int
    shared: int
    distinct: int
    out_min: int
    out_max: int
    shuffle: bool


# Full shapes (sized for ~20-30 minutes of all engines on 2 cores) and quick ones keeping the ratios
# shared : distinct : output and the sharing degree.
FULL_SHAPES: dict[str, SharedShape] = {
    "batchllm": SharedShape(groups=10, degree=16, shared=1536, distinct=128, out_min=64, out_max=64, shuffle=True),
    "sglang-gsp": SharedShape(groups=8, degree=16, shared=1024, distinct=64, out_min=128, out_max=128, shuffle=False),
    "no-sharing": SharedShape(groups=128, degree=1, shared=1, distinct=511, out_min=64, out_max=64, shuffle=False),
    "mixed-output": SharedShape(groups=8, degree=16, shared=512, distinct=64, out_min=16, out_max=256, shuffle=True),
}
QUICK_SHAPES: dict[str, SharedShape] = {
    "batchllm": SharedShape(groups=4, degree=16, shared=384, distinct=32, out_min=16, out_max=16, shuffle=True),
    "sglang-gsp": SharedShape(groups=2, degree=16, shared=256, distinct=16, out_min=32, out_max=32, shuffle=False),
    "no-sharing": SharedShape(groups=32, degree=1, shared=1, distinct=255, out_min=16, out_max=16, shuffle=False),
    "mixed-output": SharedShape(groups=2, degree=16, shared=128, distinct=16, out_min=8, out_max=64, shuffle=True),
}
# tight-kv: the batchllm shape with a KV budget of this fraction of what the batch needs with perfect sharing.
TIGHT_KV_FRACTION = 1 / 3

DESCRIPTIONS = {
    "batchllm": "BatchLLM microbenchmark shape: groups of {degree} prompts share {shared} tokens, {distinct} distinct "
    "each, {out} output tokens; sharers shuffled apart",
    "sglang-gsp": "SGLang generated-shared-prefix shape scaled down: {groups} groups x {degree} prompts, system prompt "
    "{shared}, question {distinct}, output {out}; groups adjacent (friendly to LRU prefix caches)",
    "no-sharing": "{groups} prompts of {total} tokens sharing only bos, {out} output tokens: nothing to share",
    "tight-kv": "the batchllm workload with a KV budget of {frac:.0%} of what it needs even with perfect sharing",
    "mixed-output": "groups of {degree} share {shared} tokens, {distinct} distinct each; output lengths uniform in "
    "{out_min}..{out_max}; shuffled",
}


def token_space_from_model(model_dir: str | Path) -> TokenSpace:
    """Read bos and the special ids from a HF folder's tokenizer.json / config.json (stdlib only, no side effects).

    Ids are drawn below the tokenizer's size (so they are real tokens) and never hit an added/special token.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    special: set[int] = set()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = config.get(key)
        if isinstance(value, int):
            special.add(value)
        elif isinstance(value, list):
            special.update(int(v) for v in value)
    high = int(config["vocab_size"])
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        tok = json.loads(tok_file.read_text(encoding="utf-8"))
        added = [int(t["id"]) for t in tok.get("added_tokens", [])]
        special.update(added)
        vocab = tok.get("model", {}).get("vocab", {})
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))
        high = min(high, max(ids + added) + 1)
    bos = config.get("bos_token_id")
    if not isinstance(bos, int):
        raise ValueError(f"{model_dir}/config.json has no integer bos_token_id")
    return TokenSpace(bos=bos, low=0, high=high, special=frozenset(special))


def _draw(rng: random.Random, space: TokenSpace, n: int) -> list[int]:
    """`n` ids from `space` (advances `rng`)."""
    out: list[int] = []
    while len(out) < n:
        t = rng.randrange(space.low, space.high)
        if t not in space.special:
            out.append(t)
    return out


def shared_prompts(shape: SharedShape, space: TokenSpace, seed: int) -> tuple[list[list[int]], list[int]]:
    """Prompts and max_tokens for a shared-prefix shape (pure function of its arguments).

    Every prompt starts with bos; a group's prompts share exactly their first `max(shape.shared, 1)` tokens (bos
    included): sibling branches never start with the same id, so no prompt shares more than intended by chance.
    With `shape.shuffle` the prompts of all groups are shuffled together.
    """
    rng = random.Random(seed)
    first_used: dict[tuple, set[int]] = {}

    def branch(key: tuple, n: int) -> list[int]:
        """`n` ids whose first differs from every earlier sibling's under the same parent `key` (exact sharing)."""
        used = first_used.setdefault(key, set())
        ids = _draw(rng, space, n)
        while ids and ids[0] in used:
            ids[0] = _draw(rng, space, 1)[0]
        used.update(ids[:1])
        return ids

    prompts: list[list[int]] = []
    for g in range(shape.groups):
        head = [space.bos] + branch(("bos",), max(shape.shared - 1, 0))
        parent = ("group", g) if len(head) > 1 else ("bos",)
        for _ in range(shape.degree):
            prompts.append(head + branch(parent, shape.distinct))
    max_tokens = [rng.randint(shape.out_min, shape.out_max) for _ in prompts]
    if shape.shuffle:
        order = list(range(len(prompts)))
        rng.shuffle(order)
        prompts = [prompts[i] for i in order]
        max_tokens = [max_tokens[i] for i in order]
    return prompts, max_tokens


def kv_tokens_needed(prompts: list[list[int]], max_tokens: list[int], shared: bool) -> int:
    """KV slots the whole batch needs at once: without sharing, or with every shared prefix stored once.

    With sharing, the prompt part is the node count of the prompts' token trie: total length minus the longest common
    prefixes of neighbours in sorted order.
    """
    total = sum(len(p) + m for p, m in zip(prompts, max_tokens))
    if not shared:
        return total
    ordered = sorted(prompts)
    common = 0
    for a, b in zip(ordered, ordered[1:]):
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        common += n
    return total - common


def kv_bytes_per_token(config: dict, dtype_bytes: int = 2) -> int:
    """K and V bytes per token over all layers for a HF config dict (default bf16)."""
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * dtype_bytes


def make_workload(name: str, space: TokenSpace, *, quick: bool, kv_bytes_per_tok: int, seed: int = 0) -> dict:
    """Build workload `name` (one of WORKLOAD_NAMES) as a JSON-able dict; deterministic in its arguments."""
    if name not in WORKLOAD_NAMES:
        raise ValueError(f"unknown workload {name!r}; expected one of {WORKLOAD_NAMES}")
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    base = "batchllm" if name == "tight-kv" else name
    shape = shapes[base]
    seed_of = {n: i for i, n in enumerate(WORKLOAD_NAMES)}
    prompts, max_tokens = shared_prompts(shape, space, seed * 1000 + seed_of[base])
    kv_bytes = None
    fields = dict(total=shape.shared + shape.distinct, degree=shape.degree, shared=shape.shared,
                  distinct=shape.distinct, groups=shape.groups, out=shape.out_max, out_min=shape.out_min,
                  out_max=shape.out_max, frac=TIGHT_KV_FRACTION)
    if name == "tight-kv":
        need = kv_tokens_needed(prompts, max_tokens, shared=True)
        kv_bytes = int(need * TIGHT_KV_FRACTION) * kv_bytes_per_tok
    return {
        "name": name,
        "description": DESCRIPTIONS[name].format(**fields),
        "quick": quick,
        "seed": seed,
        "shape": {"groups": shape.groups, "degree": shape.degree, "shared": shape.shared,
                  "distinct": shape.distinct, "out_min": shape.out_min, "out_max": shape.out_max,
                  "shuffle": shape.shuffle},
        "prompts": prompts,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "kv_cache_memory_bytes": kv_bytes,
        "kv_tokens_no_sharing": kv_tokens_needed(prompts, max_tokens, shared=False),
        "kv_tokens_perfect_sharing": kv_tokens_needed(prompts, max_tokens, shared=True),
    }


def write_workload(workload: dict, path: str | Path) -> Path:
    """Write `workload` as JSON to `path` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(workload), encoding="utf-8")
    return path


def warmup_prompts(space: TokenSpace, n: int = 4, length: int = 48, seed: int = 12345) -> list[list[int]]:
    """Small unrelated prompts for a warm-up pass (distinct from every workload's ids with overwhelming odds)."""
    rng = random.Random(seed)
    return [[space.bos] + _draw(rng, space, length - 1) for _ in range(n)]

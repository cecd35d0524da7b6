"""Simulated attention steps for the attention tests: prefix nodes and sequences laid out in shuffled cache blocks,
the parts a runner would build, and plain attention over each sequence's concatenated KV as the reference (the
fixture running each test on both attention paths, `attention_path`, is in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from batchllm.model.attention import AttentionMetadata, AttnPart, paged_attention

CPU = torch.device("cpu")


@dataclass
class Segment:
    blocks: list[int]
    start: int
    length: int
    first_slot: int = 0  # a segment that starts mid-block leaves its first block's leading slots unused

    def slot(self, j: int, bs: int) -> int:
        """Cache slot of the segment's j-th key."""
        i = self.first_slot + j
        return self.blocks[i // bs] * bs + i % bs


@dataclass
class Seq:
    chain: list[Segment]  # prefix segments then its own segment (the last)
    nodes: list[str]  # names of the prefix nodes it sits under
    n_query: int  # this step's tokens: the last n_query positions of the chain


class Step:
    """A simulated step: prefix nodes (nested), sequences under them, and the parts a runner would build."""

    def __init__(self, seed: int, block_size: int = 16, num_blocks: int = 256):
        self.rng = np.random.default_rng(seed)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free = list(self.rng.permutation(num_blocks))  # shuffled, so blocks are not contiguous
        self.nodes: dict[str, Segment] = {}
        self.node_chain: dict[str, list[str]] = {}
        self.seqs: list[Seq] = []

    def _blocks(self, n_tokens: int) -> list[int]:
        n = -(-n_tokens // self.block_size)
        out, self.free = self.free[:n], self.free[n:]
        assert len(out) == n, "test ran out of blocks"
        return [int(b) for b in out]

    def _segment(self, start: int, length: int) -> Segment:
        """A segment laid out as the engine does: from `start`'s slot in its block (mid-block below a node that
        ends mid-block)."""
        first = start % self.block_size
        return Segment(self._blocks(first + length), start, length, first)

    def node(self, name: str, length: int, parent: str | None = None) -> None:
        """A shared prefix node of ``length`` tokens under ``parent`` (it may end mid-block)."""
        chain = ([*self.node_chain[parent], parent]) if parent else []
        start = sum(self.nodes[n].length for n in chain)
        self.nodes[name] = self._segment(start, length)
        self.node_chain[name] = chain

    def seq(self, own_len: int, n_query: int, node: str | None = None) -> None:
        """A sequence under ``node`` whose own segment holds ``own_len`` keys, the last ``n_query`` new this step."""
        names = [*self.node_chain[node], node] if node else []
        start = sum(self.nodes[n].length for n in names)
        self.seqs.append(Seq([self.nodes[n] for n in names] + [self._segment(start, own_len)], names, n_query))

    def pack(self, shared: bool = True):
        """Packed rows: positions, slot mapping, parts (prefix-shared, or one whole-chain part per sequence)."""
        positions, slots, rows_of = [], [], []
        for s in self.seqs:
            own = s.chain[-1]
            first = len(positions)
            for j in range(own.length - s.n_query, own.length):
                positions.append(own.start + j)
                slots.append(own.slot(j, self.block_size))
            rows_of.append(np.arange(first, len(positions), dtype=np.int64))
        parts = []
        if shared:
            for name, seg in self.nodes.items():
                rows = [r for s, r in zip(self.seqs, rows_of) if name in s.nodes]
                if rows:
                    parts.append(AttnPart(np.concatenate(rows), seg.blocks, seg.start, seg.length, seg.first_slot))
            for s, r in zip(self.seqs, rows_of):
                own = s.chain[-1]
                parts.append(AttnPart(r, own.blocks, own.start, own.length, own.first_slot))
        else:
            # baseline layout: one segment per sequence over its whole block table (chain blocks concatenated)
            assert all(seg.first_slot == 0 for s in self.seqs for seg in s.chain), "the baseline needs whole blocks"
            for s, r in zip(self.seqs, rows_of):
                blocks = [b for seg in s.chain for b in seg.blocks]
                parts.append(AttnPart(r, blocks, 0, s.chain[-1].start + s.chain[-1].length))
        return parts, np.array(positions, dtype=np.int64), np.array(slots, dtype=np.int64), rows_of

    def chain_slots(self, s: Seq) -> np.ndarray:
        bs = self.block_size
        return np.concatenate([np.array([seg.slot(j, bs) for j in range(seg.length)]) for seg in s.chain])


def reference(step: Step, q, k, v, cache, positions, slots, rows_of, scale, window=None):
    """Plain attention in float64: each row over its sequence's concatenated keys, masked by position."""
    n_kv, d = cache.shape[-2], cache.shape[-1]
    flat = cache.double().clone().view(2, -1, n_kv, d)
    flat[0, torch.from_numpy(slots)] = k.double()
    flat[1, torch.from_numpy(slots)] = v.double()
    group = q.shape[1] // n_kv
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, rows in zip(step.seqs, rows_of):
        keys = torch.from_numpy(step.chain_slots(s))
        kp = torch.arange(len(keys))  # chains are contiguous from position 0
        ks = flat[0, keys].repeat_interleave(group, dim=1)  # [L, H, D]
        vs = flat[1, keys].repeat_interleave(group, dim=1)  # [L, H, D]
        for r in rows:
            qp = int(positions[r])
            vis = kp <= qp
            if window is not None:
                vis &= kp > qp - window
            sc = torch.einsum("hd,lhd->hl", q[r].double(), ks) * scale  # [H, L]
            sc = sc.masked_fill(~vis[None, :], float("-inf"))
            out[r] = torch.einsum("hl,lhd->hd", torch.softmax(sc, dim=-1), vs)
    return out


def run_case(step: Step, heads: int, kv_heads: int, dtype=torch.float32, window=None, shared=True, d=32,
             **build_kw):
    """Build the step's metadata, run paged attention and the reference; return (out, ref, meta).

    The inputs are drawn in fp32 and rounded to ``dtype`` before the reference sees them, so a bf16 run is compared
    with exact attention over the very same bf16 values."""
    parts, positions, slots, rows_of = step.pack(shared)
    t = len(positions)
    gen = torch.Generator().manual_seed(1234)

    def draw(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).float()

    q = draw(t, heads, d)
    k = draw(t, kv_heads, d)
    v = draw(t, kv_heads, d)
    cache = draw(2, step.num_blocks, step.block_size, kv_heads, d)
    scale = d**-0.5
    ref = reference(step, q, k, v, cache, positions, slots, rows_of, scale, window)
    meta = AttentionMetadata.build(parts, positions, slots, step.block_size, CPU, sliding_window=window, **build_kw)
    cache_t = cache.to(dtype)
    out = paged_attention(q.to(dtype), k.to(dtype), v.to(dtype), cache_t, meta, scale)
    return out, ref, meta


def group_step(seed: int, prefix_len: int, n_groups: int = 3, per_group: int = 4) -> Step:
    """Groups under a block-aligned node of the prefix's aligned part; the tail starts each own segment."""
    step = Step(seed)
    node_len = prefix_len - prefix_len % step.block_size
    tail = prefix_len - node_len
    for g in range(n_groups):
        step.node(f"g{g}", node_len)
        for r in range(per_group):
            step.seq(tail + 5 + 7 * r + g, 1, f"g{g}")  # decodes; own segments end mid-block
    return step



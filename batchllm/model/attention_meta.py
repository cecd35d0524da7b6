"""Attention metadata: a step's attention as *parts* and how they are laid out for the kernels, built once per step
(numpy) and read by every layer (`batchllm.model.attention` computes with it).

A part is a set of query rows of the packed batch against one KV segment (a run of consecutive positions stored in a
list of cache blocks). A shared prefix is one part whose rows are the tokens of every request under that prefix, so
its keys are read once for the whole group and the work is a matrix product. `AttentionMetadata.build` sorts parts
into buckets of similar shape for torch's fused kernel (padded into one batched problem each, with every index and
mask pre-computed) or lays them out CSR-style for the project's ragged kernel, and records how each row's partial
results merge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from batchllm.model.cpu_kernels import has_bf16_kernels, load_cpu_kernels

# Default cap on the padded key slots (bucket batch x keys) gathered by one attention call; bigger buckets are split.
# It bounds the temporary K/V copy (e.g. 2^17 slots x 4 KV heads x 64 x bf16 x 2 = 128 MiB).
DEFAULT_MAX_KEYS_PER_CALL = 1 << 17
# Where the CPU kernels have vector paths (AVX2 and up), every bf16 or fp32 part goes to the ragged kernel, which
# reads keys straight from the paged cache and runs large parts as register-blocked matrix products (vdpbf16ps with
# AVX512-BF16, fp32 FMAs otherwise: attention_f32.cpp). Where only the portable loop is built, just the parts with
# at most this many query rows (decodes, short chunks) do: the fused kernel pays a fixed cost per (part, head), the
# portable loop a slow one per key.
RAGGED_MAX_QUERIES = 8


@dataclass(frozen=True)
class AttnPart:
    """One attention problem: ``q_rows`` of the packed batch attend to one KV segment.

    The segment's j-th key sits at position ``kv_start + j`` and, with ``i = first_slot + j``, in cache slot
    ``block_ids[i // block_size] * block_size + i % block_size`` (a segment that starts mid-block leaves its first
    block's leading ``first_slot`` slots out).
    """

    q_rows: np.ndarray  # int64 [Q]: rows of the packed batch
    block_ids: Sequence[int]  # the segment's blocks, in order
    kv_start: int  # absolute position of the segment's first key
    kv_len: int  # number of keys in the segment
    first_slot: int = 0  # slot of the first key in block_ids[0]: 0 .. block_size - 1


@dataclass(frozen=True)
class AttnBucket:
    """Parts padded into one batched attention call of ``batch`` problems of ``q_len`` x ``kv_len``."""

    batch: int
    q_len: int
    kv_len: int
    q_index: torch.Tensor  # int64 [batch * q_len]: packed row of each padded query (padding -> row 0)
    kv_index: torch.Tensor  # int64 [batch * kv_len]: flat cache slot of each padded key (padding -> slot 0)
    visible: torch.Tensor | None  # bool [batch, q_len, kv_len]; None when every key is visible to every query
    sel: torch.Tensor  # int64 [N]: flat (batch * q_len) index of the padded queries that count in the merge
    # Every part is a whole causal segment (its queries are exactly its keys' positions): the fused kernel's own
    # causal mode replaces the explicit mask (about twice as fast), padding included, since padded keys come after
    # every real query.
    causal_square: bool = False


@dataclass
class RaggedParts:
    """Small parts laid out for the ragged kernel (CSR style): part p owns q_rows[q_ptr[p]:q_ptr[p+1]] and the keys
    kv_slots[kv_ptr[p]:kv_ptr[p+1]] at positions kv_start[p], kv_start[p] + 1, ..."""

    q_ptr: torch.Tensor  # int64 [P + 1]
    q_rows: torch.Tensor  # int64 [NQ]
    kv_ptr: torch.Tensor  # int64 [P + 1]
    kv_slots: torch.Tensor  # int64 [NK]
    kv_start: torch.Tensor  # int64 [P]
    q_pos: torch.Tensor  # int64 [T]
    rows_np: np.ndarray  # int64 [NQ], q_rows as numpy (for the cover count)
    # the compiled kernels, looked up once per step (not per layer): the ragged attention, and the fused merge of the
    # partial results into bf16 or fp32 rows (None where the kernel path has no vector kernels)
    attend: Callable | None = None
    merge: Callable | None = None

    @classmethod
    def build(cls, parts: Sequence[AttnPart], positions: np.ndarray, block_size: int, device,
              attend: Callable | None = None, merge: Callable | None = None) -> RaggedParts:
        q_counts = np.array([len(p.q_rows) for p in parts], dtype=np.int64)
        kv_counts = np.array([p.kv_len for p in parts], dtype=np.int64)
        rows = np.concatenate([np.asarray(p.q_rows, dtype=np.int64) for p in parts])
        slots = _parts_slots(parts, kv_counts, block_size)
        return cls(
            q_ptr=torch.from_numpy(np.concatenate(([0], np.cumsum(q_counts)))).to(device),
            q_rows=torch.from_numpy(rows).to(device),
            kv_ptr=torch.from_numpy(np.concatenate(([0], np.cumsum(kv_counts)))).to(device),
            kv_slots=torch.from_numpy(slots).to(device),
            kv_start=torch.tensor([p.kv_start for p in parts], dtype=torch.int64, device=device),
            q_pos=torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64)).to(device),
            rows_np=rows,
            attend=attend,
            merge=merge,
        )


    def sees_keys(self, parts: Sequence[AttnPart], positions: np.ndarray, window: int | None) -> np.ndarray:
        """bool [NQ]: whether each (part, row) sees at least one key of its part."""
        q_pos = positions[self.rows_np]  # [NQ]
        counts = [len(p.q_rows) for p in parts]
        first = np.repeat([p.kv_start for p in parts], counts)  # [NQ]
        last = np.repeat([p.kv_start + p.kv_len - 1 for p in parts], counts)  # [NQ]
        seen = first <= q_pos
        if window:
            seen &= last > q_pos - window
        return seen


def _parts_slots(parts: Sequence[AttnPart], kv_counts: np.ndarray, block_size: int) -> np.ndarray:
    """The flat cache slots of every part's keys, part after part: [sum of kv_len] (one pass for all parts)."""
    skip = np.array([p.first_slot for p in parts], dtype=np.int64)  # [P]
    used = -(-(kv_counts + skip) // block_size)  # [P] blocks each part reads
    flat: list[int] = []
    for p, n in zip(parts, used.tolist()):
        if len(p.block_ids) < n:
            raise ValueError(f"segment of {p.kv_len} keys from slot {p.first_slot} has {len(p.block_ids)} blocks "
                             f"of {block_size}")
        flat += p.block_ids[:n]  # list slices and extends run in C: ~5x faster than a generator per block
    blocks = np.array(flat, dtype=np.int64)  # [NB]
    slots = (blocks[:, None] * block_size + np.arange(block_size, dtype=np.int64)).reshape(-1)  # [NB * bs]
    # slot i of a part's run of blocks holds key i - first_slot, real while first_slot <= i < first_slot + kv_len
    start = np.repeat(np.cumsum(used) - used, used * block_size) * block_size  # [NB * bs] run start of each slot
    i = np.arange(slots.shape[0]) - start  # [NB * bs]
    lo = np.repeat(skip, used * block_size)  # [NB * bs]
    hi = lo + np.repeat(kv_counts, used * block_size)  # [NB * bs]
    return slots[(i >= lo) & (i < hi)]


@dataclass
class AttentionMetadata:
    """Everything index-like of one step's attention; built once per step, read by every layer.

    ``_masks`` and ``_workspace`` are per-step caches filled by the first layer and reused by the others
    (additive masks per dtype/GQA group, gather buffers), so that later layers allocate nothing large.
    """

    num_tokens: int
    block_size: int
    slot_mapping: torch.Tensor  # int64 [W]: cache slots of this step's tokens to write
    write_rows: torch.Tensor | None  # int64 [W]: rows written (None: all rows, in order)
    buckets: list[AttnBucket]
    merge_rows: torch.Tensor  # int64 [N]: packed row of each merged partial result (buckets concatenated)
    single_cover: bool  # every row appears in exactly one partial result: the merge is a plain scatter
    merge_index: torch.Tensor  # int64 [T, L]: the partial results of each row (N = "none"; L = 1 if single)
    ragged: RaggedParts | None = None  # small parts for the ragged CPU kernel (their rows come last in merge_rows)
    window: int = 0  # sliding window (0: none)
    _masks: dict = field(default_factory=dict, repr=False)
    _workspace: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        parts: Sequence[AttnPart],
        positions: np.ndarray,
        slot_mapping: np.ndarray,
        block_size: int,
        device: torch.device,
        sliding_window: int | None = None,
        max_keys_per_call: int = DEFAULT_MAX_KEYS_PER_CALL,
        ragged_max_queries: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> AttentionMetadata:
        """Bucket ``parts`` by shape and pre-compute indices and visibility masks for ``paged_attention``.

        positions: int64 [T] absolute position of each packed row; slot_mapping: [T] cache slot of each row's K/V
        (negative: not written); dtype: the model's dtype (bf16 sends every part to the CPU kernel).
        Raises ValueError if a row has no visible key in any part.
        """
        positions = np.asarray(positions, dtype=np.int64)
        slots = np.asarray(slot_mapping, dtype=np.int64)
        num_tokens = int(positions.shape[0])
        if slots.shape[0] != num_tokens:
            raise ValueError(f"slot_mapping has {slots.shape[0]} entries for {num_tokens} tokens")
        keep = slots >= 0
        write_rows = None if keep.all() else torch.from_numpy(np.nonzero(keep)[0]).to(device)
        slot_t = torch.from_numpy(np.ascontiguousarray(slots[keep])).to(device)

        live = [p for p in parts if len(p.q_rows) > 0 and p.kv_len > 0]
        kernels = load_cpu_kernels() if device.type == "cpu" else None
        vector = kernels is not None and has_bf16_kernels()  # the kernel path has vector kernels (AVX2 and up)
        if ragged_max_queries is None:
            ragged_max_queries = RAGGED_MAX_QUERIES if kernels is not None else 0
            if dtype in (torch.bfloat16, torch.float32) and ragged_max_queries > 0 and vector:
                ragged_max_queries = num_tokens
        small = [p for p in live if len(p.q_rows) <= ragged_max_queries]
        live = [p for p in live if len(p.q_rows) > ragged_max_queries]
        buckets: list[AttnBucket] = []
        row_lists: list[np.ndarray] = []  # packed row of each partial result, in merge order
        cover = np.zeros(num_tokens, dtype=np.int64)
        for group in _bucket_parts(live, max_keys_per_call):
            bucket, rows = _build_bucket(group, positions, block_size, sliding_window, device)
            buckets.append(bucket)
            row_lists.append(rows)
            np.add.at(cover, rows, 1)
        ragged = RaggedParts.build(small, positions, block_size, device,
                                   attend=None if kernels is None else kernels.ragged_attention,
                                   merge=kernels.merge if vector else None) if small else None
        if ragged is not None:
            row_lists.append(ragged.rows_np)
            np.add.at(cover, ragged.rows_np[ragged.sees_keys(small, positions, sliding_window)], 1)
        if num_tokens and (cover == 0).any():  # cover: parts in which a row sees at least one key
            missing = np.nonzero(cover == 0)[0][:8].tolist()
            raise ValueError(f"rows {missing} see no key in any attention part")
        merge_rows = np.concatenate(row_lists) if row_lists else np.zeros(0, dtype=np.int64)
        count = np.bincount(merge_rows, minlength=num_tokens)  # partial results per row
        single = bool((count == 1).all())
        return cls(
            num_tokens=num_tokens,
            block_size=block_size,
            slot_mapping=slot_t,
            write_rows=write_rows,
            buckets=buckets,
            merge_rows=torch.from_numpy(merge_rows).to(device),
            single_cover=single,
            merge_index=_merge_index(merge_rows, count).to(device),
            ragged=ragged,
            window=sliding_window or 0,
        )

    def additive_mask(self, index: int, dtype: torch.dtype, group: int) -> torch.Tensor | None:
        """Additive mask of bucket ``index`` for the folded GQA layout: [batch, 1, q_len * group, kv_len]; cached."""
        bucket = self.buckets[index]
        if bucket.visible is None:
            return None
        key = (index, dtype, group)
        mask = self._masks.get(key)
        if mask is None:
            vis = bucket.visible[:, :, None, :].expand(-1, -1, group, -1)  # [B, Lq, G, Lk]
            mask = torch.zeros(vis.shape, dtype=dtype, device=vis.device)
            mask.masked_fill_(~vis, float("-inf"))
            mask = mask.view(bucket.batch, 1, bucket.q_len * group, bucket.kv_len)  # [B, 1, Lq*G, Lk]
            self._masks[key] = mask
        return mask

    def kv_buffer(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat gather buffer of at least ``numel`` elements, reused by every layer of the step."""
        key = (dtype, device)
        buf = self._workspace.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._workspace[key] = buf
        return buf[:numel]


def _ceil_log2(x: int) -> int:
    return max(0, int(x - 1).bit_length())


def _bucket_parts(parts: list[AttnPart], max_keys_per_call: int) -> list[list[AttnPart]]:
    """Group parts into padded batches: same power-of-two class of query count and of key count.

    Inside a class, parts are sorted by key count (longest first) and cut into calls of at most
    ``max_keys_per_call`` padded key slots, so a padded problem is never more than ~2x its largest member in
    either dimension and a long prefill part is never padded together with single-token decodes.
    """
    classes: dict[tuple[int, int], list[AttnPart]] = {}
    for p in parts:
        classes.setdefault((_ceil_log2(len(p.q_rows)), _ceil_log2(p.kv_len)), []).append(p)
    groups: list[list[AttnPart]] = []
    for key in sorted(classes):
        members = sorted(classes[key], key=lambda p: (-p.kv_len, -len(p.q_rows)))
        start = 0
        while start < len(members):
            per_call = max(1, max_keys_per_call // members[start].kv_len)
            groups.append(members[start : start + per_call])
            start += per_call
    return groups


def _build_bucket(
    group: list[AttnPart], positions: np.ndarray, block_size: int, window: int | None, device: torch.device
) -> tuple[AttnBucket, np.ndarray]:
    """Pad ``group`` into one batch; return the bucket and the packed rows that count in its merge."""
    batch = len(group)
    q_len = max(len(p.q_rows) for p in group)
    kv_len = max(p.kv_len for p in group)
    n_blocks = -(-(kv_len + block_size - 1) // block_size)  # room for any first_slot
    q_rows = np.zeros((batch, q_len), dtype=np.int64)
    q_valid = np.zeros((batch, q_len), dtype=bool)
    tables = np.zeros((batch, n_blocks), dtype=np.int64)
    kv_start = np.zeros(batch, dtype=np.int64)
    kv_count = np.zeros(batch, dtype=np.int64)
    skip = np.zeros(batch, dtype=np.int64)
    for i, p in enumerate(group):
        rows = np.asarray(p.q_rows, dtype=np.int64)
        q_rows[i, : rows.shape[0]] = rows
        q_valid[i, : rows.shape[0]] = True
        need = -(-(p.kv_len + p.first_slot) // block_size)
        if len(p.block_ids) < need:
            raise ValueError(f"segment of {p.kv_len} keys from slot {p.first_slot} has {len(p.block_ids)} blocks "
                             f"of {block_size}")
        tables[i, :need] = np.asarray(p.block_ids[:need], dtype=np.int64)
        kv_start[i] = p.kv_start
        kv_count[i] = p.kv_len
        skip[i] = p.first_slot
    j = np.arange(kv_len, dtype=np.int64)
    at = skip[:, None] + j[None, :]  # [B, Lk] index of each key in its part's run of slots
    kv_slots = np.take_along_axis(tables, at // block_size, axis=1) * block_size + at % block_size  # [B, Lk]
    key_valid = j[None, :] < kv_count[:, None]  # [B, Lk]
    kv_slots = np.where(key_valid, kv_slots, 0)

    q_pos = positions[q_rows]  # [B, Lq]
    k_pos = kv_start[:, None] + j[None, :]  # [B, Lk]
    square = window is None and all(
        len(p.q_rows) == p.kv_len and np.array_equal(positions[p.q_rows], p.kv_start + np.arange(p.kv_len))
        for p in group)
    visible = key_valid[:, None, :] & (k_pos[:, None, :] <= q_pos[:, :, None])  # [B, Lq, Lk]
    if window is not None:
        visible &= k_pos[:, None, :] > (q_pos[:, :, None] - window)
    visible &= q_valid[:, :, None]
    counts = q_valid & visible.any(axis=2)  # [B, Lq]: rows with at least one visible key count in the merge
    # Rows that see nothing (padding, or a segment wholly outside the window) see everything instead: their
    # output stays finite and is dropped from the merge.
    visible |= ~counts[:, :, None]
    sel = np.nonzero(counts.reshape(-1))[0]
    sel_rows = q_rows.reshape(-1)[sel]

    bucket = AttnBucket(
        batch=batch,
        q_len=q_len,
        kv_len=kv_len,
        q_index=torch.from_numpy(q_rows.reshape(-1)).to(device),
        kv_index=torch.from_numpy(kv_slots.reshape(-1)).to(device),
        visible=None if square or visible.all() else torch.from_numpy(visible).to(device),
        sel=torch.from_numpy(sel).to(device),
        causal_square=square,
    )
    return bucket, sel_rows


def _merge_index(rows: np.ndarray, cover: np.ndarray) -> torch.Tensor:
    """[T, L] indices of each row's partial results in the concatenated list (L = most parts covering a row);
    slots past a row's own count point at index N, a sentinel with lse = -inf."""
    n = rows.shape[0]
    if cover.size == 0:  # a step without tokens
        return torch.zeros((0, 1), dtype=torch.int64)
    levels = int(cover.max())
    order = np.argsort(rows, kind="stable")  # partial results grouped by row
    first = np.concatenate(([0], np.cumsum(cover)[:-1]))  # [T] where each row's run starts in `order`
    level = np.arange(n) - np.repeat(first, cover)  # [N] rank of each (sorted) partial result within its row
    index = np.full((cover.shape[0], levels), n, dtype=np.int64)
    index[rows[order], level] = order
    return torch.from_numpy(index)

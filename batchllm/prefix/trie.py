"""The block trie of a batch's prompts, built level by level with numpy (no per-token Python loops): a trie node at
block depth `d` stands for the first `d + 1` blocks of a prompt, and its members are the prompts that start with
them. `batchllm.prefix.tree` compresses it into the prefix tree the plan is cut from; see its docstring for the
method.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# Multipliers of the row hash (odd 64-bit constants from splitmix64 / murmur finalisers).
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
WINDOW_TOKENS = 1 << 25  # most prompt tokens the planner copies at once (128 MiB as int32)


@dataclass(frozen=True)
class TokenSource:
    """Read access to the prompts of a batch without copying them all: the planner copies only the token windows
    of the prompts that still share something (a shared prefix is read once, an unshared prompt barely at all)."""

    prompts: Sequence[Sequence[int]] | np.ndarray  # as given: lists of ints, 1-D int arrays, or a 2-D int array
    lengths: np.ndarray  # [N] int64

    @property
    def num_requests(self) -> int:
        return int(self.lengths.shape[0])

    def window(self, req: np.ndarray, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Copy tokens [start, min(stop, len)) of each request in `req` into one flat array; changes nothing.

        Returns (flat [total] int32 or int64, offsets [n] int64: where each request's slice begins in flat).
        Raises ValueError for a token id that is negative or not an integer.
        """
        width = np.clip(self.lengths[req] - start, 0, stop - start)  # [n]
        offsets = np.zeros(req.shape[0], dtype=np.int64)
        if req.shape[0] > 1:
            np.cumsum(width[:-1], out=offsets[1:])
        total = int(width.sum())
        p = self.prompts
        if isinstance(p, np.ndarray) and p.ndim == 2:
            flat = p[req, start:stop].reshape(-1)  # equal widths: rows laid end to end
        elif total == 0:
            flat = np.zeros(0, dtype=np.int32)
        elif all(isinstance(p[i], np.ndarray) for i in req[:64].tolist()) and isinstance(p[int(req[-1])], np.ndarray):
            flat = np.concatenate([p[i][start:stop] for i in req.tolist()])
        else:  # lists of ints: one pass straight into int32 (int64 where an id does not fit)
            def parts():
                return itertools.chain.from_iterable(itertools.islice(p[i], start, stop) for i in req.tolist())

            try:
                flat = np.fromiter(parts(), dtype=np.int32, count=total)
            except OverflowError:
                flat = np.fromiter(parts(), dtype=np.int64, count=total)
        if flat.size:
            if not np.issubdtype(flat.dtype, np.integer):
                raise ValueError(f"token ids must be integers, got {flat.dtype}")
            if int(flat.min()) < 0:
                raise ValueError(f"token ids must be >= 0, got {int(flat.min())}")
            if flat.dtype != np.int32 and flat.dtype != np.int64:
                flat = flat.astype(np.int64)
        return np.ascontiguousarray(flat), offsets


def as_token_source(prompts: Sequence[Sequence[int]] | np.ndarray) -> TokenSource:
    """Wrap prompts (lists of ints, 1-D integer arrays, or a 2-D array of equal-length rows); copies no tokens.

    Raises ValueError for an empty prompt. Token ids are checked (integers, >= 0) where the planner reads them.
    """
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        n, width = prompts.shape
        lengths = np.full(n, width, dtype=np.int64)
    else:
        lengths = np.fromiter((len(p) for p in prompts), dtype=np.int64, count=len(prompts))
    if lengths.size and int(lengths.min()) < 1:
        raise ValueError(f"every prompt needs at least one token (prompt {int(np.argmin(lengths))} is empty)")
    return TokenSource(prompts=prompts, lengths=lengths)


def _hash_rows(parents: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """64-bit hash of each (parent id, row of tokens); changes nothing.  parents [n] int64, rows [n, B] -> [n] u64."""
    width = rows.shape[1]
    mult = (np.arange(1, width + 1, dtype=np.uint64) * _GOLDEN) | np.uint64(1)  # [B] odd multipliers
    h = (rows.astype(np.uint64) * mult).sum(axis=1, dtype=np.uint64)  # [n]
    h ^= (parents.astype(np.uint64) + np.uint64(1)) * _MIX2
    h ^= h >> np.uint64(31)
    h *= _MIX1
    h ^= h >> np.uint64(29)
    h *= _MIX2
    h ^= h >> np.uint64(32)
    return h


def group_rows(parents: np.ndarray, rows: np.ndarray, hasher=_hash_rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group equal (parent, row) pairs exactly; changes nothing.

    parents [n] int64, rows [n, B] ints. Returns (inverse [n] group of each row, first [G] index of each group's
    first row, counts [G]). Groups are numbered in a deterministic order. Rows are grouped by hash and every row is
    then compared with its group's first row; if any differs (a collision), the rows are grouped by exact sorting.
    """
    n = parents.shape[0]
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    h = hasher(parents, rows)  # [n]
    order = np.argsort(h, kind="stable")  # [n]
    hs = h[order]
    starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])  # [G]
    gid_sorted = np.cumsum(np.r_[True, hs[1:] != hs[:-1]]) - 1  # [n]
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = gid_sorted
    first = order[starts]  # [G]
    lead = first[inverse]  # [n]
    if (parents[lead] == parents).all() and (rows[lead] == rows).all():
        counts = np.diff(np.r_[starts, n])
        return inverse, first.astype(np.int64), counts.astype(np.int64)
    keyed = np.column_stack([parents.astype(np.int64), rows.astype(np.int64)])  # [n, 1 + B]
    _, first, inverse, counts = np.unique(keyed, axis=0, return_index=True, return_inverse=True, return_counts=True)
    return inverse.reshape(-1).astype(np.int64), first.astype(np.int64), counts.astype(np.int64)


@dataclass(frozen=True)
class BlockTrie:
    """The block-granular trie of a batch, restricted to nodes shared by at least two prompts.

    A node covers blocks `depth`..`last` (tokens [depth * B, (last + 1) * B)): a run of trie levels that the very
    same prompts share is stored once. `count` is the number of prompts with these blocks; `plan_count` the number
    of those that may share them in a plan (prompt longer than (last + 1) * B, so at least one own token remains).
    Nodes are numbered parents first.
    """

    block_size: int
    lengths: np.ndarray  # [N] int64
    depth: np.ndarray  # [K] int64 first block
    last: np.ndarray  # [K] int64 last block
    parent: np.ndarray  # [K] int64, -1 at the top
    count: np.ndarray  # [K] int64
    plan_count: np.ndarray  # [K] int64
    rep: np.ndarray  # [K] int64, a member (a plan member where the node has one)
    deepest: np.ndarray  # [N] int64, deepest node with plan_count >= 2 where the request is a plan member, else -1
    radix_tokens: int


class _NodeStore:
    """Growable per-node columns while the trie is built (local to one build)."""

    COLUMNS = ("depth", "last", "parent", "count", "plan_count", "rep")

    def __init__(self) -> None:
        self.size = 0
        self.cols = {c: np.zeros(1024, dtype=np.int64) for c in self.COLUMNS}

    def add(self, **values: np.ndarray) -> np.ndarray:
        """Append nodes (one array per column, equal lengths); returns their ids."""
        k = len(next(iter(values.values())))
        need = self.size + k
        if need > self.cols["depth"].shape[0]:
            cap = max(need, 2 * self.cols["depth"].shape[0])
            for c, arr in self.cols.items():
                grown = np.zeros(cap, dtype=np.int64)
                grown[: self.size] = arr[: self.size]
                self.cols[c] = grown
        for c, v in values.items():
            self.cols[c][self.size : need] = v
        ids = np.arange(self.size, need, dtype=np.int64)
        self.size = need
        return ids

    def column(self, name: str) -> np.ndarray:
        return self.cols[name][: self.size]


def _as_words(rows: np.ndarray) -> np.ndarray:
    """A [n, W] int64 view of C-contiguous rows [n, B] when their bytes fill whole words, else rows; for equality."""
    if rows.flags.c_contiguous and (rows.shape[1] * rows.itemsize) % 8 == 0 and rows.itemsize < 8:
        return rows.view(np.int64)
    return rows


def split_by_block(par: np.ndarray, rows: np.ndarray, hasher=_hash_rows) -> tuple[np.ndarray, np.ndarray]:
    """Children of each parent run by the next block's tokens; changes nothing.

    par [n] parent node of each row, equal values contiguous; rows [n, B] the next block of each request.
    Returns (child [n] child index of each row, first [C] a row of each child). Children are numbered so that
    child indices are non-decreasing along the rows whenever no row differs from its run's first row (the common
    case inside a long shared prefix, where this costs one comparison per token and no sort).
    """
    new_run = np.r_[True, par[1:] != par[:-1]]  # [n]
    run_start = np.flatnonzero(new_run)  # [R]
    run_id = np.cumsum(new_run) - 1  # [n]
    words = _as_words(rows)  # [n, W] the same bytes, fewer and wider elements where possible
    same = (words == words[run_start][run_id]).all(axis=1)  # [n] equal to the run's pilot row
    if same.all():
        return run_id, run_start
    child = run_id.copy()
    other = np.flatnonzero(~same)  # rows that left their pilot: group them exactly among themselves
    inv, first, _ = group_rows(par[other], rows[other], hasher)
    child[other] = run_start.shape[0] + inv
    firsts = np.concatenate([run_start, other[first]])
    return child, firsts


class _Window:
    """Tokens [lo, hi) of the requests still sharing, copied from the source; refilled (twice as wide each time,
    within a token budget) when the trie walk passes `hi`. Local to one build."""

    def __init__(self, source: TokenSource, block_size: int, budget: int) -> None:
        self.source, self.bsz, self.budget = source, block_size, budget
        self.lo = self.hi = 0
        self.blocks_wide = 4
        self.pos = np.full(source.num_requests, -1, dtype=np.int64)  # [N] where a request's slice begins
        self.flat = np.zeros(0, dtype=np.int32)
        self.blocks = None

    def ensure(self, req: np.ndarray, start: int) -> None:
        """Make [start, start + B) readable for every request in `req` (refill if needed)."""
        if start + self.bsz <= self.hi:
            return
        wide = max(1, min(self.blocks_wide, self.budget // max(1, req.shape[0] * self.bsz)))
        self.blocks_wide *= 2
        self.lo, self.hi = start, start + wide * self.bsz
        self.flat, offsets = self.source.window(req, self.lo, self.hi)
        self.pos[req] = offsets
        # [len - B + 1, B] view: row p is flat[p:p + B]; indexing it copies whole blocks (no [n, B] index array)
        fits = self.flat.size >= self.bsz
        self.blocks = np.lib.stride_tricks.sliding_window_view(self.flat, self.bsz) if fits else None

    def full_rows(self, req: np.ndarray, start: int) -> np.ndarray:
        """Block [start, start + B) of each request (all long enough).  -> [n, B]"""
        return self.blocks[self.pos[req] + (start - self.lo)]

    def tail_rows(self, req: np.ndarray, start: int, rem: np.ndarray) -> np.ndarray:
        """Tokens [start, start + rem) of each request padded with -1 to B.  -> [n, B] int64"""
        cols = np.arange(self.bsz, dtype=np.int64)  # [B]
        idx = np.minimum((self.pos[req] + (start - self.lo))[:, None] + cols, self.flat.shape[0] - 1)  # [n, B]
        return np.where(cols < rem[:, None], self.flat[idx], -1)


def build_block_trie(
    source: TokenSource, block_size: int, hasher=_hash_rows, window_tokens: int = WINDOW_TOKENS
) -> BlockTrie:
    """Build the block trie and the radix figure of `source` (see the module docstring); changes nothing.

    hasher: row hash used to group blocks (results never depend on it); window_tokens: most tokens copied at once.
    """
    bsz = int(block_size)
    lengths = source.lengths
    window = _Window(source, bsz, window_tokens)
    n_req = lengths.shape[0]
    nodes = _NodeStore()
    deepest = np.full(n_req, -1, dtype=np.int64)
    radix_par, radix_rows, radix_len = [], [], []  # per level: distinct continuations under each shared parent
    radix_alone = 0  # tokens of prompts after the block where they stop sharing with anyone
    act = np.arange(n_req, dtype=np.int64)  # requests whose previous-level node is shared, grouped by that node
    par = np.full(n_req, -1, dtype=np.int64)  # [n] their node at the previous level (-1: the root)
    level = 0
    while act.size:
        s = level * bsz
        rem = lengths[act] - s  # [n] tokens from this block on (0: the prompt ended at the previous block)
        window.ensure(act[rem > 0], s)
        run = np.cumsum(np.r_[True, par[1:] != par[:-1]]) - 1  # [n] parent run (equal parents are contiguous)
        tail = np.flatnonzero((rem > 0) & (rem < bsz))  # prompts ending inside this block
        full = rem >= bsz
        act_all, par_all = act, par
        act, par, run_full = act[full], par[full], run[full]
        child = first = rows = None
        if act.size:
            rows = window.full_rows(act, s)  # [n, B] copy of each request's block
            child, first = split_by_block(par, rows, hasher)
        # Distinct continuations (children and tails) per parent: a lone one adds its length to the radix count,
        # the others are kept for the within-block count.
        n_cont = np.bincount(run[tail], minlength=int(run[-1]) + 1)  # [R]
        if first is not None:
            n_cont += np.bincount(run_full[first], minlength=n_cont.shape[0])
        crowded = n_cont >= 2  # [R]
        if tail.size:
            t_crowd = crowded[run[tail]]
            radix_alone += int(rem[tail[~t_crowd]].sum())
            t_sel = tail[t_crowd]
            if t_sel.size:
                t_req, t_rem = act_all[t_sel], rem[t_sel]
                radix_rows.append(window.tail_rows(t_req, s, t_rem))  # [t, B], -1 padded
                radix_par.append(par_all[t_sel])
                radix_len.append(t_rem)
        if first is None:
            break
        c_crowd = crowded[run_full[first]]  # [C]
        radix_alone += bsz * int((~c_crowd).sum())
        radix_rows.append(rows[first[c_crowd]])
        radix_par.append(par[first[c_crowd]])
        radix_len.append(np.full(int(c_crowd.sum()), bsz, dtype=np.int64))
        counts = np.bincount(child, minlength=first.shape[0])  # [C]
        alone = counts[child] == 1
        radix_alone += int((lengths[act[alone]] - (s + bsz)).sum())
        shared = np.flatnonzero(counts >= 2)  # [S] children shared by >= 2 prompts
        if not shared.size:
            break
        keep = np.flatnonzero(~alone)
        if (np.diff(child[keep]) < 0).any():
            keep = keep[np.argsort(child[keep], kind="stable")]  # members of each child contiguous again
        child_par = par[first]  # [C]
        act, child = act[keep], child[keep]
        is_plan = lengths[act] > s + bsz  # [n] keeps >= 1 own token after this block
        pcounts = np.bincount(child[is_plan], minlength=counts.shape[0])  # [C]
        # A child with exactly its parent's prompts (and plan members) extends the parent's node by one block.
        p = child_par[shared]
        ext = p >= 0
        ext[ext] = (counts[shared][ext] == nodes.column("count")[p[ext]]) & (
            pcounts[shared][ext] == nodes.column("plan_count")[p[ext]]
        )
        node_of = np.full(counts.shape[0], -1, dtype=np.int64)
        node_of[shared[ext]] = p[ext]
        nodes.column("last")[p[ext]] = level
        fresh = shared[~ext]
        if fresh.size:
            rep = act[np.flatnonzero(np.r_[True, child[1:] != child[:-1]])]  # [S] first member of each shared child
            plan_pos = np.flatnonzero(is_plan)
            if plan_pos.size:
                c_plan = child[plan_pos]
                lead = plan_pos[np.r_[True, c_plan[1:] != c_plan[:-1]]]  # first plan member of each child with one
                rep_of = np.full(counts.shape[0], -1, dtype=np.int64)
                rep_of[child[lead]] = act[lead]
                rep = np.where(rep_of[shared] >= 0, rep_of[shared], rep)
            level_col = np.full(fresh.shape[0], level, dtype=np.int64)
            node_of[fresh] = nodes.add(
                depth=level_col,
                last=level_col,
                parent=child_par[fresh],
                count=counts[fresh],
                plan_count=pcounts[fresh],
                rep=rep[~ext],
            )
        par = node_of[child]
        deep = is_plan & (pcounts[child] >= 2)
        deepest[act[deep]] = par[deep]
        level += 1

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    radix = radix_alone + _distinct_prefixes(cat(radix_par), _cat_rows(radix_rows, bsz), cat(radix_len))
    return BlockTrie(
        block_size=bsz,
        lengths=lengths,
        **{c: nodes.column(c).copy() for c in _NodeStore.COLUMNS},
        deepest=deepest,
        radix_tokens=int(radix),
    )


def _cat_rows(parts: list[np.ndarray], width: int) -> np.ndarray:
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros((0, width), dtype=np.int64)


def _distinct_prefixes(parents: np.ndarray, rows: np.ndarray, lengths: np.ndarray) -> int:
    """Number of distinct non-empty (parent, row[:r]) prefixes; changes nothing.

    parents [R], rows [R, B] padded with -1 after `lengths` [R]. A row alone under its parent adds its length;
    the others, sorted lexicographically, add their length minus their longest common prefix with the previous
    row of the same parent.
    """
    if rows.shape[0] == 0:
        return 0
    per_parent = np.bincount(parents + 1)  # parents >= -1
    crowded = per_parent[parents + 1] >= 2
    total = int(lengths[~crowded].sum())
    rows, parents, lengths = rows[crowded], parents[crowded], lengths[crowded]
    if rows.shape[0] == 0:
        return total
    keys = tuple(rows[:, k] for k in range(rows.shape[1] - 1, -1, -1)) + (parents,)
    order = np.lexsort(keys)  # [R]
    rows, parents, lengths = rows[order], parents[order], lengths[order]
    eq = rows[1:] == rows[:-1]  # [R-1, B]
    lcp = np.where(eq.all(axis=1), rows.shape[1], eq.argmin(axis=1))
    lcp = np.minimum(lcp, np.minimum(lengths[1:], lengths[:-1]))
    lcp = np.where(parents[1:] == parents[:-1], lcp, 0)
    return total + int(lengths.sum() - lcp.sum())

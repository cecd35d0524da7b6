"""Prefix plans: which prompt tokens the engine computes once for several requests, and how requests are grouped.

Three modes, all cut from the same prefix tree (`tree.build_prefix_tree`: built over blocks, then each node's end
extended to the token, up to block_size - 1 tokens past a block boundary):

- "nested": every node of the compressed tree is kept. A node has k >= 2 requests and >= 1 token (its block-aligned
  range was >= 1 block), so it always saves (k - 1) * len tokens. Plan tokens: each shared block chain once, with
  the tokens its requests also share in the block after it, plus each request's own tokens (always >= 1, the
  engine needs the last prompt token's logits).
- "one-level": the BatchLLM paper's flattening, run on the same tree: bottom-up, a candidate group g below node c
  is hoisted (c's tokens copied in front of g, g becomes a group of its own) when
  `(leaves(g) - 1) * len(g) - len(c) > 0`, otherwise dissolved into c (its tokens go into its requests' own parts);
  a node left with fewer than two requests dissolves into its parent. Surviving top-level candidates are the groups,
  each with one shared prefix [0, end).
- "none": no sharing; every request is a group of its own.

Nested never computes more tokens than any one-level plan cut from the same tree: every shared chain it computes
once is computed at least once there too, and its own parts are the shortest any such plan may use. Ends need not
be block-aligned: the engine starts a sequence mid-block (see `batchllm.request`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from batchllm.prefix.tree import PrefixTree, TokenSource, as_token_source, build_prefix_tree

MODES = ("nested", "one-level", "none")


@dataclass(frozen=True)
class PlanNode:
    """A shared segment: tokens prompts[request][start:end] computed once for the `num_requests` requests below."""

    node_id: int  # index into PrefixPlan.nodes
    parent: int  # node_id of the enclosing shared node, -1 at the top
    start: int  # absolute position where this node's own tokens begin (== parent's end; 0 at the top)
    end: int  # exclusive absolute end: a block boundary plus 0 .. block_size - 1 tokens; end > start
    request: int  # a request under this node whose prompt carries the tokens
    num_requests: int  # requests below this node


@dataclass(frozen=True)
class PlanStats:
    """Figures of one plan (token counts are prompt tokens)."""

    mode: str
    block_size: int
    num_requests: int
    logical_tokens: int  # sum of prompt lengths
    radix_tokens: int  # tokens of the token-granular compressed prefix tree: the optimum ignoring blocks
    plan_tokens: int  # tokens the engine computes: node lengths + own lengths
    shared_tokens: int  # sum of node lengths
    saving_ratio: float  # (logical - plan) / logical
    radix_saving_ratio: float  # (logical - radix) / logical
    num_groups: int  # groups with a node
    num_standalone: int  # requests in no group
    num_nodes: int
    max_depth: int  # nodes on the longest chain
    degree_min: int  # requests per group with a node (0 when there is none)
    degree_median: float
    degree_max: int
    degree_mean: float
    degree_histogram: tuple[tuple[str, int], ...]  # ("2", n), ("3-4", n), ("5-8", n), ... (non-empty)
    plan_seconds: float

    def to_dict(self) -> dict:
        """A JSON-able dict of the figures (histogram as a dict)."""
        out = asdict(self)
        out["degree_histogram"] = dict(self.degree_histogram)
        return out


@dataclass(frozen=True)
class PrefixPlan:
    """How a batch's prompts are computed: shared nodes, each request's deepest node, and execution groups."""

    block_size: int
    nodes: tuple[PlanNode, ...]  # parents before children
    leaf_parent: tuple[int, ...]  # per request: deepest node above it, or -1
    groups: tuple[tuple[int, ...], ...]  # per top-level node its requests; each standalone request alone
    group_root: tuple[int, ...]  # per group: its top-level node id, or -1
    stats: PlanStats

    def own_start(self, request: int) -> int:
        """Position where the request's own tokens begin (end of its leaf parent, 0 if standalone)."""
        lp = self.leaf_parent[request]
        return 0 if lp < 0 else self.nodes[lp].end

    def max_chain_blocks(self, totals: Sequence[int]) -> int:
        """The most KV blocks one request's chain holds at its end: its nodes' blocks and its own, where request j
        ends at `totals[j]` tokens (prompt and output). A sequence that starts mid-block holds its first block
        whole, so under nodes that end mid-block a chain may take one block per level more than the request alone
        (block-aligned ends take exactly the request's own count)."""
        bs = self.block_size

        def blocks(start: int, end: int) -> int:
            return -(-(end - start // bs * bs) // bs)

        chain = [0] * len(self.nodes)  # blocks of each node and the nodes above it (parents come first)
        for k, node in enumerate(self.nodes):
            chain[k] = blocks(node.start, node.end) + (chain[node.parent] if node.parent >= 0 else 0)
        return max((blocks(self.own_start(j), int(t)) + (chain[lp] if lp >= 0 else 0)
                    for j, (t, lp) in enumerate(zip(totals, self.leaf_parent))), default=0)

    def chain(self, request: int) -> tuple[int, ...]:
        """Node ids from the top-level node down to the request's leaf parent (empty if standalone)."""
        out = []
        k = self.leaf_parent[request]
        while k >= 0:
            out.append(k)
            k = self.nodes[k].parent
        return tuple(reversed(out))


@dataclass(frozen=True)
class _Layout:
    """A plan as arrays: nodes parents first, leaf parent per request."""

    start: np.ndarray  # [K] int64
    end: np.ndarray  # [K] int64
    parent: np.ndarray  # [K] int64
    count: np.ndarray  # [K] int64
    rep: np.ndarray  # [K] int64
    leaf_parent: np.ndarray  # [N] int64


def _nested_layout(tree: PrefixTree) -> _Layout:
    """Every node of the compressed tree; changes nothing."""
    return _Layout(tree.start, tree.end, tree.parent, tree.count, tree.rep, tree.leaf_parent)


def _none_layout(tree: PrefixTree) -> _Layout:
    """No nodes; changes nothing."""
    e = np.zeros(0, dtype=np.int64)
    return _Layout(e, e, e, e, e, np.full(tree.lengths.shape[0], -1, dtype=np.int64))


def _one_level_layout(tree: PrefixTree) -> _Layout:
    """The paper's bottom-up flattening with its gain rule (see the module docstring); changes nothing."""
    k = tree.num_nodes
    n = tree.lengths.shape[0]
    end = tree.end.tolist()
    length = (tree.end - tree.start).tolist()
    parent = tree.parent.tolist()
    lp = tree.leaf_parent
    leaves = np.bincount(lp[lp >= 0], minlength=k).tolist()  # requests attached directly, grows as groups dissolve
    target = [-1] * k  # where a node's requests went: itself (a final group), an ancestor, or -1 (standalone)
    final = [False] * k
    cands: list[list[int]] = [[] for _ in range(k)]  # candidate groups waiting at each node
    for p in range(k - 1, -1, -1):
        up = []
        for x in cands[p]:
            if (leaves[x] - 1) * (end[x] - end[p]) - length[p] > 0:
                up.append(x)
            else:
                target[x] = p
                leaves[p] += leaves[x]
        q = parent[p]
        if leaves[p] >= 2:
            up.append(p)
        else:
            target[p] = q
            if q >= 0:
                leaves[q] += leaves[p]
        if q >= 0:
            cands[q].extend(up)
        else:
            for x in up:
                final[x] = True
                target[x] = x
        cands[p] = []
    group_of = np.full(k, -1, dtype=np.int64)
    for v in range(k):  # targets are ancestors (smaller ids) or the node itself
        t = target[v]
        group_of[v] = v if final[v] else (group_of[t] if t >= 0 else -1)
    finals = np.flatnonzero(np.array(final, dtype=bool))
    new_id = np.full(k, -1, dtype=np.int64)
    new_id[finals] = np.arange(finals.shape[0])
    leaf_parent = _take(new_id, _take(group_of, lp, -1), -1)
    in_group = np.flatnonzero(leaf_parent >= 0)
    counts = np.bincount(leaf_parent[in_group], minlength=finals.shape[0])
    rep = np.full(finals.shape[0], -1, dtype=np.int64)
    g, first = np.unique(leaf_parent[in_group], return_index=True)
    rep[g] = in_group[first]
    assert n == leaf_parent.shape[0] and (counts == np.array(leaves, dtype=np.int64)[finals]).all()
    return _Layout(
        start=np.zeros(finals.shape[0], dtype=np.int64),
        end=tree.end[finals],
        parent=np.full(finals.shape[0], -1, dtype=np.int64),
        count=counts.astype(np.int64),
        rep=rep,
        leaf_parent=leaf_parent.astype(np.int64),
    )


_LAYOUTS = {"nested": _nested_layout, "one-level": _one_level_layout, "none": _none_layout}


def _take(values: np.ndarray, index: np.ndarray, fill: int) -> np.ndarray:
    """values[index] where index >= 0, `fill` elsewhere (values may be empty); changes nothing."""
    out = np.full(index.shape[0], fill, dtype=np.int64)
    ok = index >= 0
    out[ok] = values[index[ok]]
    return out


def _plan_tokens(layout: _Layout, lengths: np.ndarray) -> int:
    own_start = _take(layout.end, layout.leaf_parent, 0)
    return int((layout.end - layout.start).sum() + (lengths - own_start).sum())


def _roots_and_depths(layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """Top-level ancestor and chain length (1 at the top) of every node; changes nothing."""
    k = layout.start.shape[0]
    root = np.arange(k, dtype=np.int64)
    depth = np.ones(k, dtype=np.int64)
    par = layout.parent
    up = par.copy()
    while (moving := up >= 0).any():  # one step up per pass, max_depth passes
        root = np.where(moving, up, root)
        depth += moving
        up = np.where(moving, par[np.maximum(up, 0)], -1)
    return root, depth


def _histogram(degrees: np.ndarray) -> tuple[tuple[str, int], ...]:
    """Counts of group sizes in power-of-two buckets 2, 3-4, 5-8, ..., empty buckets left out; changes nothing."""
    out = []
    lo, hi = 2, 2
    top = int(degrees.max()) if degrees.size else 0
    while lo <= top:
        count = int(((degrees >= lo) & (degrees <= hi)).sum())
        if count:
            out.append((str(lo) if lo == hi else f"{lo}-{hi}", count))
        lo, hi = hi + 1, 2 * hi
    return tuple(out)


def _assemble(tree: PrefixTree, layout: _Layout, mode: str, t0: float) -> PrefixPlan:
    """Turn a layout into the public PrefixPlan with its stats; changes nothing."""
    lengths = tree.lengths
    n = lengths.shape[0]
    k = layout.start.shape[0]
    roots, depths = _roots_and_depths(layout)
    top = np.flatnonzero(layout.parent < 0)  # [G] ascending node ids
    req_root = _take(roots, layout.leaf_parent, -1)  # [N]
    grouped = np.flatnonzero(req_root >= 0)
    order = grouped[np.argsort(req_root[grouped], kind="stable")]
    sizes = np.bincount(req_root[grouped], minlength=k)[top] if k else np.zeros(0, dtype=np.int64)
    split = np.split(order, np.cumsum(sizes)[:-1]) if top.size else []
    standalone = np.flatnonzero(req_root < 0)
    groups = tuple(tuple(g.tolist()) for g in split) + tuple((i,) for i in standalone.tolist())
    group_root = tuple(top.tolist()) + (-1,) * standalone.shape[0]
    nodes = tuple(
        PlanNode(node_id=i, parent=p, start=s, end=e, request=r, num_requests=c)
        for i, (p, s, e, r, c) in enumerate(
            zip(
                layout.parent.tolist(),
                layout.start.tolist(),
                layout.end.tolist(),
                layout.rep.tolist(),
                layout.count.tolist(),
            )
        )
    )
    logical = int(lengths.sum())
    plan_tokens = _plan_tokens(layout, lengths)
    degrees = sizes.astype(np.int64)
    stats = PlanStats(
        mode=mode,
        block_size=tree.block_size,
        num_requests=int(n),
        logical_tokens=logical,
        radix_tokens=tree.radix_tokens,
        plan_tokens=plan_tokens,
        shared_tokens=int((layout.end - layout.start).sum()),
        saving_ratio=(logical - plan_tokens) / logical if logical else 0.0,
        radix_saving_ratio=(logical - tree.radix_tokens) / logical if logical else 0.0,
        num_groups=int(top.shape[0]),
        num_standalone=int(standalone.shape[0]),
        num_nodes=int(k),
        max_depth=int(depths.max()) if k else 0,
        degree_min=int(degrees.min()) if degrees.size else 0,
        degree_median=float(np.median(degrees)) if degrees.size else 0.0,
        degree_max=int(degrees.max()) if degrees.size else 0,
        degree_mean=float(degrees.mean()) if degrees.size else 0.0,
        degree_histogram=_histogram(degrees),
        plan_seconds=time.perf_counter() - t0,
    )
    return PrefixPlan(
        block_size=tree.block_size,
        nodes=nodes,
        leaf_parent=tuple(layout.leaf_parent.tolist()),
        groups=groups,
        group_root=group_root,
        stats=stats,
    )


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def plan_batch(prompts: Sequence[Sequence[int]] | np.ndarray, block_size: int, mode: str = "nested",
               token_ends: bool = True) -> PrefixPlan:
    """Plan prefix sharing for a batch of token-id prompts (each of length >= 1); changes nothing.

    prompts: lists of ints, 1-D integer arrays, or a 2-D array of equal-length rows (fastest at scale).
    mode: "nested" (multi-level), "one-level" (the paper's flattening), "none" (no sharing).
    token_ends: False ends every node at a block boundary (see `PrefixPlan.max_chain_blocks`).
    """
    _check_mode(mode)
    t0 = time.perf_counter()
    source = prompts if isinstance(prompts, TokenSource) else as_token_source(prompts)
    tree = build_prefix_tree(source, block_size, token_ends)
    return _assemble(tree, _LAYOUTS[mode](tree), mode, t0)


def analyze_batch(prompts: Sequence[Sequence[int]] | np.ndarray, block_size: int) -> dict:
    """Figures to know before a run: logical, radix-optimal, nested, one-level and no-sharing prompt tokens, the
    savings, groups and sharing degrees. Builds the tree once; changes nothing. Returns a JSON-able dict."""
    t0 = time.perf_counter()
    source = prompts if isinstance(prompts, TokenSource) else as_token_source(prompts)
    tree = build_prefix_tree(source, block_size)
    nested = _assemble(tree, _nested_layout(tree), "nested", t0).stats
    one = _assemble(tree, _one_level_layout(tree), "one-level", t0).stats
    logical = nested.logical_tokens

    def saving(tokens: int) -> float:
        return (logical - tokens) / logical if logical else 0.0

    return {
        "num_requests": nested.num_requests,
        "block_size": nested.block_size,
        "logical_tokens": logical,
        "radix_tokens": nested.radix_tokens,
        "nested_plan_tokens": nested.plan_tokens,
        "one_level_plan_tokens": one.plan_tokens,
        "no_sharing_tokens": logical,
        "radix_saving_ratio": saving(nested.radix_tokens),
        "nested_saving_ratio": saving(nested.plan_tokens),
        "one_level_saving_ratio": saving(one.plan_tokens),
        "nested_num_groups": nested.num_groups,
        "one_level_num_groups": one.num_groups,
        "nested_num_nodes": nested.num_nodes,
        "nested_max_depth": nested.max_depth,
        "nested_sharing_degree": _degree_dict(nested),
        "one_level_sharing_degree": _degree_dict(one),
        "analyze_seconds": time.perf_counter() - t0,
    }


def _degree_dict(stats: PlanStats) -> dict:
    return {
        "min": stats.degree_min,
        "median": stats.degree_median,
        "max": stats.degree_max,
        "mean": stats.degree_mean,
        "histogram": dict(stats.degree_histogram),
    }

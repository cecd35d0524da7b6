"""The global prefix tree of a batch, built at block granularity with numpy (no per-token Python loops).

A plan node spans whole blocks plus a partial one at its end (see `extend_ends` below), so the tree the planner
needs is the trie over *blocks*: a trie node at block
depth `d` stands for the first `d + 1` blocks of a prompt, and its members are the prompts that start with them.
It is built level by level over the blocks of the prompts still sharing something:

    level d: gather block d of every active prompt                  -> rows [n, B]
             split each parent's rows by their tokens                -> children (exact)
             children with >= 2 members are trie nodes; their members stay active, the others drop out

so the work is proportional to the shared tokens plus one block per prompt. A row equal to its parent's first row
(the common case inside a long shared prefix) costs one comparison per token and no sort; the others are grouped
by a hash and then compared token by token with their group's first row, so a hash collision can never merge
different blocks (a collision falls back to exact row sorting). A child holding exactly its parent's prompts
extends the parent's node instead of adding one. Tokens are copied from the prompts in windows, only for the
prompts still active, so an unshared prompt costs one block and the input is never copied whole.

The same pass yields the radix figure (tokens in the token-granular compressed prefix tree = number of distinct
non-empty prefixes): the distinct prefixes ending inside block `d` under a node are counted from the distinct rows
(full blocks and partial tails) under that node by sorting them and taking the longest common prefix of sorted
neighbours; a prompt that is alone after block `d` adds all its remaining tokens.

`compress_tree` then turns the block trie into the compressed tree the plan uses: chains of trie nodes with the same
plan members (requests that keep >= 1 own token after the node) merge into one node `[start, end)`.

`extend_ends` last moves each node's end past its block boundary by the tokens every request below it shares there
(at most block_size - 1: a whole shared block would have continued the chain), keeping >= 1 own token per request;
a child node starts where its parent now ends. A shared prefix is then computed once to the token, not to the block:
the engine starts a sequence mid-block (its first block's leading slots stay unused), so nothing is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchllm.prefix.trie import BlockTrie, TokenSource, as_token_source, build_block_trie

__all__ = ["PrefixTree", "TokenSource", "as_token_source", "build_prefix_tree", "compress_tree", "extend_ends"]


@dataclass(frozen=True)
class PrefixTree:
    """The compressed prefix tree a plan is cut from.

    Node k covers tokens [start[k], end[k]) shared by `count[k]` >= 2 requests, each keeping >= 1 own token after
    `end[k]`; parents come before children and start[k] == end[parent[k]] (0 at the top). `leaf_parent[i]` is the
    deepest node request i sits under, or -1. From `compress_tree` every end is a multiple of block_size; after
    `extend_ends` an end lies 0 .. block_size - 1 tokens past one.
    """

    block_size: int
    lengths: np.ndarray  # [N] int64
    start: np.ndarray  # [K] int64
    end: np.ndarray  # [K] int64
    parent: np.ndarray  # [K] int64
    count: np.ndarray  # [K] int64
    rep: np.ndarray  # [K] int64, a request under the node
    leaf_parent: np.ndarray  # [N] int64
    radix_tokens: int

    @property
    def num_nodes(self) -> int:
        return int(self.start.shape[0])


def compress_tree(trie: BlockTrie) -> PrefixTree:
    """Merge chains of trie nodes shared by the same requests into single nodes; changes nothing.

    Only nodes with plan_count >= 2 take part. A node continues its parent's chain when both have the same
    plan_count (then every sharer of the parent goes on into it, and it is the parent's only such child).
    """
    bsz = trie.block_size
    alive = np.flatnonzero(trie.plan_count >= 2)  # [A] trie ids, parents first
    pcount = trie.plan_count
    par = trie.parent[alive]
    cont = np.zeros(alive.shape[0], dtype=bool)
    has_par = par >= 0
    cont[has_par] = pcount[par[has_par]] == pcount[alive[has_par]]
    is_top = ~cont
    comp_of = np.full(trie.depth.shape[0], -1, dtype=np.int64)  # trie id -> compressed id
    comp_of[alive[is_top]] = np.arange(int(is_top.sum()))
    depth = trie.depth[alive]
    # Fill each continuing node from its parent, shallowest first (a parent starts at a smaller depth).
    for d in np.unique(depth[cont]):
        sel = alive[cont & (depth == d)]
        comp_of[sel] = comp_of[trie.parent[sel]]
    k = int(is_top.sum())
    tops = alive[is_top]
    start = trie.depth[tops] * bsz
    has_cont = np.zeros(trie.depth.shape[0], dtype=bool)
    has_cont[trie.parent[alive[cont]]] = True
    bottoms = alive[~has_cont[alive]]  # exactly one per chain
    bottom = np.empty(k, dtype=np.int64)  # deepest trie node of each chain
    bottom[comp_of[bottoms]] = bottoms
    end = (trie.last[bottom] + 1) * bsz
    top_par = trie.parent[tops]
    parent = np.full(k, -1, dtype=np.int64)
    parent[top_par >= 0] = comp_of[top_par[top_par >= 0]]
    leaf_parent = np.full(trie.deepest.shape[0], -1, dtype=np.int64)
    leaf_parent[trie.deepest >= 0] = comp_of[trie.deepest[trie.deepest >= 0]]
    return PrefixTree(
        block_size=bsz,
        lengths=trie.lengths,
        start=start.astype(np.int64),
        end=end,
        parent=parent.astype(np.int64),
        count=pcount[tops].astype(np.int64),
        rep=trie.rep[bottom].astype(np.int64),
        leaf_parent=leaf_parent.astype(np.int64),
        radix_tokens=trie.radix_tokens,
    )


PAIRS_PER_PASS = 1 << 18  # (node, request) pairs whose next block extend_ends compares at once ([n, B] int64 each)


def extend_ends(tree: PrefixTree, source: TokenSource) -> PrefixTree:
    """The block-aligned `tree` with every node's end moved past its block boundary by the tokens all requests below
    the node share there, each keeping >= 1 own token; starts follow their parents' ends. Changes nothing."""
    k = tree.num_nodes
    if k == 0:
        return tree
    bsz = tree.block_size
    # (node, request) pairs: each request with every node on its chain
    req = np.flatnonzero(tree.leaf_parent >= 0)
    node = tree.leaf_parent[req]
    pair_req, pair_node = [req], [node]
    up = tree.parent[node]
    while (on := up >= 0).any():
        req, up = req[on], up[on]
        pair_req.append(req)
        pair_node.append(up)
        up = tree.parent[up]
    pair_req = np.concatenate(pair_req)  # [P]
    pair_node = np.concatenate(pair_node)  # [P]
    ext = np.full(k, bsz - 1, dtype=np.int64)  # [K]
    np.minimum.at(ext, pair_node, tree.lengths[pair_req] - tree.end[pair_node] - 1)  # one own token each
    pair_end = tree.end[pair_node]  # [P]
    for end in np.unique(pair_end).tolist():  # one window read per block boundary
        at = np.flatnonzero(pair_end == end)
        for lo in range(0, at.shape[0], PAIRS_PER_PASS):
            sel = at[lo:lo + PAIRS_PER_PASS]
            nodes, inv = np.unique(pair_node[sel], return_inverse=True)
            rows = _next_block(source, pair_req[sel], end, bsz)  # [n, B]
            ref = _next_block(source, tree.rep[nodes], end, bsz)[inv.reshape(-1)]  # [n, B] the node's rep
            differ = rows != ref  # [n, B]
            first = np.where(differ.any(axis=1), differ.argmax(axis=1), bsz)  # [n] shared tokens of each pair
            np.minimum.at(ext, pair_node[sel], first)
    assert (ext >= 0).all() and (ext < bsz).all()
    end = tree.end + ext
    start = np.where(tree.parent >= 0, end[np.maximum(tree.parent, 0)], 0)
    return PrefixTree(block_size=bsz, lengths=tree.lengths, start=start.astype(np.int64), end=end.astype(np.int64),
                      parent=tree.parent, count=tree.count, rep=tree.rep, leaf_parent=tree.leaf_parent,
                      radix_tokens=tree.radix_tokens)


def _next_block(source: TokenSource, req: np.ndarray, start: int, bsz: int) -> np.ndarray:
    """Tokens [start, start + bsz) of each request in `req`, padded with -1 past its end.  -> [n, B] int64"""
    flat, offsets = source.window(req, start, start + bsz)
    width = np.clip(source.lengths[req] - start, 0, bsz)  # [n]
    cols = np.arange(bsz, dtype=np.int64)  # [B]
    idx = np.minimum(offsets[:, None] + cols, max(flat.shape[0] - 1, 0))  # [n, B]
    taken = flat.astype(np.int64)[idx] if flat.shape[0] else np.zeros(idx.shape, dtype=np.int64)
    return np.where(cols < width[:, None], taken, -1)


def build_prefix_tree(source: TokenSource, block_size: int, token_ends: bool = True) -> PrefixTree:
    """The compressed prefix tree of `source`, its ends extended to the token (unless `token_ends` is False: then
    every end is a block boundary); changes nothing."""
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    tree = compress_tree(build_block_trie(source, block_size))
    return extend_ends(tree, source) if token_ends else tree

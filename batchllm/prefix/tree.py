"""The global prefix tree of a batch, built at block granularity with numpy (no per-token Python loops).

Nodes of the plan are block-aligned, so the tree the planner needs is the trie over *blocks*: a trie node at block
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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from batchllm.prefix.trie import BlockTrie, TokenSource, as_token_source, build_block_trie

__all__ = ["PrefixTree", "TokenSource", "as_token_source", "build_prefix_tree", "compress_tree"]


@dataclass(frozen=True)
class PrefixTree:
    """The compressed, block-aligned prefix tree a plan is cut from.

    Node k covers tokens [start[k], end[k]) shared by `count[k]` >= 2 requests, each keeping >= 1 own token after
    `end[k]`; parents come before children and start[k] == end[parent[k]] (0 at the top). `leaf_parent[i]` is the
    deepest node request i sits under, or -1.
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


def build_prefix_tree(source: TokenSource, block_size: int) -> PrefixTree:
    """The compressed block-aligned prefix tree of `source`; changes nothing."""
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return compress_tree(build_block_trie(source, block_size))

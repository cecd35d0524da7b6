"""From a prefix plan to scheduler sequences, and the order groups start in. Pure Python, no torch.

`build_sequences` turns every plan node into a *node* sequence and every (request, sample) into a *leaf* whose
`start` is its deepest node's end; `order_roots` sorts the groups (decode-heavy first for the "batchllm" policy,
input order for the streaming baselines) and returns the top-level sequences to queue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from batchllm.config import EngineConfig
from batchllm.kv.block_pool import block_hashes
from batchllm.prefix.plan import PrefixPlan, plan_batch
from batchllm.request import Sequence as Seq


@dataclass
class SequenceSet:
    nodes: list[Seq]  # plan order: parents before children
    leaves: list[Seq]  # one per planned prompt, in the plan's prompt order
    roots: list[Seq]  # top-level sequence of each group, in the order the groups should start


def plan_for_cache(prompts: Sequence[list[int]], totals: Sequence[int], block_size: int, mode: str,
                   kv_blocks: int) -> PrefixPlan:
    """The prefix plan of `prompts` (prompt j grows to `totals[j]` tokens) for a cache of `kv_blocks` blocks. Its
    nodes end to the token, unless a request's chain of blocks would then outgrow the whole cache: then at block
    boundaries, where a chain needs no more blocks than its request alone (so any request that fits runs)."""
    plan = plan_batch(prompts, block_size, mode=mode)
    if plan.nodes and plan.max_chain_blocks(totals) > kv_blocks:
        plan = plan_batch(prompts, block_size, mode=mode, token_ends=False)
    return plan


def build_sequences(plan: PrefixPlan, prompts: Sequence[list[int]], max_tokens: Sequence[int],
                    request_index: Sequence[int], sample_index: Sequence[int], policy: str,
                    prompt_logprobs: Sequence[tuple[int, int] | None] | None = None) -> SequenceSet:
    """Sequences for the planned prompts (prompt j is sample `sample_index[j]` of request `request_index[j]`).
    `prompt_logprobs[j]`: (k, first token position) when prompt j wants prompt logprobs; the rows that compute them
    are marked on its leaf and on every node above it (a shared position's logprobs are computed once)."""
    bs = plan.block_size
    nodes: list[Seq] = []
    for node in plan.nodes:
        parent = nodes[node.parent] if node.parent >= 0 else None
        seq = Seq(len(nodes), list(prompts[node.request][:node.end]), node.start, parent, is_node=True)
        nodes.append(seq)
        if parent is not None:
            parent.children.append(seq)
    caching = EngineConfig(policy=policy).caching
    leaves: list[Seq] = []
    for j, prompt in enumerate(prompts):
        lp = plan.leaf_parent[j]
        parent = nodes[lp] if lp >= 0 else None
        start = parent.num_tokens if parent is not None else 0
        leaf = Seq(len(nodes) + j, list(prompt), start, parent, is_node=False, request_index=request_index[j],
                   sample_index=sample_index[j], max_tokens=max_tokens[j])
        leaf.num_cached_tokens = start
        if caching:
            leaf.block_hashes = block_hashes(prompt, bs)
        if parent is not None:
            parent.children.append(leaf)
        leaves.append(leaf)
        want = prompt_logprobs[j] if prompt_logprobs is not None else None
        if want is not None:
            k, first = want
            for s in (leaf, *leaf.ancestors()):  # the row at position p gives token p + 1's logprob
                s.lp_from = min(s.lp_from, max(s.start, first - 1))
                s.lp_k = max(s.lp_k, k)
    for n in nodes:
        n.pending_children = len(n.children)
    for g, members in enumerate(plan.groups):
        for j in members:
            leaves[j].group = g
    return SequenceSet(nodes, leaves, order_roots(plan, nodes, leaves, policy))


def order_roots(plan: PrefixPlan, nodes: list[Seq], leaves: list[Seq], policy: str) -> list[Seq]:
    """Top-level sequences of the groups. "batchllm": by decode work per prefill token, largest first (ties keep
    the plan's order); the baselines: first come, first served (input order)."""
    keyed = []
    for g, (members, root) in enumerate(zip(plan.groups, plan.group_root)):
        top = nodes[root] if root >= 0 else leaves[members[0]]
        decode = sum(leaves[j].max_tokens for j in members)
        prefill = sum(leaves[j].num_tokens - leaves[j].start for j in members)
        if root >= 0:
            prefill += sum(n.num_tokens - n.start for n in top.walk() if n.is_node)
        arrival = min(leaves[j].request_index for j in members)
        keyed.append((decode / max(1, prefill), arrival, g, top))
    if policy == "batchllm":
        keyed.sort(key=lambda x: (-x[0], x[2]))
    else:
        keyed.sort(key=lambda x: (x[1], x[2]))
    return [top for *_, top in keyed]

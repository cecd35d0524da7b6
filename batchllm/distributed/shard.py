"""Prefix-affinity sharding: the global plan's groups spread over workers, balanced by cost. Pure Python, no torch.

A *piece* is a set of requests one worker runs together. Every group of the plan is one piece, unless its cost
exceeds the limit, `split_factor` times a worker's fair share. Such a group is cut along its prefix tree: into its
subtrees (each split again while over the limit) and the requests directly under its node; requests directly under
one node are cut into equal-count chunks, as many as the limit asks. Consecutive parts are then merged back while
the merged piece stays within the limit. So cuts fall between subgroups where the tree has any (a chat template
node over many system prompts is the common case), and each piece recomputes only the shared nodes its own members
need. A group's cut is kept only when it pays off: when it lowers the planned makespan (the largest worker cost
after LPT); otherwise the group stays whole, its prefix computed on one worker only. Pieces go to workers largest
first, each to the least loaded worker (LPT).

Cost of a piece = prompt tokens it computes (the union of its members' shared nodes, plus their own tokens)
+ the decode tokens it may produce (max_tokens). This equals what a single engine computes for those requests
under the "nested" plan: a node left with one member turns into that member's own tokens, the same count.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby

from batchllm.prefix.plan import PrefixPlan


@dataclass(frozen=True)
class ShardPlan:
    pieces: tuple[tuple[int, ...], ...]  # request indices of each piece
    piece_worker: tuple[int, ...]  # the worker of each piece
    piece_cost: tuple[int, ...]  # cost of each piece (prompt tokens it computes + max decode tokens)
    worker_cost: tuple[int, ...]
    worker_prompt_tokens: tuple[int, ...]  # prompt tokens each worker computes
    single_machine_prompt_tokens: int  # the plan's tokens on one engine
    logical_tokens: int

    @property
    def balance(self) -> float:
        """max / mean worker cost (1.0 is perfect)."""
        mean = sum(self.worker_cost) / len(self.worker_cost)
        return max(self.worker_cost) / mean if mean else 1.0

    @property
    def saving_kept(self) -> float:
        """Prefix saving of the sharded run as a fraction of the single-machine saving."""
        single = self.logical_tokens - self.single_machine_prompt_tokens
        sharded = self.logical_tokens - sum(self.worker_prompt_tokens)
        return sharded / single if single else 1.0

    def requests_of(self, worker: int) -> list[int]:
        return [r for piece, w in zip(self.pieces, self.piece_worker) if w == worker for r in piece]

    def pieces_of(self, worker: int) -> list[int]:
        """Indices of the worker's pieces, largest first (the order they were assigned in)."""
        mine = [i for i, w in enumerate(self.piece_worker) if w == worker]
        return sorted(mine, key=lambda i: (-self.piece_cost[i], i))


def pack_pieces(piece_sizes: Sequence[int], max_requests: int) -> list[list[int]]:
    """Consecutive pieces packed into engine calls of at most `max_requests` requests; a larger piece is a call of
    its own (pieces are never cut). Returns each call as positions into `piece_sizes`."""
    calls: list[list[int]] = []
    size = 0
    for i, n in enumerate(piece_sizes):
        if not calls or size + n > max_requests:
            calls.append([])
            size = 0
        calls[-1].append(i)
        size += n
    return calls


def calls_of_workers(shard: ShardPlan, max_requests: int) -> dict[int, list[list[int]]]:
    """Each worker's pieces (largest first) packed into engine calls of at most `max_requests` requests (whole
    pieces): worker -> calls, each a list of piece indices. Workers without pieces are left out."""
    out = {}
    for w in sorted(set(shard.piece_worker)):
        mine = shard.pieces_of(w)
        out[w] = [[mine[i] for i in call] for call in pack_pieces([len(shard.pieces[p]) for p in mine], max_requests)]
    return out


def prompt_tokens_of(plan: PrefixPlan, members: Sequence[int], prompt_lens: Sequence[int]) -> int:
    """Prompt tokens an engine computes for `members` alone: their shared nodes once, plus their own tokens."""
    nodes = {k for r in members for k in plan.chain(r)}
    shared = sum(plan.nodes[k].end - plan.nodes[k].start for k in nodes)
    return shared + sum(prompt_lens[r] - plan.own_start(r) for r in members)


def _split(plan: PrefixPlan, members: list[int], depth: int, limit: float,
           cost: Callable[[Sequence[int]], tuple[int, int]]) -> list[list[int]]:
    """Cuts `members` (in chain order, sharing the first `depth` nodes of their chains, costing more than `limit`)
    along the tree below them; returns the parts in chain order."""

    def below(r: int) -> int:  # the node under the shared ones on r's chain, -1 when r sits directly below them
        chain = plan.chain(r)
        return chain[depth] if len(chain) > depth else -1

    runs = [list(run) for _, run in groupby(members, key=below)]
    if len(runs) == 1 and below(members[0]) < 0:  # no tree below: equal-count chunks
        parts = min(len(members), math.ceil(cost(members)[0] / limit))
        size = math.ceil(len(members) / parts)
        return [members[i:i + size] for i in range(0, len(members), size)]
    units: list[list[int]] = []
    for run in runs:
        units += [run] if cost(run)[0] <= limit else _split(plan, run, depth + (below(run[0]) >= 0), limit, cost)
    return _merge(plan, units, limit, cost)


def _merge(plan: PrefixPlan, units: list[list[int]], limit: float,
           cost: Callable[[Sequence[int]], tuple[int, int]]) -> list[list[int]]:
    """Merges consecutive units (chain order) while the merged cost stays within `limit`. Two consecutive parts
    share exactly the common nodes of the chains where they meet, so a merge costs the sum minus those nodes."""
    out = [units[0]]
    total = cost(units[0])[0]
    for unit in units[1:]:
        c = cost(unit)[0]
        a, b = plan.chain(out[-1][-1]), plan.chain(unit[0])
        common = 0
        for x, y in zip(a, b):
            if x != y:
                break
            common += plan.nodes[x].end - plan.nodes[x].start
        if total + c - common <= limit:
            out[-1] = out[-1] + unit
            total += c - common
        else:
            out.append(unit)
            total = c
    return out


def lpt(costs: Sequence[int], loads: Sequence[int]) -> tuple[list[int], list[int]]:
    """Longest processing time first: each piece, largest first, to the least loaded worker, starting from the
    workers' current `loads`. Returns the worker of each piece and each worker's total cost."""
    heap = [(c, w) for w, c in enumerate(loads)]
    heapq.heapify(heap)
    worker = [0] * len(costs)
    load = list(loads)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        _, w = heapq.heappop(heap)
        worker[i] = w
        load[w] += costs[i]
        heapq.heappush(heap, (load[w], w))
    return worker, load


def shard_plan(plan: PrefixPlan, prompt_lens: Sequence[int], max_tokens: Sequence[int], num_workers: int,
               split_factor: float = 1.0) -> ShardPlan:
    """Assigns the plan's groups to `num_workers` workers, cutting an oversized group where that pays off."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if split_factor <= 0:
        raise ValueError(f"split_factor must be > 0, got {split_factor}")

    def cost(members: Sequence[int]) -> tuple[int, int]:
        prompt = prompt_tokens_of(plan, members, prompt_lens)
        return prompt + sum(max_tokens[r] for r in members), prompt

    groups = [sorted(g, key=lambda r: (plan.chain(r), r)) for g in plan.groups]
    costs = [cost(g) for g in groups]
    limit = split_factor * sum(c for c, _ in costs) / num_workers
    per_group = [[(tuple(g), *c)] for g, c in zip(groups, costs)]  # the pieces of each group: (members, cost, prompt)
    best = max(lpt([c for c, _ in costs], [0] * num_workers)[1])
    for gi in sorted((i for i, c in enumerate(costs) if c[0] > limit), key=lambda i: (-costs[i][0], i)):
        parts = [(tuple(part), *cost(part)) for part in _split(plan, groups[gi], 1, limit, cost)]
        trial = per_group[:gi] + [parts] + per_group[gi + 1:]
        makespan = max(lpt([c for ps in trial for _, c, _ in ps], [0] * num_workers)[1])
        if makespan < best:  # the cut pays off
            per_group[gi], best = parts, makespan
    pieces = [piece for ps in per_group for piece in ps]
    piece_worker, worker_cost = lpt([c for _, c, _ in pieces], [0] * num_workers)
    worker_prompt = [0] * num_workers
    for (_, _, prompt), w in zip(pieces, piece_worker):
        worker_prompt[w] += prompt
    return ShardPlan(
        pieces=tuple(p for p, _, _ in pieces),
        piece_worker=tuple(piece_worker),
        piece_cost=tuple(c for _, c, _ in pieces),
        worker_cost=tuple(worker_cost),
        worker_prompt_tokens=tuple(worker_prompt),
        single_machine_prompt_tokens=plan.stats.plan_tokens,
        logical_tokens=plan.stats.logical_tokens,
    )

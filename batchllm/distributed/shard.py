"""Prefix-affinity sharding: the global plan's groups spread over workers, balanced by cost. Pure Python, no torch.

A *piece* is a set of requests one worker runs together. Every group of the plan is one piece, unless its cost
exceeds `split_factor` times a worker's fair share: then it is cut into that many pieces (members kept in plan
order, so nested subgroups stay together), and each piece recomputes only the shared nodes its own members need.
Pieces go to workers largest first, each to the least loaded worker (LPT).

Cost of a piece = prompt tokens it computes (the union of its members' shared nodes, plus their own tokens)
+ the decode tokens it may produce (max_tokens). This equals what a single engine computes for those requests
under the "nested" plan: a node left with one member turns into that member's own tokens, the same count.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from batchllm.prefix.plan import PrefixPlan


@dataclass(frozen=True)
class ShardPlan:
    pieces: tuple[tuple[int, ...], ...]  # request indices of each piece
    piece_worker: tuple[int, ...]  # the worker of each piece
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


def prompt_tokens_of(plan: PrefixPlan, members: Sequence[int], prompt_lens: Sequence[int]) -> int:
    """Prompt tokens an engine computes for `members` alone: their shared nodes once, plus their own tokens."""
    nodes = {k for r in members for k in plan.chain(r)}
    shared = sum(plan.nodes[k].end - plan.nodes[k].start for k in nodes)
    return shared + sum(prompt_lens[r] - plan.own_start(r) for r in members)


def shard_plan(plan: PrefixPlan, prompt_lens: Sequence[int], max_tokens: Sequence[int], num_workers: int,
               split_factor: float = 1.0) -> ShardPlan:
    """Assign the plan's groups (split where one would overload a worker) to `num_workers` workers."""
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if split_factor <= 0:
        raise ValueError(f"split_factor must be > 0, got {split_factor}")

    def cost(members: Sequence[int]) -> tuple[int, int]:
        prompt = prompt_tokens_of(plan, members, prompt_lens)
        return prompt + sum(max_tokens[r] for r in members), prompt

    groups = [sorted(g, key=lambda r: (plan.chain(r), r)) for g in plan.groups]
    costs = [cost(g) for g in groups]
    fair = sum(c for c, _ in costs) / num_workers
    pieces: list[tuple[tuple[int, ...], int, int]] = []
    for members, (c, p) in zip(groups, costs):
        parts = min(len(members), math.ceil(c / (split_factor * fair))) if c > split_factor * fair else 1
        if parts == 1:
            pieces.append((tuple(members), c, p))
            continue
        size = math.ceil(len(members) / parts)
        for i in range(0, len(members), size):
            chunk = tuple(members[i:i + size])
            pieces.append((chunk, *cost(chunk)))
    order = sorted(range(len(pieces)), key=lambda i: (-pieces[i][1], i))
    heap = [(0, w) for w in range(num_workers)]
    worker_cost, worker_prompt = [0] * num_workers, [0] * num_workers
    piece_worker = [0] * len(pieces)
    for i in order:
        _, w = heapq.heappop(heap)
        piece_worker[i] = w
        worker_cost[w] += pieces[i][1]
        worker_prompt[w] += pieces[i][2]
        heapq.heappush(heap, (worker_cost[w], w))
    return ShardPlan(
        pieces=tuple(p for p, _, _ in pieces),
        piece_worker=tuple(piece_worker),
        worker_cost=tuple(worker_cost),
        worker_prompt_tokens=tuple(worker_prompt),
        single_machine_prompt_tokens=plan.stats.plan_tokens,
        logical_tokens=plan.stats.logical_tokens,
    )

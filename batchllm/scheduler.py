"""The scheduler: which sequences run in the next step, and how many tokens each. Pure Python, no torch.

There is no prefill or decode phase. Each sequence has `num_computed_tokens` and `num_tokens`; each step hands out a
token budget (`max_num_batched_tokens`), first to running sequences in priority order (decodes take 1 token, a long
prompt takes a chunk), then to waiting ones, so chunked prefill and decodes share a step.

Admission is memory-centric for the "batchllm" policy: a waiting sequence is admitted while the KV it is expected to
need (its prompt plus an estimate of its output, see `DecodeEstimator`) fits beside what the running sequences are
expected to grow to; there is no cap on the number of running sequences. The streaming baselines ("fcfs-cache",
"lpm-cache", "fcfs") admit on the blocks needed now, under a request cap, as vLLM and SGLang do.

When a running sequence cannot get a block, the blocks other leaves took ahead of their writes are handed back first
("batchllm"); then the most recently admitted running sequence is preempted (its own blocks are freed and it is
recomputed later). Shared nodes a running sequence needs are never evicted; a shared node whose
subtree is entirely waiting is evicted only when the last running sequence (or, with none running, the head of the
queue) cannot fit otherwise.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from batchllm.config import EngineConfig
from batchllm.kv.block_pool import BlockPool
from batchllm.request import Sequence, Status


@dataclass
class StepPlan:
    """One step: `seqs[i]` computes `num_new[i]` tokens starting at its `num_computed_tokens`."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def samples(self, i: int) -> bool:
        """Whether seqs[i] samples a token this step (a leaf whose tokens will then all be computed)."""
        s = self.seqs[i]
        return not s.is_node and s.num_computed_tokens + self.num_new[i] == s.num_tokens


class DecodeEstimator:
    """Expected final output length of a leaf. "max_tokens" trusts the bound; "history" scales it by the 90th
    percentile of (output length / max_tokens) over finished leaves: those of the leaf's own group once
    MIN_GROUP_HISTORY of them have finished (requests sharing a prefix tend to share an answer length), else the
    last WINDOW finished leaves of any group once MIN_HISTORY have finished."""

    MIN_HISTORY = 16
    MIN_GROUP_HISTORY = 4
    WINDOW = 512

    def __init__(self, mode: str):
        self.mode = mode
        self.ratios: deque[float] = deque(maxlen=self.WINDOW)
        self._q90 = 1.0
        self.group_ratios: dict[int, deque[float]] = {}
        self._group_q90: dict[int, float] = {}

    @staticmethod
    def _quantile90(values) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))]

    def observe(self, seq: Sequence) -> None:
        if seq.max_tokens > 0:
            ratio = seq.num_output_tokens / seq.max_tokens
            self.ratios.append(ratio)
            if len(self.ratios) >= self.MIN_HISTORY:
                self._q90 = self._quantile90(self.ratios)
            group = self.group_ratios.setdefault(seq.group, deque(maxlen=self.WINDOW))
            group.append(ratio)
            if len(group) >= self.MIN_GROUP_HISTORY:
                self._group_q90[seq.group] = self._quantile90(group)

    def forget_group(self, group: int) -> None:
        """Drops a finished group's history (its leaves will not be estimated again)."""
        self.group_ratios.pop(group, None)
        self._group_q90.pop(group, None)

    def final_len(self, seq: Sequence) -> int:
        """Expected total tokens of `seq` when it finishes (prompt + output)."""
        if seq.is_node:
            return seq.num_tokens
        out = seq.max_tokens
        if self.mode == "history":
            q90 = self._group_q90.get(seq.group)
            if q90 is None and len(self.ratios) >= self.MIN_HISTORY:
                q90 = self._q90
            if q90 is not None:
                out = min(seq.max_tokens, max(seq.num_output_tokens + 1, int(seq.max_tokens * q90 + 0.999)))
        return seq.num_prompt_tokens + out


class Scheduler:
    def __init__(self, cfg: EngineConfig, pool: BlockPool, max_num_seqs: int = 256):
        self.cfg = cfg
        self.pool = pool
        self.bs = cfg.block_size
        self.caching = cfg.policy in ("fcfs-cache", "lpm-cache")
        self.memory_centric = cfg.policy == "batchllm"
        self.max_num_seqs = None if self.memory_centric else max_num_seqs
        self.waiting: deque[Sequence] = deque()  # group roots not started yet, in group order
        self.ready: deque[Sequence] = deque()  # queued sequences of started groups: always admitted first
        self.running: list[Sequence] = []
        self.resident: list[Sequence] = []  # computed shared nodes holding KV for their children, oldest first
        self.pending_need = 0  # blocks reserved for queued sequences of started groups (memory-centric admission)
        self.estimator = DecodeEstimator(cfg.decode_estimate if self.memory_centric else "max_tokens")
        self.step_index = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add(self, roots: list[Sequence]) -> None:
        """Queue top-level sequences (group roots or standalone leaves) behind those already waiting."""
        self.waiting.extend(roots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.ready)

    def head(self) -> Sequence | None:
        """The sequence admission considers next: started groups' sequences first, then new group roots."""
        if self.ready:
            return self.ready[0]
        if not self.waiting:
            return None
        if self.cfg.policy == "lpm-cache" and len(self.waiting) <= 128:
            # SGLang's longest-prefix-match: the waiting request with the most cached prefix blocks goes first.
            best = max(self.waiting, key=self._cached_prefix_blocks)
            self.waiting.remove(best)
            self.waiting.appendleft(best)
        return self.waiting[0]

    def _pop_head(self) -> Sequence:
        return self.ready.popleft() if self.ready else self.waiting.popleft()

    def remove_queued(self, seq: Sequence) -> None:
        """Take a queued sequence out of whichever queue holds it."""
        for q in (self.ready, self.waiting):
            if seq in q:
                q.remove(seq)
                return

    def has_work(self) -> bool:
        return bool(self.waiting or self.ready or self.running)

    # --------------------------------------------------------------- schedule
    def schedule(self) -> StepPlan:
        """Choose this step's sequences and token counts; allocates their blocks (may preempt)."""
        self.step_index += 1
        plan = StepPlan()
        budget = self.cfg.max_num_batched_tokens
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._allocate_or_preempt(seq, n, plan):
                continue
            plan.seqs.append(seq)
            plan.num_new.append(n)
            budget -= n
        if not plan.preempted:
            self._admit(plan, budget)
        while not plan.seqs and not self.running and self.head() and self._evict_idle_node(self.head()):
            self._admit(plan, self.cfg.max_num_batched_tokens)
        return plan

    def _blocks_for(self, seq: Sequence, upto: int) -> int:
        """Own blocks `seq` needs to hold positions below `upto`."""
        return -(-(upto - seq.start) // self.bs)

    def _allocate(self, seq: Sequence, upto: int) -> bool:
        extra = self._blocks_for(seq, upto) - len(seq.blocks)
        if extra <= 0:
            return True
        if extra > self.pool.num_free:
            return False
        seq.blocks.extend(self.pool.allocate(extra))
        return True

    def _allocate_or_preempt(self, seq: Sequence, n: int, plan: StepPlan) -> bool:
        while not self._allocate(seq, seq.num_computed_tokens + n):
            if len(self.running) == 1 and self._evict_idle_node(seq):
                continue
            if self.memory_centric and self._release_unwritten(seq, plan):
                continue
            victim = self.running[-1]
            self._preempt(victim)
            plan.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s own blocks and queue it at the front for recomputation."""
        self.running.remove(seq)
        self._release(seq.blocks)
        seq.blocks = []
        seq.num_computed_tokens = seq.start
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._reserve_again(seq)
        self.ready.appendleft(seq)

    def _release(self, blocks: list[int]) -> None:
        # Caching baselines free tail blocks first so a prompt's head blocks stay cached longest (as vLLM does).
        self.pool.free(blocks[::-1] if self.caching else blocks)

    def _expected_growth(self) -> int:
        """Blocks the running sequences are still expected to allocate (memory-centric admission)."""
        total = 0
        for s in self.running:
            total += max(0, self._blocks_for(s, self.estimator.final_len(s)) - len(s.blocks))
        return total

    def _cached_prefix_blocks(self, seq: Sequence) -> int:
        n = 0
        for h in seq.block_hashes:
            if self.pool.lookup(h) is None:
                break
            n += 1
        return n

    def _admit(self, plan: StepPlan, budget: int) -> None:
        """Admit waiting sequences in queue order while their blocks fit (see the module docstring)."""
        growth = self._expected_growth() if self.memory_centric else 0
        while budget > 0 and (self.ready or self.waiting):
            if self.max_num_seqs is not None and len(self.running) >= self.max_num_seqs:
                return
            seq = self.head()
            hit = self._match_cache(seq) if self.caching else []
            revived = sum(1 for b in hit if self.pool.ref_count[b] == 0)
            computed = seq.start + len(hit) * self.bs
            n = min(seq.num_tokens - computed, budget)
            need_now = self._blocks_for(seq, computed + n) - len(hit)
            need = need_now + revived
            starts_group = self.memory_centric and seq.parent is None and not seq.group_started
            group_need = 0
            if self.memory_centric:
                future = max(0, self._blocks_for(seq, self.estimator.final_len(seq)) - len(hit) - need_now)
                if starts_group:
                    # A new group must fit beside every group already started, all members included, so that
                    # started groups finish instead of thrashing; with nothing started it goes ahead regardless.
                    group_need = self._group_reservation(seq)
                    if self.running or self.resident or self.pending_need:
                        need += future + group_need + self.pending_need
                elif self.running:
                    need += future
            if need + growth > self.pool.num_free:
                return
            self._pop_head()
            if starts_group:
                seq.group_started = True
                self.pending_need += group_need
            elif seq.reserved:
                self.pending_need -= seq.reserved
                seq.reserved = 0
            self.pool.touch(hit)
            seq.blocks = list(hit)
            seq.num_computed_tokens = computed
            if seq.admitted_step < 0:
                seq.num_cached_tokens = computed
            self._allocate(seq, computed + n)
            if self.memory_centric and not seq.is_node:
                self._allocate_ahead(seq, growth)
            seq.status = Status.RUNNING
            seq.admitted_step = self.step_index
            self.running.append(seq)
            plan.seqs.append(seq)
            plan.num_new.append(n)
            budget -= n
            if self.memory_centric:
                growth += max(0, self._blocks_for(seq, self.estimator.final_len(seq)) - len(seq.blocks))

    def _allocate_ahead(self, seq: Sequence, others_growth: int) -> None:
        """Give a leaf being admitted, now, every block it is expected to fill (prompt and estimated output), when they
        fit beside what the running sequences and the started groups are expected to need. The blocks then come from
        the queue in one run, mostly adjacent, instead of one at a time interleaved with every other decoding leaf's;
        a decode step reads each leaf's keys in long sequential runs (decode attention 5-14% faster on
        `mixed-output`). Admission already counted these blocks (`_expected_growth`), so it admits the same
        sequences; a leaf that stops early frees them when it finishes, and a leaf that outgrows its estimate while
        the pool is empty gets the unwritten ones back before anyone is preempted (`_release_unwritten`)."""
        extra = self._blocks_for(seq, self.estimator.final_len(seq)) - len(seq.blocks)
        if extra > 0 and extra + others_growth + self.pending_need <= self.pool.num_free:
            seq.blocks.extend(self.pool.allocate(extra))

    def _release_unwritten(self, needy: Sequence, plan: StepPlan) -> bool:
        """Before anyone is preempted: hand back the blocks other running leaves took ahead (`_allocate_ahead`) and
        have not reached, keeping those of this step's planned tokens. Returns whether any came back."""
        planned = {id(s): k for s, k in zip(plan.seqs, plan.num_new)}
        released = False
        for s in self.running:
            if s is needy or s.is_node:
                continue
            keep = self._blocks_for(s, s.num_computed_tokens + planned.get(id(s), 1))
            if len(s.blocks) > keep:
                self.pool.free(s.blocks[keep:])
                del s.blocks[keep:]
                released = True
        return released

    def _group_reservation(self, root: Sequence) -> int:
        """Reserve, on each sequence below `root`, the blocks it is expected to need; return their sum."""
        total = 0
        stack = list(root.children)
        while stack:
            s = stack.pop()
            s.reserved = self._blocks_for(s, self.estimator.final_len(s))
            total += s.reserved
            stack.extend(s.children)
        return total

    def _reserve_again(self, seq: Sequence) -> None:
        """A sequence of a started group returns to the queue: set its blocks aside again."""
        if self.memory_centric:
            seq.reserved = self._blocks_for(seq, self.estimator.final_len(seq))
            self.pending_need += seq.reserved

    def _unreserve(self, seq: Sequence) -> None:
        self.pending_need -= seq.reserved
        seq.reserved = 0

    def _match_cache(self, seq: Sequence) -> list[int]:
        """Cached blocks covering a prefix of `seq`'s prompt, leaving at least one token to compute."""
        hit = []
        for h in seq.block_hashes:
            b = self.pool.lookup(h)
            if b is None:
                break
            hit.append(b)
        if hit and len(hit) * self.bs >= seq.num_tokens:
            hit.pop()
        return hit

    def _evict_idle_node(self, keep: Sequence) -> bool:
        """Free the most recently computed shared node that no running sequence and no ancestor of `keep` needs: its
        subtree goes back to the queue (tail) to be recomputed. Returns False when there is none. Rare: it only
        happens when a KV budget close to one request's size meets shared nodes of other subtrees."""
        keep_ids = {id(a) for a in keep.ancestors()}
        for node in reversed(self.resident):
            if id(node) in keep_ids or self._subtree_running(node):
                continue
            self._reset_subtree(node)
            return True
        return False

    @staticmethod
    def _subtree_running(node: Sequence) -> bool:
        stack = list(node.children)
        while stack:
            s = stack.pop()
            if s.status is Status.RUNNING:
                return True
            stack.extend(s.children)
        return False

    def _reset_subtree(self, top: Sequence) -> None:
        """Return a resident node and everything under it to the not-yet-computed state; queue `top` last."""
        members, stack = set(), [top]
        while stack:
            s = stack.pop()
            members.add(id(s))
            stack.extend(s.children)
        self.waiting = deque(s for s in self.waiting if id(s) not in members)
        self.ready = deque(s for s in self.ready if id(s) not in members)
        stack = [top]
        while stack:
            s = stack.pop()
            if s.is_node and s.status is Status.COMPUTED:
                self.resident.remove(s)
                self._release(s.blocks)
                s.blocks = []
                s.pending_children = sum(1 for c in s.children if c.status is not Status.FINISHED)
                s.num_computed_tokens = s.start
                s.status = Status.WAITING
                s.num_preemptions += 1
                self._reserve_again(s)
                stack.extend(s.children)
        self.num_preemptions += 1
        self.ready.append(top)

    # ----------------------------------------------------------------- update
    def commit(self, plan: StepPlan) -> None:
        """Mark the plan's tokens as computed. Nodes that became complete release their children to the front of
        the queue; caching policies register newly filled prompt blocks."""
        for seq, n in zip(plan.seqs, plan.num_new):
            before = seq.num_computed_tokens
            seq.num_computed_tokens += n
            if self.caching and seq.block_hashes:
                full = min(seq.num_computed_tokens // self.bs, len(seq.block_hashes))
                for i in range(before // self.bs, full):
                    self.pool.cache(seq.blocks[i], seq.block_hashes[i])
            if seq.is_node and seq.num_computed_tokens == seq.num_tokens:
                self.running.remove(seq)
                self.resident.append(seq)
                seq.status = Status.COMPUTED
                self.ready.extendleft(reversed([c for c in seq.children if c.status is not Status.FINISHED]))

    def finish(self, seq: Sequence) -> None:
        """A leaf is done: free its blocks, and those of every node it was the last pending child of."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.remove_queued(seq)
        self._unreserve(seq)
        self._release(seq.blocks)
        seq.blocks = []
        seq.status = Status.FINISHED
        self.estimator.observe(seq)
        if seq.parent is None:  # a group of one
            self.estimator.forget_group(seq.group)
        node = seq.parent
        while node is not None:
            node.pending_children -= 1
            if node.pending_children > 0:
                break
            self._release(node.blocks)
            node.blocks = []
            if node.status is Status.COMPUTED:
                self.resident.remove(node)
            elif node.status is Status.WAITING:
                self.remove_queued(node)
            self._unreserve(node)
            node.status = Status.FINISHED
            if node.parent is None:  # the group's last request finished
                self.estimator.forget_group(seq.group)
            node = node.parent

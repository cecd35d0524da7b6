"""The scheduler: which sequences run in the next step, and how many tokens each. Pure Python, no torch.

There is no prefill or decode phase. Each sequence has `num_computed_tokens` and `num_tokens`; each step hands out a
token budget (`max_num_batched_tokens`), first to running sequences in priority order (decodes take 1 token, a long
prompt takes a chunk), then to waiting ones, so chunked prefill and decodes share a step. Which waiting sequence may
start is the admission policy's call (`batchllm.admission`); blocks come from the KVManager (`batchllm.kv.manager`),
which the scheduler never bypasses.

When a running sequence cannot get a block, the admission policy may free blocks others took ahead; then the most
recently admitted running sequence is preempted (its own blocks are freed and it is recomputed later). Shared nodes
a running sequence needs are never evicted; a shared node whose subtree is entirely waiting is evicted only when the
last running sequence (or, with none running, the head of the queue) cannot fit otherwise.

    add(roots)        queue group roots (and standalone leaves)
    schedule()        plan a step: allocates its blocks (may preempt)          -> StepPlan
    commit(plan)      its tokens are computed: nodes release their children
    finish(leaf)      a leaf is done: free its blocks, and its nodes' when it was their last pending child
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from batchllm.admission import Admission, make_admission
from batchllm.config import EngineConfig
from batchllm.kv.manager import KVManager
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
        """Whether seqs[i] samples a token this step (a leaf with tokens to generate, whose tokens will then all be
        computed)."""
        s = self.seqs[i]
        return not s.is_node and s.max_tokens > 0 and s.num_computed_tokens + self.num_new[i] == s.num_tokens

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new.append(n)


class Scheduler:
    def __init__(self, cfg: EngineConfig, kv: KVManager | None = None, admission: Admission | None = None,
                 max_num_seqs: int = 256):
        self.cfg = cfg
        self.kv = kv or KVManager(cfg.kv_cache_blocks, cfg.block_size, caching=cfg.caching)
        self.admission = admission or make_admission(cfg.policy, self.kv, max_num_seqs, cfg.decode_estimate)
        self.waiting: deque[Sequence] = deque()  # group roots not started yet, in group order
        self.ready: deque[Sequence] = deque()  # queued sequences of started groups: always admitted first
        self.running: list[Sequence] = []
        self.resident: list[Sequence] = []  # computed shared nodes holding KV for their children, oldest first
        self.step_index = 0
        self.num_preemptions = 0

    # ------------------------------------------------------------------ queue
    def add(self, roots: list[Sequence]) -> None:
        """Queue top-level sequences (group roots or standalone leaves) behind those already waiting."""
        self.waiting.extend(roots)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting) + len(self.ready)

    def queued(self) -> list[Sequence]:
        """The queued sequences in admission order (started groups' first)."""
        return [*self.ready, *self.waiting]

    @property
    def reserved_blocks(self) -> int:
        """Blocks the admission policy sets aside for queued sequences of started groups."""
        return self.admission.reserved_blocks

    def head(self) -> Sequence | None:
        """The sequence admission considers next: started groups' sequences first, then new group roots."""
        if self.ready:
            return self.ready[0]
        if not self.waiting:
            return None
        self.admission.reorder(self.waiting)
        return self.waiting[0]

    def remove_queued(self, seq: Sequence) -> None:
        """Take a queued sequence out of whichever queue holds it."""
        for q in (self.ready, self.waiting):
            if seq in q:
                q.remove(seq)
                return

    def has_work(self) -> bool:
        return bool(self.waiting or self.ready or self.running)

    def check_integrity(self) -> None:
        """Raise AssertionError unless the KV blocks are exactly those the running sequences and resident nodes
        hold, and every running sequence holds the blocks of its computed tokens."""
        live = [*self.running, *self.resident]
        self.kv.check_integrity(live)
        for s in live:
            assert self.kv.missing(s, s.num_computed_tokens) == 0, f"{s} lacks blocks of its computed tokens"
        assert all(not s.blocks for s in self.queued()), "a queued sequence holds blocks"

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
            if self._allocate_or_preempt(seq, n, plan):
                plan.add(seq, n)
                budget -= n
        if not plan.preempted:
            self._admit(plan, budget)
        while not plan.seqs and not self.running and self.head() and self._evict_idle_node(self.head()):
            self._admit(plan, self.cfg.max_num_batched_tokens)
        return plan

    def _allocate_or_preempt(self, seq: Sequence, n: int, plan: StepPlan) -> bool:
        while not self.kv.allocate(seq, seq.num_computed_tokens + n):
            if len(self.running) == 1 and self._evict_idle_node(seq):
                continue
            planned = {id(s): k for s, k in zip(plan.seqs, plan.num_new)}
            if self.admission.release_for(seq, self.running, planned):
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
        self.kv.free(seq)
        seq.num_computed_tokens = seq.start
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.admission.requeued(seq)
        self.ready.appendleft(seq)

    def _admit(self, plan: StepPlan, budget: int) -> None:
        """Admit queued sequences in order while the admission policy lets them start (see the module docstring)."""
        admission, kv = self.admission, self.kv
        admission.begin(self.running)
        while budget > 0 and (self.ready or self.waiting):
            if admission.max_running is not None and len(self.running) >= admission.max_running:
                return
            seq = self.head()
            hit = kv.match_prefix(seq, seq.lp_from) if kv.caching else []  # scored rows are computed
            computed = seq.start + len(hit) * kv.block_size
            n = min(seq.num_tokens - computed, budget)
            need_now = kv.blocks_for(seq, computed + n) - len(hit) + kv.revive_cost(hit)
            if not admission.fits(seq, need_now, len(hit), bool(self.running), bool(self.resident)):
                return
            if self.ready:
                self.ready.popleft()
            else:
                self.waiting.popleft()
            if hit:
                kv.take_prefix(seq, hit)
            seq.num_computed_tokens = computed
            if seq.admitted_step < 0:
                seq.num_cached_tokens = computed
            kv.allocate(seq, computed + n)
            admission.admitted(seq)
            seq.status = Status.RUNNING
            seq.admitted_step = self.step_index
            self.running.append(seq)
            plan.add(seq, n)
            budget -= n

    def _evict_idle_node(self, keep: Sequence) -> bool:
        """Free the most recently computed shared node that no running sequence and no ancestor of `keep` needs: its
        subtree goes back to the queue (tail) to be recomputed. Returns False when there is none. Rare: it only
        happens when a KV budget close to one request's size meets shared nodes of other subtrees."""
        keep_ids = {id(a) for a in keep.ancestors()}
        for node in reversed(self.resident):
            if id(node) in keep_ids or any(s.status is Status.RUNNING for s in node.walk(self_too=False)):
                continue
            self._reset_subtree(node)
            return True
        return False

    def _reset_subtree(self, top: Sequence) -> None:
        """Return a resident node and everything under it to the not-yet-computed state; queue `top` last."""
        members = {id(s) for s in top.walk()}
        self.waiting = deque(s for s in self.waiting if id(s) not in members)
        self.ready = deque(s for s in self.ready if id(s) not in members)
        for s in top.walk():
            if s.is_node and s.status is Status.COMPUTED:
                self.resident.remove(s)
                self.kv.free(s)
                s.pending_children = sum(1 for c in s.children if c.status is not Status.FINISHED)
                s.num_computed_tokens = s.start
                s.status = Status.WAITING
                s.num_preemptions += 1
                self.admission.requeued(s)
        self.num_preemptions += 1
        self.ready.append(top)

    # ----------------------------------------------------------------- update
    def commit(self, plan: StepPlan) -> None:
        """Mark the plan's tokens as computed. Nodes that became complete release their children to the front of
        the queue; caching policies register newly filled prompt blocks."""
        for seq, n in zip(plan.seqs, plan.num_new):
            before = seq.num_computed_tokens
            seq.num_computed_tokens += n
            self.kv.cache_filled(seq, before, seq.num_computed_tokens)
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
        self.kv.free(seq)
        seq.status = Status.FINISHED
        self.admission.finished(seq)
        if seq.parent is None:  # a group of one
            self.admission.group_done(seq.group)
        node = seq.parent
        while node is not None:
            node.pending_children -= 1
            if node.pending_children > 0:
                break
            self.kv.free(node)
            if node.status is Status.COMPUTED:
                self.resident.remove(node)
            elif node.status is Status.WAITING:
                self.remove_queued(node)
            node.status = Status.FINISHED
            self.admission.finished(node)
            if node.parent is None:  # the group's last request finished
                self.admission.group_done(seq.group)
            node = node.parent

"""Scheduler: token budget, chunked prefill, admission, preemption, group lifetimes, with exact block ids.

Pure Python: sequences are built by hand and a fake model appends token 7 to every sampling leaf.
"""

from batchllm.admission import DecodeEstimator
from batchllm.config import EngineConfig
from batchllm.kv.block_pool import block_hashes
from batchllm.request import Sequence, Status
from batchllm.scheduler import Scheduler


def make_sched(policy="fcfs", blocks=10, bs=4, budget=8, estimate="max_tokens", max_num_seqs=256):
    cfg = EngineConfig(block_size=bs, max_num_batched_tokens=budget, kv_cache_blocks=blocks, policy=policy,
                       decode_estimate=estimate)
    return Scheduler(cfg, max_num_seqs=max_num_seqs)


def leaf(i, n_prompt, max_tokens=4, parent=None):
    start = parent.num_tokens if parent is not None else 0
    s = Sequence(i, list(range(100, 100 + n_prompt)), start, parent, is_node=False, request_index=i,
                 max_tokens=max_tokens)
    if parent is not None:
        parent.children.append(s)
        parent.pending_children += 1
    return s


def node(i, n_tokens, parent=None):
    start = parent.num_tokens if parent is not None else 0
    s = Sequence(i, list(range(100, 100 + n_tokens)), start, parent, is_node=True)
    if parent is not None:
        parent.children.append(s)
        parent.pending_children += 1
    return s


def step(sched, check=True):
    """Schedule, commit, sample token 7 for sampling leaves, finish leaves at max_tokens; then (with `check`) check
    the KV bookkeeping's integrity. Returns the plan as [(seq_id, num_new)] and the finished seq ids."""
    plan = sched.schedule()
    samplers = [s for i, s in enumerate(plan.seqs) if plan.samples(i)]
    sched.commit(plan)
    done = []
    for s in samplers:
        s.token_ids.append(7)
        if s.num_output_tokens >= s.max_tokens:
            sched.finish(s)
            done.append(s.seq_id)
    if check:
        sched.check_integrity()
    return [(s.seq_id, n) for s, n in zip(plan.seqs, plan.num_new)], done


def refs(sched, n):
    return [sched.kv.ref_count(b) for b in range(n)]


def test_token_budget_chunks_prefill_and_mixes_it_with_decodes():
    sched = make_sched(budget=8)
    a, b = leaf(0, 10, max_tokens=10), leaf(1, 10, max_tokens=10)
    sched.add([a, b])
    assert step(sched) == ([(0, 8)], [])
    assert a.blocks == [0, 1] and a.num_computed_tokens == 8
    assert step(sched) == ([(0, 2), (1, 6)], [])  # a finishes its prompt and samples; b starts
    assert a.blocks == [0, 1, 2] and b.blocks == [3, 4]
    assert a.num_tokens == 11
    assert step(sched) == ([(0, 1), (1, 4)], [])  # a decodes while b's last chunk runs
    assert b.blocks == [3, 4, 5]
    assert step(sched) == ([(0, 1), (1, 1)], [])
    assert a.blocks == [0, 1, 2]
    assert step(sched) == ([(0, 1), (1, 1)], [])
    assert a.blocks == [0, 1, 2, 6]  # position 12 opens a fourth block
    assert refs(sched, 8) == [1] * 7 + [0]


def test_finished_blocks_return_to_the_queue_head_in_order():
    sched = make_sched(blocks=6, budget=16)
    a, b = leaf(0, 4, max_tokens=1), leaf(1, 8, max_tokens=2)
    sched.add([a, b])
    assert step(sched) == ([(0, 4), (1, 8)], [0])
    assert a.status is Status.FINISHED and a.blocks == []
    assert sched.kv.free_blocks() == [0, 3, 4, 5]  # reused before the never-used blocks
    assert step(sched) == ([(1, 1)], [1])  # position 8 opens a third block for b: block 0 again
    assert b.blocks == []
    assert sched.kv.free_blocks() == [1, 2, 0, 3, 4, 5]
    assert not sched.has_work()


def test_preemption_frees_the_newest_and_recomputes_it_later():
    sched = make_sched(blocks=5, budget=16)
    a, b = leaf(0, 8, max_tokens=6), leaf(1, 8, max_tokens=6)
    sched.add([a, b])
    assert step(sched) == ([(0, 8), (1, 8)], [])
    assert (a.blocks, b.blocks) == ([0, 1], [2, 3])
    plan, _ = step(sched)  # a needs a third block: 4; b needs one too: none left -> b is preempted
    assert plan == [(0, 1)]
    assert a.blocks == [0, 1, 4]
    assert b.status is Status.WAITING and b.blocks == [] and b.num_computed_tokens == 0
    assert b.num_tokens == 9  # its sampled token is kept and recomputed
    assert sched.num_preemptions == 1
    assert sched.queued() == [b]
    assert sched.kv.free_blocks() == [2, 3]
    for _ in range(4):
        step(sched)
    assert a.status is Status.FINISHED
    plan, _ = step(sched)
    assert plan == [(1, 9)]  # b recomputes prompt + its kept output token in one chunk
    assert b.blocks == [0, 1, 4]  # a freed [0, 1, 4, 2] last: they come back first, ahead of b's [3]
    while sched.has_work():
        step(sched)
    assert b.output_ids == [7] * 6
    assert sched.kv.num_free == 5


def test_group_node_runs_once_then_children_and_is_freed_with_the_last_child():
    sched = make_sched(policy="batchllm", blocks=8, budget=64)
    n = node(0, 8)
    l1 = leaf(1, 10, max_tokens=1, parent=n)
    l2 = leaf(2, 11, max_tokens=2, parent=n)
    sched.add([n])
    assert step(sched) == ([(0, 8)], [])
    assert n.status is Status.COMPUTED and n.blocks == [0, 1]
    assert sched.queued() == [l1, l2]
    assert step(sched) == ([(1, 2), (2, 3)], [1])
    # admitted, l2 takes both blocks it will fill (positions 8-12: its prompt and 2 output tokens) in one run
    assert (l1.block_table(), l2.block_table()) == ([0, 1], [0, 1, 3, 4])
    assert n.blocks == [0, 1] and n.pending_children == 1  # l1 done, l2 still needs the prefix
    assert sched.kv.free_blocks() == [2, 5, 6, 7]  # l1's own block comes back first
    assert step(sched) == ([(2, 1)], [2])
    assert n.status is Status.FINISHED
    assert sched.kv.free_blocks() == [0, 1, 3, 4, 2, 5, 6, 7]  # freed last (the prefix's), first out


def test_nested_nodes_release_children_level_by_level():
    sched = make_sched(policy="batchllm", blocks=12, budget=64)
    root = node(0, 4)
    inner = node(1, 8, parent=root)
    a = leaf(2, 9, max_tokens=2, parent=inner)
    b = leaf(3, 6, max_tokens=1, parent=root)
    sched.add([root])
    assert step(sched) == ([(0, 4)], [])
    assert sched.queued() == [inner, b]
    assert step(sched) == ([(1, 4), (3, 2)], [3])
    assert inner.block_table() == [0, 1]
    assert step(sched) == ([(2, 1)], [])
    assert a.block_table() == [0, 1, 2]  # b's block 2, freed a step ago, is reused
    assert step(sched) == ([(2, 1)], [2])
    assert root.status is Status.FINISHED and inner.status is Status.FINISHED
    assert sched.kv.num_free == 12


def test_memory_centric_admission_reserves_expected_output():
    sched = make_sched(policy="batchllm", blocks=6, budget=64)
    seqs = [leaf(i, 4, max_tokens=8) for i in range(3)]  # each ends at 12 tokens = 3 blocks
    sched.add(seqs)
    plan, _ = step(sched)
    assert plan == [(0, 4), (1, 4)]  # the third would not fit beside the other two's expected growth
    baseline = make_sched(policy="fcfs", blocks=6, budget=64)
    seqs = [leaf(i, 4, max_tokens=8) for i in range(3)]
    baseline.add(seqs)
    plan, _ = step(baseline)
    assert plan == [(0, 4), (1, 4), (2, 4)]  # admits on the blocks needed now


def test_memory_centric_leaves_take_their_expected_blocks_in_one_run():
    """Leaves decoding in lockstep take a block each in turn when they grow (fcfs: a's blocks 0, 2, 4 and b's 1, 3,
    5). Under "batchllm" each admitted leaf takes every block it is expected to fill at once, in one run, and
    allocates nothing while it decodes."""
    runs = {}
    for policy in ("fcfs", "batchllm"):
        sched = make_sched(policy=policy, blocks=12, budget=64)
        a, b = leaf(1, 4, max_tokens=8), leaf(2, 4, max_tokens=8)  # 4 + 8 tokens: 3 blocks each
        sched.add([a, b])
        assert step(sched) == ([(1, 4), (2, 4)], [])
        free_after_admission = sched.kv.num_free
        for _ in range(6):
            step(sched)
        runs[policy] = (a.blocks, b.blocks)
        if policy == "batchllm":
            assert free_after_admission == 6 and sched.kv.num_free == 6
        assert step(sched) == ([(1, 1), (2, 1)], [1, 2])
        assert sched.kv.num_free == 12
    assert runs == {"fcfs": ([0, 2, 4], [1, 3, 5]), "batchllm": ([0, 1, 2], [3, 4, 5])}


def test_ahead_blocks_are_taken_only_beside_what_others_are_expected_to_need():
    """A lone group goes ahead even when its expected output does not fit: its leaf then takes only the blocks it
    needs now, and grows one block at a time as before."""
    sched = make_sched(policy="batchllm", blocks=3, budget=64)
    a = leaf(1, 4, max_tokens=12)  # 16 tokens = 4 blocks expected, 3 in the pool
    sched.add([a])
    step(sched)
    assert a.blocks == [0]
    for _ in range(4):
        step(sched)
    assert a.blocks == [0, 1]  # position 4 opened the second block, on demand


def test_unwritten_ahead_blocks_come_back_before_anyone_is_preempted():
    """A leaf running past its estimate (here: its bound raised after admission, as when the history estimate was
    low) needs a block while the pool is empty: the blocks another leaf took ahead and has not reached come back
    first, and nobody is preempted."""
    sched = make_sched(policy="batchllm", blocks=8, budget=64)
    a, b = leaf(1, 4, max_tokens=4), leaf(2, 4, max_tokens=12)  # expected: 2 and 4 blocks
    sched.add([a, b])
    step(sched)
    assert (a.blocks, b.blocks) == ([0, 1], [2, 3, 4, 5])
    outsider = leaf(9, 8)
    assert sched.kv.allocate(outsider, 8)  # the pool's last two blocks go elsewhere
    a.max_tokens = 8  # a will write positions 8-11: a third block
    for _ in range(4):
        step(sched, check=False)
    assert a.num_computed_tokens == 8 and sched.kv.num_free == 0
    step(sched, check=False)  # a writes position 8: b (at position 8 too) keeps blocks up to it and returns block 5
    assert (a.blocks, b.blocks) == ([0, 1, 5], [2, 3, 4])
    while b.status is not Status.FINISHED:
        step(sched, check=False)
    assert sched.num_preemptions == 0 and b.output_ids == [7] * 12


def test_request_cap_binds_baselines_only():
    sched = make_sched(policy="fcfs", blocks=50, budget=64, max_num_seqs=2)
    sched.add([leaf(i, 4) for i in range(3)])
    plan, _ = step(sched)
    assert [s for s, _ in plan] == [0, 1]
    sched = make_sched(policy="batchllm", blocks=50, budget=64, max_num_seqs=2)
    sched.add([leaf(i, 4) for i in range(3)])
    plan, _ = step(sched)
    assert [s for s, _ in plan] == [0, 1, 2]


def test_prefix_cache_hits_skip_computed_blocks_and_keep_one_token():
    sched = make_sched(policy="fcfs-cache", blocks=10, budget=64)
    a = leaf(0, 8, max_tokens=1)
    a.block_hashes = block_hashes(a.token_ids, 4)
    sched.add([a])
    assert step(sched) == ([(0, 8)], [0])
    assert sched.kv.free_blocks() == [2, 3, 4, 5, 6, 7, 8, 9, 1, 0]  # tail block freed first
    b = leaf(1, 10, max_tokens=2)
    b.token_ids[:8] = a.token_ids[:8]
    b.block_hashes = block_hashes(b.token_ids, 4)
    c = leaf(2, 8, max_tokens=2)  # the same prompt as a: one block is recomputed to produce logits
    c.block_hashes = list(a.block_hashes)
    sched.add([b, c])
    plan, _ = step(sched)
    assert plan == [(1, 2), (2, 4)]
    assert b.blocks == [0, 1, 2] and b.num_cached_tokens == 8
    assert c.blocks == [0, 3] and c.num_cached_tokens == 4
    assert refs(sched, 2) == [2, 1]


def test_lpm_prefers_the_longest_cached_prefix():
    sched = make_sched(policy="lpm-cache", blocks=10, budget=64)
    warm = leaf(0, 8, max_tokens=1)
    warm.block_hashes = block_hashes(warm.token_ids, 4)
    sched.add([warm])
    step(sched)
    cold = leaf(1, 8, max_tokens=1)
    cold.token_ids = list(range(200, 208))
    cold.block_hashes = block_hashes(cold.token_ids, 4)
    hot = leaf(2, 9, max_tokens=1)
    hot.block_hashes = block_hashes(hot.token_ids, 4)
    sched.add([cold, hot])
    plan, _ = step(sched)
    assert plan == [(2, 1), (1, 8)]


def test_a_new_group_waits_until_started_groups_fit_with_all_their_members():
    sched = make_sched(policy="batchllm", blocks=14, budget=64)
    groups = []
    for g in range(2):
        n = node(10 * g, 8)
        members = [leaf(10 * g + 1 + i, 12, max_tokens=4, parent=n) for i in range(3)]  # 2 own blocks each at the end
        groups.append((n, members))
    sched.add([groups[0][0], groups[1][0]])
    plan, _ = step(sched)
    assert plan == [(0, 8)]  # group 1 (2 + 3 x 2 blocks) does not fit beside group 0's 8 reserved blocks
    assert sched.reserved_blocks == 6
    plan, _ = step(sched)
    assert plan == [(1, 4), (2, 4), (3, 4)]
    assert sched.reserved_blocks == 0
    while groups[1][0].status is Status.WAITING:
        step(sched)
    assert all(m.status is Status.FINISHED for m in groups[0][1])  # group 1 started only once group 0 was done
    while sched.has_work():
        step(sched)
    assert sched.num_preemptions == 0 and sched.kv.num_free == 14


def _finished(i, group, out_tokens, max_tokens=100):
    s = Sequence(i, list(range(100, 110)) + [7] * out_tokens, 0, None, is_node=False, request_index=i,
                 max_tokens=max_tokens, group=group)
    s.num_prompt_tokens = 10
    return s


def test_decode_estimate_learns_per_group_then_falls_back_to_global():
    est = DecodeEstimator("history")
    probe_a = Sequence(900, list(range(10)), 0, None, is_node=False, max_tokens=100, group=1)
    probe_b = Sequence(901, list(range(10)), 0, None, is_node=False, max_tokens=100, group=2)
    assert est.final_len(probe_a) == 10 + 100  # no history: trust max_tokens
    for i, out in enumerate([10, 20, 30]):
        est.observe(_finished(i, 1, out))
    assert est.final_len(probe_a) == 110  # 3 < MIN_GROUP_HISTORY finished in group 1
    est.observe(_finished(3, 1, 40))
    assert est.final_len(probe_a) == 10 + 40  # q90 of group 1's ratios (.1 .2 .3 .4) x 100
    assert est.final_len(probe_b) == 110  # group 2 has no history, the global one has only 4 entries
    for i in range(12):
        est.observe(_finished(10 + i, 3 + i, 80))  # 12 groups of one, ratio .8
    assert est.final_len(probe_b) == 10 + 80  # global q90 over 16 finished leaves
    assert est.final_len(probe_a) == 10 + 40  # its own group still wins
    est.forget_group(1)
    assert est.final_len(probe_a) == 10 + 80 and 1 not in est.group_ratios


def test_group_history_is_dropped_when_the_group_ends():
    sched = make_sched(policy="batchllm", blocks=40, bs=4, budget=64, estimate="history")
    root = node(0, 8)
    kids = [leaf(1 + i, 10, max_tokens=1 + i, parent=root) for i in range(5)]  # they finish one step apart
    for k in kids:
        k.group = 0
    alone = leaf(6, 5, max_tokens=2)
    alone.group = 1
    sched.add([root, alone])
    finished, kept = [], []
    while len(finished) < 6:
        finished += step(sched)[1]
        kids_done = sum(1 for k in kids if k.seq_id in finished)
        if 0 < kids_done < 5:
            kept.append((kids_done, len(sched.admission.estimator.group_ratios.get(0, ()))))
    assert kept == [(1, 1), (2, 2), (3, 3), (4, 4)]  # the group's history grows while the group runs
    estimator = sched.admission.estimator
    assert estimator.group_ratios == {} and estimator.group_q90 == {}
    assert len(estimator.ratios) == 6

"""Property tests of planned execution over random prefix forests (pure Python: planner + scheduler, a fake model
that appends token 7): every request runs exactly once, accounting is exact, shared nodes are computed once and
freed with their last request, and all KV blocks are free at the end, also under KV pressure."""

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batchllm.batch import build_sequences, plan_for_cache
from batchllm.config import EngineConfig
from batchllm.request import Status
from batchllm.scheduler import Scheduler


@st.composite
def forests(draw):
    rng = random.Random(draw(st.integers(0, 10 ** 6)))
    prompts = []

    def grow(prefix, depth):
        for _ in range(rng.randrange(1, 4)):
            seg = [rng.randrange(4, 50) for _ in range(rng.randrange(0, 14))]
            if depth < 2 and rng.random() < 0.5:
                grow(prefix + seg, depth + 1)
            else:
                prompts.append(prefix + seg + [rng.randrange(4, 50) for _ in range(rng.randrange(0, 3))])

    for _ in range(draw(st.integers(1, 4))):
        grow([1], 0)
    prompts = [p if p else [1] for p in prompts]
    if rng.random() < 0.5:
        prompts.append(list(rng.choice(prompts)))  # duplicate
    rng.shuffle(prompts)
    max_tokens = [rng.randrange(1, 6) for _ in prompts]
    return prompts, max_tokens


def execute(prompts, max_tokens, policy, mode, blocks, bs, budget):
    plan = plan_for_cache(prompts, [len(p) + m for p, m in zip(prompts, max_tokens)], bs, mode, blocks)
    n = len(prompts)
    seqs = build_sequences(plan, prompts, max_tokens, list(range(n)), [0] * n, policy)
    cfg = EngineConfig(block_size=bs, max_num_batched_tokens=budget, kv_cache_blocks=blocks, policy=policy)
    sched = Scheduler(cfg)
    sched.add(seqs.roots)
    finished, node_tokens, prompt_tokens, peak_node_blocks = [], 0, 0, 0
    steps = 0
    while sched.has_work():
        steps += 1
        assert steps < 10_000
        plan_step = sched.schedule()
        assert plan_step.seqs, "the scheduler made no progress"
        samplers = [s for i, s in enumerate(plan_step.seqs) if plan_step.samples(i)]
        for s, k in zip(plan_step.seqs, plan_step.num_new):
            done = min(s.num_computed_tokens + k, s.num_prompt_tokens) - s.num_computed_tokens
            prompt_tokens += max(0, done)
            if s.is_node:
                node_tokens += k
        sched.commit(plan_step)
        for s in samplers:
            s.token_ids.append(7)
            if s.num_output_tokens >= s.max_tokens:
                sched.finish(s)
                finished.append(s.request_index)
        sched.check_integrity()  # every block held by exactly the live sequences, the free queue consistent
        node_blocks = sum(len(x.blocks) for x in seqs.nodes)
        peak_node_blocks = max(peak_node_blocks, node_blocks)
        for node in seqs.nodes:  # a node is alive exactly while some leaf below it is unfinished
            below = node.leaves()
            assert (node.status is Status.FINISHED) == all(x.status is Status.FINISHED for x in below)
    return plan, seqs, sched, sorted(finished), prompt_tokens, node_tokens, peak_node_blocks


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forests(), st.sampled_from(["nested", "one-level"]), st.sampled_from([2, 4]), st.sampled_from([5, 64]))
def test_roomy_kv_runs_the_plan_exactly(forest, mode, bs, budget):
    prompts, max_tokens = forest
    plan, seqs, sched, finished, prompt_tokens, node_tokens, peak = execute(
        prompts, max_tokens, "batchllm", mode, 4000, bs, budget)
    assert finished == list(range(len(prompts)))  # every request exactly once
    assert [leaf.num_output_tokens for leaf in seqs.leaves] == max_tokens
    assert prompt_tokens == plan.stats.plan_tokens  # accounting exact: each node once, each own part once
    assert node_tokens == plan.stats.shared_tokens
    # never more prefix blocks than planned (a node that starts mid-block spans its first block from the boundary)
    assert peak <= sum(-(-(n.end - n.start // bs * bs) // bs) for n in plan.nodes)
    assert sched.num_preemptions == 0
    assert sched.kv.num_free == 4000 and all(sched.kv.ref_count(b) == 0 for b in range(4000))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(forests(), st.sampled_from(["batchllm", "fcfs-cache", "lpm-cache", "fcfs"]), st.integers(0, 6))
def test_tight_kv_finishes_everything_and_frees_every_block(forest, policy, spare):
    prompts, max_tokens = forest
    bs = 2
    need = max(-(-(len(p) + m) // bs) for p, m in zip(prompts, max_tokens))
    blocks = need + spare
    mode = "nested" if policy == "batchllm" else "none"
    plan, seqs, sched, finished, *_ = execute(prompts, max_tokens, policy, mode, blocks, bs, 6)
    assert finished == list(range(len(prompts)))
    assert [leaf.num_output_tokens for leaf in seqs.leaves] == max_tokens
    assert sched.kv.num_free == blocks and all(sched.kv.ref_count(b) == 0 for b in range(blocks))
    assert all(n.status is Status.FINISHED and n.blocks == [] for n in seqs.nodes)


def test_plan_for_cache_ends_nodes_at_blocks_when_a_chain_would_outgrow_the_cache():
    """Two prompts share 10 tokens; with blocks of 4 the node ends at 10 (mid-block), and a request's chain holds
    3 node blocks + 1 own = 4 blocks, where the request alone (12 tokens with its output) needs 3. A 4-block cache
    keeps the token ends; a 3-block cache gets block ends, and then runs both requests."""
    prompts = [list(range(1, 11)) + [50], list(range(1, 11)) + [60]]
    totals = [12, 12]
    roomy = plan_for_cache(prompts, totals, 4, "nested", 4)
    assert [(n.start, n.end) for n in roomy.nodes] == [(0, 10)] and roomy.max_chain_blocks(totals) == 4
    tight = plan_for_cache(prompts, totals, 4, "nested", 3)
    assert [(n.start, n.end) for n in tight.nodes] == [(0, 8)] and tight.max_chain_blocks(totals) == 3
    _, seqs, sched, finished, *_ = execute(prompts, [1, 1], "batchllm", "nested", 3, 4, 64)
    assert finished == [0, 1] and sched.num_preemptions == 0

"""Prefix-affinity sharding of the global plan over workers (pure Python; the Ray runner builds on it)."""

import random

import pytest

from batchllm.distributed.shard import calls_of_workers, pack_pieces, prompt_tokens_of, shard_plan
from batchllm.prefix.plan import plan_batch


def forest(seed, groups=6, bs=4):
    rng = random.Random(seed)
    prompts = []
    for _ in range(groups):
        system = [1] + [rng.randrange(4, 90) for _ in range(rng.randrange(8, 40))]
        for _ in range(rng.randrange(1, 12)):
            shots = [rng.randrange(4, 90) for _ in range(rng.randrange(0, 9))]
            prompts.append(system + shots + [rng.randrange(4, 90) for _ in range(rng.randrange(1, 9))])
    rng.shuffle(prompts)
    return prompts, [rng.randrange(1, 30) for _ in prompts], plan_batch(prompts, bs)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("workers", [1, 2, 3, 8])
def test_every_request_once_and_exact_accounting(seed, workers):
    prompts, max_tokens, plan = forest(seed)
    lens = [len(p) for p in prompts]
    assert prompt_tokens_of(plan, range(len(prompts)), lens) == plan.stats.plan_tokens
    sp = shard_plan(plan, lens, max_tokens, workers)
    assigned = sorted(r for w in range(workers) for r in sp.requests_of(w))
    assert assigned == list(range(len(prompts)))
    for w in range(workers):
        mine = sp.requests_of(w)
        pieces = [p for p, pw in zip(sp.pieces, sp.piece_worker) if pw == w]
        assert sp.worker_prompt_tokens[w] == sum(prompt_tokens_of(plan, p, lens) for p in pieces)
        assert sp.worker_cost[w] == sp.worker_prompt_tokens[w] + sum(max_tokens[r] for r in mine)
    assert sum(sp.worker_prompt_tokens) >= plan.stats.plan_tokens  # splitting a group only adds work
    if len(sp.pieces) == len(plan.groups):
        assert sum(sp.worker_prompt_tokens) == plan.stats.plan_tokens
    if workers == 1:
        assert sp.saving_kept == 1.0 and sp.balance == 1.0


def test_groups_stay_whole_and_lpt_balances():
    # three groups of 2 requests, each sharing 8 tokens (2 blocks of 4) and adding 1 own token
    prompts = [[100 * (g + 1), 2, 3, 4, 5, 6, 7, 8, 10 + 10 * g + i] for g in range(3) for i in range(2)]
    plan = plan_batch(prompts, 4)
    assert len(plan.groups) == 3
    sp = shard_plan(plan, [len(p) for p in prompts], [5] * 6, 2, split_factor=2.0)
    assert sorted(sorted(p) for p in sp.pieces) == [[0, 1], [2, 3], [4, 5]]
    # each group: node 8 tokens + 2 x 1 own + 2 x 5 decode = 20; LPT puts two on one worker
    assert sorted(sp.worker_cost) == [20, 40]
    assert sp.saving_kept == 1.0


def test_a_group_bigger_than_a_fair_share_is_split():
    system = [1] + list(range(10, 41))  # 32 tokens: 8 blocks of 4
    prompts = [system + [100 + i, 200 + i] for i in range(8)]
    plan = plan_batch(prompts, 4)
    lens = [len(p) for p in prompts]
    sp = shard_plan(plan, lens, [10] * 8, 4)
    assert len(sp.pieces) == 4 and all(len(p) == 2 for p in sp.pieces)
    assert sp.worker_prompt_tokens == (32 + 4,) * 4  # the prefix computed once per worker, 2 own tokens each
    assert sp.balance == 1.0
    single = plan.stats.plan_tokens
    assert single == 32 + 8 * 2
    assert sp.saving_kept == pytest.approx((8 * 34 - 4 * 36) / (8 * 34 - single))
    whole = shard_plan(plan, lens, [10] * 8, 4, split_factor=100.0)
    assert len(whole.pieces) == 1 and whole.saving_kept == 1.0 and whole.balance == 4.0


def test_bad_arguments():
    prompts, max_tokens, plan = forest(0)
    with pytest.raises(ValueError, match="num_workers"):
        shard_plan(plan, [len(p) for p in prompts], max_tokens, 0)
    with pytest.raises(ValueError, match="split_factor"):
        shard_plan(plan, [len(p) for p in prompts], max_tokens, 2, split_factor=0)


def test_a_nested_group_is_cut_between_its_subgroups():
    # a 1-block template shared by all, under it 3 system prompts (2 blocks each) shared by 3, 2 and 3 requests
    template = [1, 2, 3, 4]
    sizes = [3, 2, 3]
    prompts = [template + [10 * (g + 1) + j for j in range(8)] + [200 + 10 * g + i]
               for g, n in enumerate(sizes) for i in range(n)]
    plan = plan_batch(prompts, 4)
    assert len(plan.groups) == 1 and plan.stats.plan_tokens == 4 + 3 * 8 + 8
    sp = shard_plan(plan, [len(p) for p in prompts], [1] * 8, 2)
    # equal-count halves would cut the middle subgroup and compute its 8-token prompt twice; the cut falls between
    # subgroups instead, and each piece recomputes only the template
    assert sorted(sorted(p) for p in sp.pieces) == [[0, 1, 2], [3, 4], [5, 6, 7]]
    assert sum(sp.worker_prompt_tokens) == plan.stats.plan_tokens + 2 * 4
    assert sorted(sp.worker_cost) == [18, 16 + 18]  # makespan 34 instead of 44 for the whole group


def test_a_cut_that_does_not_pay_off_is_not_made():
    # a group of 4 under a 32-token prefix costs 40, over the fair share of 29 (2 workers); halving it would
    # compute the prefix twice and raise the makespan to 48, so it stays whole
    prompts = [list(range(100, 132)) + [200 + i] for i in range(4)]
    prompts += [[10 * k + j for j in range(5)] for k in (1, 2, 3)]
    plan = plan_batch(prompts, 4)
    sp = shard_plan(plan, [len(p) for p in prompts], [1] * 7, 2)
    assert sorted(len(p) for p in sp.pieces) == [1, 1, 1, 4]
    assert sorted(sp.worker_cost) == [18, 40]
    assert sum(sp.worker_prompt_tokens) == plan.stats.plan_tokens and sp.saving_kept == 1.0


def test_pieces_pack_into_calls_of_whole_pieces():
    assert pack_pieces([3, 1, 4, 2, 5], 5) == [[0, 1], [2], [3], [4]]
    assert pack_pieces([7, 1, 1], 5) == [[0], [1, 2]]  # a piece larger than a call is a call alone
    assert pack_pieces([], 5) == []
    prompts, max_tokens, plan = forest(1)
    sp = shard_plan(plan, [len(p) for p in prompts], max_tokens, 3)
    calls = calls_of_workers(sp, 6)
    for w, worker_calls in calls.items():
        assert [p for call in worker_calls for p in call] == sp.pieces_of(w)
        assert all(len(call) == 1 or sum(len(sp.pieces[p]) for p in call) <= 6 for call in worker_calls)
    assert sorted(p for c in calls.values() for call in c for p in call) == list(range(len(sp.pieces)))
    costs = [sp.piece_cost[p] for p in sp.pieces_of(0)]
    assert costs == sorted(costs, reverse=True)

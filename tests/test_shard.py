"""Prefix-affinity sharding of the global plan over workers (pure Python; the Ray runner will build on it)."""

import random

import pytest

from batchllm.distributed.shard import prompt_tokens_of, shard_plan
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

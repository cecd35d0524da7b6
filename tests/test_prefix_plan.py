"""Tests of the global prefix planner: invariants on random prefix forests, exact figures against brute force."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchllm.prefix import MODES, analyze_batch, plan_batch
from batchllm.prefix.tree import compress_tree
from batchllm.prefix.trie import as_token_source, build_block_trie, group_rows

# ---------------------------------------------------------------- brute-force references (per-token Python)


def radix_reference(prompts: list[list[int]]) -> int:
    """Distinct non-empty prefixes = sum over sorted prompts of len - lcp with the previous one."""
    total, prev = 0, ()
    for p in sorted(tuple(x) for x in prompts):
        lcp = 0
        while lcp < min(len(p), len(prev)) and p[lcp] == prev[lcp]:
            lcp += 1
        total += len(p) - lcp
        prev = p
    return total


def nested_reference(prompts: list[list[int]], bsz: int) -> int:
    """Nested plan tokens by brute force. Block chains shared by >= 2 requests keeping >= 1 own token after them;
    a chain ends where the next block's chain has fewer sharers; each end moves on by the tokens all its sharers
    share after it (< bsz, each keeping >= 1 own token). Every node once, plus each request's own tokens."""
    sharers: dict[tuple, int] = {}
    for p in prompts:
        for d in range((len(p) - 1) // bsz):
            key = tuple(p[: (d + 1) * bsz])
            sharers[key] = sharers.get(key, 0) + 1
    shared = {k: c for k, c in sharers.items() if c >= 2}

    def is_end(key: tuple) -> bool:
        return not any(len(k) == len(key) + bsz and k[: len(key)] == key and c == shared[key]
                       for k, c in shared.items())

    ends = [k for k in shared if is_end(k)]
    reach = {}  # end key -> absolute end after the extension
    for key in ends:
        members = [p for p in prompts if tuple(p[: len(key)]) == key and len(p) > len(key)]
        ext = bsz - 1
        for m in members:
            lcp = 0
            while (lcp < len(m) - len(key) - 1 and len(key) + lcp < len(members[0])
                   and m[len(key) + lcp] == members[0][len(key) + lcp]):
                lcp += 1
            ext = min(ext, lcp)
        reach[key] = len(key) + ext

    def chain(p: list[int]) -> list[tuple]:  # the end keys above p (p keeps >= 1 own token after each), shortest first
        return sorted((k for k in ends if len(p) > len(k) and tuple(p[: len(k)]) == k), key=len)

    total = 0
    for key in ends:
        above = [k for k in ends if len(k) < len(key) and key[: len(k)] == k]
        total += reach[key] - (reach[max(above, key=len)] if above else 0)
    for p in prompts:
        c = chain(p)
        total += len(p) - (reach[c[-1]] if c else 0)
    return total


# ---------------------------------------------------------------- invariant checker


def members_of(plan, node_id: int) -> list[int]:
    return [i for i in range(len(plan.leaf_parent)) if node_id in plan.chain(i)]


def check_plan(prompts: list[list[int]], plan, bsz: int) -> None:
    """Assert every documented invariant of a PrefixPlan."""
    n = len(prompts)
    assert plan.block_size == bsz
    assert len(plan.leaf_parent) == n
    node_len = 0
    for k, node in enumerate(plan.nodes):
        assert node.node_id == k
        assert node.parent < k
        assert node.start == (plan.nodes[node.parent].end if node.parent >= 0 else 0)
        assert node.end // bsz * bsz > node.start  # it reaches a block boundary: its block-aligned range was >= 1 block
        members = members_of(plan, k)
        assert node.num_requests == len(members) >= 2
        assert node.request in members
        ref = prompts[node.request][node.start : node.end]
        for r in members:
            assert list(prompts[r][node.start : node.end]) == list(ref)
        if plan.stats.mode == "nested":  # its end went as far into the next block as its requests all share
            capped = node.end % bsz == bsz - 1 or any(len(prompts[r]) == node.end + 1 for r in members)
            assert capped or len({prompts[r][node.end] for r in members}) > 1
        node_len += node.end - node.start
    own = 0
    for i, p in enumerate(prompts):
        lp = plan.leaf_parent[i]
        assert -1 <= lp < len(plan.nodes)
        start = plan.own_start(i)
        assert len(p) > start  # at least one own token
        own += len(p) - start
        chain = plan.chain(i)
        assert all(plan.nodes[b].parent == a for a, b in zip(chain, chain[1:]))
    seen = sorted(i for g in plan.groups for i in g)
    assert seen == list(range(n))
    assert len(plan.groups) == len(plan.group_root)
    for g, root in zip(plan.groups, plan.group_root):
        if root < 0:
            assert len(g) == 1 and plan.leaf_parent[g[0]] == -1
        else:
            assert plan.nodes[root].parent == -1
            assert sorted(g) == members_of(plan, root)
    s = plan.stats
    logical = sum(len(p) for p in prompts)
    assert s.num_requests == n and s.logical_tokens == logical
    assert s.plan_tokens == node_len + own and s.shared_tokens == node_len
    assert s.radix_tokens == radix_reference(prompts)
    assert s.saving_ratio == ((logical - s.plan_tokens) / logical if logical else 0.0)
    assert s.num_nodes == len(plan.nodes)
    assert s.num_groups == sum(1 for r in plan.group_root if r >= 0)
    assert s.num_standalone == sum(1 for r in plan.group_root if r < 0)
    assert s.max_depth == max((len(plan.chain(i)) for i in range(n)), default=0)
    degrees = [len(g) for g, r in zip(plan.groups, plan.group_root) if r >= 0]
    assert s.degree_min == min(degrees, default=0) and s.degree_max == max(degrees, default=0)
    assert sum(c for _, c in s.degree_histogram) == len(degrees)
    assert s.radix_tokens <= s.plan_tokens <= logical


# ---------------------------------------------------------------- random prefix forests


@st.composite
def prefix_forests(draw):
    """Prompts built by cutting an earlier prompt at a random point and appending random tokens, then shuffled:
    nested shared prefixes, exact duplicates, prompts that are another's prefix, 1-token prompts."""
    vocab = draw(st.integers(2, 6))
    n = draw(st.integers(1, 24))
    prompts: list[list[int]] = []
    for _ in range(n):
        base: list[int] = []
        if prompts and draw(st.booleans()):
            src = prompts[draw(st.integers(0, len(prompts) - 1))]
            base = src[: draw(st.integers(0, len(src)))]
        tail = draw(st.lists(st.integers(0, vocab - 1), min_size=0 if base else 1, max_size=14))
        prompts.append(base + tail)
    return draw(st.permutations(prompts))


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(prompts=prefix_forests(), bsz=st.sampled_from([1, 2, 3, 4, 8]))
def test_plan_invariants_on_random_forests(prompts, bsz):
    plans = {mode: plan_batch(prompts, bsz, mode) for mode in MODES}
    for plan in plans.values():
        check_plan(prompts, plan, bsz)
    nested, one, none = (plans[m].stats.plan_tokens for m in ("nested", "one-level", "none"))
    assert nested == nested_reference(prompts, bsz)
    assert nested <= one <= none == sum(len(p) for p in prompts)
    assert plans["one-level"].stats.max_depth <= 1 and plans["none"].stats.num_nodes == 0


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(prompts=prefix_forests(), bsz=st.sampled_from([2, 4]), seed=st.integers(0, 2**16))
def test_plan_figures_do_not_depend_on_order_or_input_type(prompts, bsz, seed):
    perm = np.random.default_rng(seed).permutation(len(prompts))
    shuffled = [prompts[i] for i in perm]
    as_arrays = [np.asarray(p, dtype=np.int64) for p in prompts]
    for mode in MODES:
        a = plan_batch(prompts, bsz, mode)
        b = plan_batch(as_arrays, bsz, mode)
        assert (a.nodes, a.leaf_parent, a.groups, a.group_root) == (b.nodes, b.leaf_parent, b.groups, b.group_root)
        c = plan_batch(shuffled, bsz, mode).stats
        assert (c.plan_tokens, c.radix_tokens, c.num_nodes, c.num_groups) == (
            a.stats.plan_tokens,
            a.stats.radix_tokens,
            a.stats.num_nodes,
            a.stats.num_groups,
        )


@settings(max_examples=50, deadline=None, derandomize=True, database=None)
@given(prompts=prefix_forests(), bsz=st.sampled_from([1, 3, 4]))
def test_hash_collisions_fall_back_to_exact_grouping(prompts, bsz):
    batch = as_token_source(prompts)
    good = compress_tree(build_block_trie(batch, bsz))
    bad = compress_tree(build_block_trie(batch, bsz, hasher=lambda par, rows: np.zeros(par.shape[0], np.uint64)))
    assert bad.radix_tokens == good.radix_tokens == radix_reference(prompts)
    assert np.array_equal(np.sort(bad.end - bad.start), np.sort(good.end - good.start))
    assert own_starts(bad).tolist() == own_starts(good).tolist()


def own_starts(tree) -> np.ndarray:
    return np.array([tree.end[k] if k >= 0 else 0 for k in tree.leaf_parent.tolist()], dtype=np.int64)


# ---------------------------------------------------------------- exact small cases


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_duplicates_share_up_to_one_token_before_the_end():
    p = seq(100, 10)
    plan = plan_batch([p, p, p], 4)
    # blocks [0, 8) are shared; the node goes on into block [8, 12) up to the last token each keeps: 9
    assert [(n.start, n.end, n.num_requests) for n in plan.nodes] == [(0, 9, 3)]
    assert plan.leaf_parent == (0, 0, 0) and plan.groups == ((0, 1, 2),)
    assert plan.stats.plan_tokens == 9 + 3 * 1 and plan.stats.radix_tokens == 10


def test_prompt_that_is_another_prompts_prefix_keeps_its_last_token():
    short, long = seq(1, 8), seq(1, 8) + seq(50, 5)
    plan = plan_batch([long, short], 4)
    assert [(n.start, n.end, n.num_requests) for n in plan.nodes] == [(0, 7, 2)]  # block [0, 4) and 3 tokens
    assert plan.own_start(1) == 7 and plan.stats.plan_tokens == 7 + 6 + 1
    one_token = plan_batch([[5], [5], [5, 6]], 1)
    assert one_token.nodes == () and one_token.groups == ((0,), (1,), (2,))
    assert one_token.stats.plan_tokens == 4 and one_token.stats.radix_tokens == 2


def test_nested_keeps_levels_the_flattening_drops():
    sys_prompt, shots = seq(1, 8), seq(20, 16)
    prompts = [sys_prompt + shots + [100 + i] for i in range(3)] + [sys_prompt + [200 + i] * 3 for i in range(2)]
    nested = plan_batch(prompts, 4, "nested")
    assert [(n.parent, n.start, n.end, n.num_requests) for n in nested.nodes] == [(-1, 0, 8, 5), (0, 8, 24, 3)]
    assert nested.stats.plan_tokens == 8 + 16 + 3 * 1 + 2 * 3
    assert nested.stats.max_depth == 2 and nested.groups == ((0, 1, 2, 3, 4),)
    # one-level: hoisting the shots gains (3 - 1) * 16 - 8 = 24 > 0, so they become a group with a copy of sys.
    one = plan_batch(prompts, 4, "one-level")
    assert sorted((n.start, n.end, n.num_requests) for n in one.nodes) == [(0, 8, 2), (0, 24, 3)]
    assert one.stats.plan_tokens == 8 + 24 + 3 * 1 + 2 * 3
    assert analyze_batch(prompts, 4)["one_level_plan_tokens"] - analyze_batch(prompts, 4)["nested_plan_tokens"] == 8


def test_one_level_dissolves_a_child_whose_gain_is_not_positive():
    head = seq(1, 16)
    prompts = [head + seq(40, 4) + [90 + i] for i in range(2)] + [head + [70 + i] * 2 for i in range(2)]
    one = plan_batch(prompts, 4, "one-level")  # child gain (2 - 1) * 4 - 16 < 0: dissolved into the head
    assert [(n.start, n.end, n.num_requests) for n in one.nodes] == [(0, 16, 4)]
    assert one.stats.plan_tokens == 16 + 2 * 5 + 2 * 2
    assert plan_batch(prompts, 4, "nested").stats.plan_tokens == 16 + 4 + 2 * 1 + 2 * 2


def test_one_level_drops_a_node_left_without_requests_or_with_one():
    stem = seq(1, 4)
    twins = [stem + seq(10, 16) + [90 + i] for i in range(2)] + [stem + seq(30, 16) + [95 + i] for i in range(2)]
    one = plan_batch(twins, 4, "one-level")  # both children hoisted (gain 16 - 4 > 0), the stem keeps nobody
    assert sorted((n.start, n.end, n.num_requests) for n in one.nodes) == [(0, 20, 2), (0, 20, 2)]
    assert one.stats.plan_tokens == 40 + 4
    lone = plan_batch(twins[:2] + [stem + [77] * 3], 4, "one-level")  # stem keeps one request: it merges into it
    assert [(n.start, n.end, n.num_requests) for n in lone.nodes] == [(0, 20, 2)]
    assert lone.groups == ((0, 1), (2,)) and lone.group_root == (0, -1)


def test_none_mode_and_stats_dict():
    prompts = [seq(1, 9), seq(1, 9), [3]]
    plan = plan_batch(prompts, 4, "none")
    assert plan.nodes == () and plan.leaf_parent == (-1, -1, -1) and plan.groups == ((0,), (1,), (2,))
    d = plan_batch(prompts, 4).stats.to_dict()
    assert (d["logical_tokens"], d["plan_tokens"], d["radix_tokens"], d["num_groups"]) == (19, 8 + 1 + 1 + 1, 10, 1)
    assert d["degree_histogram"] == {"2": 1}


def test_two_dimensional_array_input_and_large_token_ids():
    rows = np.array([seq(0, 12), seq(0, 12), seq(0, 6) + seq(600, 6)], dtype=np.int64) + 2**40
    plan = plan_batch(rows, 4)
    # the third row shares 2 tokens of block [4, 8) too; the twins go on to their last token but one
    assert [(n.start, n.end, n.num_requests) for n in plan.nodes] == [(0, 6, 3), (6, 11, 2)]
    assert plan.stats.plan_tokens == 6 + 5 + 1 + 1 + 6


def test_analyze_batch_figures():
    prompts = [seq(1, 16) + [50 + i] for i in range(4)] + [seq(200, 5)]
    a = analyze_batch(prompts, 8)
    assert (a["logical_tokens"], a["radix_tokens"], a["nested_plan_tokens"], a["one_level_plan_tokens"]) == (
        73,
        16 + 4 + 5,
        16 + 4 + 5,
        16 + 4 + 5,
    )
    assert a["no_sharing_tokens"] == 73 and a["nested_num_groups"] == 1
    assert a["nested_saving_ratio"] == (73 - 25) / 73
    assert a["nested_sharing_degree"]["max"] == 4


def test_group_rows_exact_under_collisions():
    rows = np.array([[1, 2], [3, 4], [1, 2], [1, 2], [3, 4]], dtype=np.int32)
    parents = np.array([0, 0, 0, 1, 0], dtype=np.int64)
    inv, first, counts = group_rows(parents, rows, hasher=lambda p, r: np.zeros(p.shape[0], np.uint64))
    assert inv[0] == inv[2] != inv[3] and inv[1] == inv[4] != inv[0]
    assert sorted(counts.tolist()) == [1, 2, 2] and inv[first].tolist() == list(range(3))


def test_a_larger_batch_matches_brute_force():
    rng = np.random.default_rng(0)
    systems = [rng.integers(0, 1000, 40).tolist() for _ in range(5)]
    shots = [rng.integers(0, 1000, 24).tolist() for _ in range(4)]
    prompts = []
    for _ in range(600):
        p = systems[rng.integers(5)] + (shots[rng.integers(4)] if rng.random() < 0.7 else [])
        prompts.append(p + rng.integers(0, 1000, rng.integers(1, 30)).tolist())
    prompts += prompts[:50]  # duplicated prompts (n > 1 sampling)
    plan = plan_batch(prompts, 8)
    check_plan(prompts, plan, 8)
    assert plan.stats.plan_tokens == nested_reference(prompts, 8)
    assert plan.stats.plan_tokens <= plan_batch(prompts, 8, "one-level").stats.plan_tokens


def test_bad_input_is_refused():
    with pytest.raises(ValueError):
        plan_batch([[1, 2], []], 4)
    with pytest.raises(ValueError):
        plan_batch([[1, -2]], 4)
    with pytest.raises(ValueError):
        plan_batch([[1, 2]], 4, mode="two-level")
    with pytest.raises(ValueError):
        plan_batch([[1, 2]], 0)


def test_degree_histogram_buckets():
    prompts = [[1] * 9 + [i] for i in range(2)] + [[2] * 9 + [i] for i in range(5)] + [[3] * 9 + [i] for i in range(5)]
    s = plan_batch(prompts, 4).stats
    assert s.degree_histogram == (("2", 1), ("5-8", 2))
    assert (s.degree_min, s.degree_median, s.degree_max, s.degree_mean) == (2, 5.0, 5, 4.0)


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(prompts=prefix_forests(), bsz=st.sampled_from([1, 2, 4]))
def test_narrow_token_windows_give_the_same_trie(prompts, bsz):
    wide = build_block_trie(as_token_source(prompts), bsz)
    narrow = build_block_trie(as_token_source(prompts), bsz, window_tokens=1)  # refill one block at a time
    assert narrow.radix_tokens == wide.radix_tokens
    for name in ("depth", "last", "parent", "count", "plan_count", "rep", "deepest"):
        assert getattr(narrow, name).tolist() == getattr(wide, name).tolist()

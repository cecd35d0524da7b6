"""The vectorised sampler (CPU, deterministic, exact expectations): noise, greedy, filters, batch invariance,
penalties, min_tokens and logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from batchllm.sampler import SamplingBatch, hash32, noise_key, sample, uniform_noise
from batchllm.sampling_params import SamplingParams, derive_seed

# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------


def _build(params, logits, seeds=None, positions=None, prompts=None, outputs=None, eos=None):
    b = len(params)
    seeds = list(range(100, 100 + b)) if seeds is None else seeds
    positions = [0] * b if positions is None else positions
    outputs = [[] for _ in range(b)] if outputs is None else outputs
    return SamplingBatch.build(params, seeds, positions, prompts, outputs, eos, logits.shape[1], logits.device)


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "a token of probability 0 was sampled"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum())


def _sample_many(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 1234) -> torch.Tensor:
    """Token counts [V] of n draws from one row at output positions 0..n-1 (one batch of n rows)."""
    v = logits_row.shape[0]
    batch = SamplingBatch.build([params] * n, [seed] * n, list(range(n)), None, [[]] * n, None, v, "cpu")
    res = sample(logits_row.expand(n, v), batch)
    return torch.bincount(torch.tensor(res.token_ids), minlength=v).double()


# chi-square 99.9% quantiles by degrees of freedom (for fixed-seed checks whose outcome is deterministic)
_CHI2_999 = {7: 24.32, 3: 16.27, 63: 103.4}

LOGITS8 = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 1.5, 0.2, -0.3])


# ----------------------------------------------------------------------------------------------------------------------
# noise
# ----------------------------------------------------------------------------------------------------------------------


def test_noise_matches_python_reference_hash():
    keys = [noise_key(s, p) for s, p in [(0, 0), (1, 0), (2**64 + 5, 7), (-3, 2**40)]]
    ids = torch.tensor([[0, 1, 2, 31999, 151935, 2**20]])
    key_t = torch.tensor([k - 2**32 if k >= 2**31 else k for k in keys], dtype=torch.int32)
    u = uniform_noise(key_t, ids)
    expected = torch.tensor([[((hash32(k, t) >> 8) + 0.5) / 2**24 for t in ids[0].tolist()] for k in keys])
    assert torch.equal(u, expected.float())
    assert noise_key(5, 0) != noise_key(5, 1) != noise_key(6, 0)


def test_noise_is_uniform_and_uncorrelated():
    keys = torch.tensor([noise_key(7, p) - 2**32 if noise_key(7, p) >= 2**31 else noise_key(7, p)
                         for p in range(64)], dtype=torch.int32)
    u = uniform_noise(keys, torch.arange(4096)[None, :])  # [64, 4096]
    assert 0.0 < float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u, bins=64, min=0.0, max=1.0).double()
    assert _chi_square(counts, torch.full((64,), 1 / 64)) < _CHI2_999[63]
    assert abs(float(u.mean()) - 0.5) < 0.005
    # neighbouring tokens and neighbouring positions are uncorrelated (|r| ~ 1/sqrt(n) = 0.002)
    c = u - 0.5
    assert abs(float((c[:, 1:] * c[:, :-1]).mean()) * 12) < 0.02
    assert abs(float((c[1:, :] * c[:-1, :]).mean()) * 12) < 0.02


# ----------------------------------------------------------------------------------------------------------------------
# greedy
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_is_argmax_with_lowest_id_on_ties(dtype):
    logits = torch.tensor([[0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 5.0, 5.0], [-1.0, -2.0, -0.5, -0.5]], dtype=dtype)
    batch = _build([SamplingParams(temperature=0.0)] * 3, logits)
    res = sample(logits, batch)
    assert res.token_ids == [1, 0, 2]
    assert res.logprobs == [None, None, None] and res.top_logprobs == [None, None, None]


def test_bf16_logits_sample_as_their_fp32_values():
    """The model hands the sampler bf16 logits: greedy rows (a fused argmax on CPU) and random rows (filtered in fp32)
    pick what they pick from the same values in fp32, in greedy-only and in mixed batches."""
    logits = (torch.randn(6, 32000, generator=torch.Generator().manual_seed(3)) * 4).to(torch.bfloat16)
    logits[2, 7] = logits[2, 9] = logits[2].max() + 1  # a tie: the lowest id
    greedy = [SamplingParams(temperature=0.0)] * 6
    mixed = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9),
             SamplingParams(temperature=0.0, logprobs=2), SamplingParams(temperature=1.0, top_k=20),
             SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, min_p=0.1)]
    for params in (greedy, mixed):
        got = sample(logits, _build(params, logits))
        want = sample(logits.float(), _build(params, logits.float()))
        assert got.token_ids == want.token_ids
        assert got.logprobs == want.logprobs and got.top_logprobs == want.top_logprobs
    assert sample(logits, _build(greedy, logits)).token_ids[2] == 7


def test_greedy_fast_path_builds_nothing():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    batch = _build([SamplingParams(temperature=0.0)] * 4, logits)
    assert batch.random_rows is None and batch.output_counts is None and batch.ban_rows is None
    assert batch.max_logprobs == -1
    assert sample(logits, batch).token_ids == torch.argmax(logits, dim=-1).tolist()


def test_logits_are_not_modified():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1))
    before = logits.clone()
    params = [SamplingParams(temperature=0.7, top_k=5, presence_penalty=1.0), SamplingParams(temperature=0.0),
              SamplingParams(temperature=1.0, min_tokens=2)]
    sample(logits, _build(params, logits, outputs=[[1, 2], [], []], eos=0))
    sample(logits, _build([SamplingParams(temperature=1.0)] * 3, logits))
    assert torch.equal(logits, before)


# ----------------------------------------------------------------------------------------------------------------------
# distribution checks (fixed seed: deterministic outcomes, compared with exact expected counts)
# ----------------------------------------------------------------------------------------------------------------------


def test_sampled_frequencies_match_softmax():
    counts = _sample_many(LOGITS8, SamplingParams(temperature=1.0), 20000)
    assert _chi_square(counts, torch.softmax(LOGITS8, -1)) < _CHI2_999[7]


def test_temperature_scales_the_distribution():
    counts = _sample_many(LOGITS8, SamplingParams(temperature=0.5), 20000)
    assert _chi_square(counts, torch.softmax(LOGITS8 / 0.5, -1)) < _CHI2_999[7]
    # a wrong temperature must be rejected by the same check
    assert _chi_square(counts, torch.softmax(LOGITS8, -1)) > 1000


def test_top_k_keeps_the_k_largest():
    counts = _sample_many(LOGITS8, SamplingParams(temperature=1.0, top_k=4), 20000)
    kept = torch.tensor([1, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool)
    probs = torch.softmax(LOGITS8.masked_fill(~kept, -math.inf), -1)
    assert _chi_square(counts, probs) < _CHI2_999[3]


def test_top_p_keeps_the_smallest_set_reaching_p():
    # probs sorted: 0.4, 0.3, 0.2, 0.1 (tokens 2, 0, 3, 1). top_p=0.75 needs 0.4+0.3+0.2.
    probs = torch.tensor([0.3, 0.1, 0.4, 0.2])
    logits = probs.log()
    counts = _sample_many(logits, SamplingParams(temperature=1.0, top_p=0.75), 20000)
    assert counts[1] == 0
    assert _chi_square(counts[[0, 2, 3]], torch.tensor([0.3, 0.4, 0.2]) / 0.9) < 13.82  # chi2 99.9%, 2 dof
    # exactly reaching the mass: top_p = 0.7 keeps tokens 2 and 0 only
    counts = _sample_many(logits, SamplingParams(temperature=1.0, top_p=0.7 - 1e-6), 4000)
    assert counts[1] == 0 and counts[3] == 0 and counts[0] > 0 and counts[2] > 0


def test_top_p_on_a_flat_wide_distribution():
    # 2000 equal tokens then a tail: more than 64 candidates are needed (the bisection path)
    logits = torch.cat([torch.zeros(2000), torch.full((1000,), -30.0)])
    counts = _sample_many(logits, SamplingParams(temperature=1.0, top_p=0.5), 1500)
    # ties with the last kept token are kept: every zero-logit token may be drawn, none of the tail
    assert counts[2000:].sum() == 0 and int((counts[:2000] > 0).sum()) > 1000


def test_min_p_drops_unlikely_tokens():
    counts = _sample_many(LOGITS8, SamplingParams(temperature=1.0, min_p=0.2), 20000)
    probs = torch.softmax(LOGITS8, -1)
    kept = probs >= 0.2 * probs.max()
    assert kept.tolist() == [True, True, True, False, False, True, False, False]
    assert _chi_square(counts, torch.softmax(LOGITS8.masked_fill(~kept, -math.inf), -1)) < _CHI2_999[3]


def test_filters_combine_in_order():
    # top_k=3 keeps tokens 0, 5, 1; top_p=0.8 on that renormalised distribution keeps 0 and 5; min_p irrelevant
    params = SamplingParams(temperature=1.0, top_k=3, top_p=0.8, min_p=0.01)
    counts = _sample_many(LOGITS8, params, 20000)
    p3 = torch.softmax(LOGITS8[[0, 5, 1]], -1)
    assert float(p3[0]) < 0.8 < float(p3[0] + p3[1])
    assert counts.nonzero()[:, 0].tolist() == [0, 5]
    assert _chi_square(counts[[0, 5]], p3[:2] / p3[:2].sum()) < 10.83  # chi2 99.9%, 1 dof


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(3))
    for params in (SamplingParams(temperature=1.3, top_k=1), SamplingParams(temperature=1.3, top_p=1e-6)):
        res = sample(logits, _build([params] * 16, logits, positions=list(range(16))))
        assert res.token_ids == torch.argmax(logits, -1).tolist()


# ----------------------------------------------------------------------------------------------------------------------
# reproducibility
# ----------------------------------------------------------------------------------------------------------------------

MIXED = [
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.7, top_k=20, logprobs=3),
    SamplingParams(temperature=1.2, top_p=0.9),
    SamplingParams(temperature=0.9, min_p=0.05, presence_penalty=0.5, frequency_penalty=0.3),
    SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=0),
    SamplingParams(temperature=1.0, top_k=50, top_p=0.95, min_p=0.02, repetition_penalty=0.8),
    SamplingParams(temperature=2.0),
    SamplingParams(temperature=1.0, min_tokens=4, stop_token_ids=[7, 8], logprobs=5),
]


def _mixed_rows(v: int = 500):
    gen = torch.Generator().manual_seed(42)
    b = len(MIXED)
    logits = torch.randn(b, v, generator=gen) * 2.5
    prompts = [torch.randint(0, v, (10 + i,), generator=gen).tolist() for i in range(b)]
    outputs = [torch.randint(0, v, (i,), generator=gen).tolist() for i in range(b)]
    seeds = [derive_seed(99, i) for i in range(b)]
    positions = [len(o) for o in outputs]
    return logits, prompts, outputs, seeds, positions


def test_row_result_independent_of_batch_composition_and_order():
    logits, prompts, outputs, seeds, positions = _mixed_rows()
    b = len(MIXED)
    full = sample(logits, SamplingBatch.build(MIXED, seeds, positions, prompts, outputs, 1, 500, "cpu"))
    for i in range(b):  # each row alone
        one = sample(logits[i:i + 1], SamplingBatch.build([MIXED[i]], [seeds[i]], [positions[i]], [prompts[i]],
                                                          [outputs[i]], 1, 500, "cpu"))
        assert one.token_ids[0] == full.token_ids[i]
        assert one.logprobs[0] == full.logprobs[i] and one.top_logprobs[0] == full.top_logprobs[i]
    perm = [5, 2, 8, 0, 7, 1, 3, 6, 4]
    shuffled = sample(logits[perm], SamplingBatch.build([MIXED[j] for j in perm], [seeds[j] for j in perm],
                                                        [positions[j] for j in perm], [prompts[j] for j in perm],
                                                        [outputs[j] for j in perm], 1, 500, "cpu"))
    assert shuffled.token_ids == [full.token_ids[j] for j in perm]
    assert shuffled.logprobs == [full.logprobs[j] for j in perm]
    # and the choice is no function of the global RNG
    torch.manual_seed(123)
    again = sample(logits, SamplingBatch.build(MIXED, seeds, positions, prompts, outputs, 1, 500, "cpu"))
    assert again.token_ids == full.token_ids


def test_seed_and_position_drive_the_choice():
    logits = torch.zeros(64, 1000)  # uniform: draws are pure noise
    params = [SamplingParams(temperature=1.0)] * 64
    a = sample(logits, _build(params, logits, seeds=[5] * 64, positions=list(range(64)))).token_ids
    b = sample(logits, _build(params, logits, seeds=[5] * 64, positions=list(range(64)))).token_ids
    c = sample(logits, _build(params, logits, seeds=[6] * 64, positions=list(range(64)))).token_ids
    assert a == b
    assert len(set(a)) > 55  # positions give distinct draws
    assert sum(x == y for x, y in zip(a, c)) < 4  # another seed, another stream


def test_candidate_and_full_vocab_paths_agree():
    # one row with top_k=5 sampled alone takes the candidate path; next to an unfiltered row, the full-vocab path
    logits = torch.randn(2, 4000, generator=torch.Generator().manual_seed(9))
    filt, free = SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=1.0)
    for pos in range(50):
        alone = sample(logits[:1], _build([filt], logits[:1], seeds=[3], positions=[pos])).token_ids[0]
        mixed = sample(logits, _build([filt, free], logits, seeds=[3, 4], positions=[pos, pos])).token_ids[0]
        assert alone == mixed


# ----------------------------------------------------------------------------------------------------------------------
# penalties, min_tokens, logprobs
# ----------------------------------------------------------------------------------------------------------------------


def _reference_penalties(row, prompt, output, rep, freq, pres):
    out = list(row)
    for t in set(prompt) | set(output):
        out[t] = out[t] / rep if out[t] > 0 else out[t] * rep
    for t in set(output):
        out[t] -= freq * output.count(t) + pres
    return torch.tensor(out)


def test_penalties_match_reference():
    v = 12
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.5, -0.5, 3.0, 0.0, 1.5, -2.0, 0.25, 0.75, -0.25]] * 2)
    prompt, output = [0, 1, 1, 3], [2, 2, 4, 9, 2]
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.5, frequency_penalty=0.4, presence_penalty=0.3,
                             logprobs=12),
              SamplingParams(temperature=0.0, logprobs=12)]
    res = sample(logits, _build(params, logits, prompts=[prompt, prompt], outputs=[output, output]))
    expected = torch.log_softmax(_reference_penalties(logits[0].tolist(), prompt, output, 1.5, 0.4, 0.3), -1)
    got = dict(res.top_logprobs[0])
    assert sorted(got) == list(range(v))
    assert torch.allclose(torch.tensor([got[t] for t in range(v)]), expected, atol=1e-6)
    assert res.token_ids[0] == int(torch.argmax(expected))
    # the row without penalties is untouched
    plain = dict(res.top_logprobs[1])
    assert torch.allclose(torch.tensor([plain[t] for t in range(v)]), torch.log_softmax(logits[1], -1), atol=1e-6)


def test_repetition_penalty_changes_greedy_choice_and_needs_prompt():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2)]
    assert sample(logits, _build(params, logits, prompts=[[0]])).token_ids == [1]
    assert sample(logits, _build(params, logits, prompts=[[2]])).token_ids == [0]
    with pytest.raises(ValueError, match="prompt_ids"):
        _build(params, logits, prompts=None)


def test_min_tokens_masks_eos_and_stop_ids():
    logits = torch.tensor([[5.0, 4.0, 3.0, 0.0]] * 4)
    eos = 0
    params = [SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1]),
              SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[1]),
              SamplingParams(temperature=0.0, min_tokens=2, ignore_eos=True),
              SamplingParams(temperature=0.0, logprobs=1, min_tokens=3)]
    res = sample(logits, _build(params, logits, positions=[1, 2, 0, 0], eos=eos))
    # row 0: output shorter than min_tokens: eos (0) and stop id 1 masked -> 2; row 1: long enough -> eos;
    # row 2: ignore_eos keeps eos available; row 3: eos masked, logprobs see the mask
    assert res.token_ids == [2, 0, 0, 1]
    assert res.top_logprobs[3][0][0] == 1
    assert res.logprobs[3] == pytest.approx(float(torch.log_softmax(torch.tensor([4.0, 3.0, 0.0]), -1)[0]), abs=1e-6)


def test_logprobs_are_of_the_unscaled_distribution():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.0, -1.0]] * 3)
    params = [SamplingParams(temperature=0.3, logprobs=2, seed=1), SamplingParams(temperature=0.0, logprobs=0),
              SamplingParams(temperature=0.5)]
    res = sample(logits, _build(params, logits))
    ref = torch.log_softmax(logits[0], -1)
    assert res.top_logprobs[0] == [(2, pytest.approx(float(ref[2]))), (1, pytest.approx(float(ref[1])))]
    assert res.logprobs[0] == pytest.approx(float(ref[res.token_ids[0]]))
    assert res.token_ids[1] == 2 and res.top_logprobs[1] == [] and res.logprobs[1] == pytest.approx(float(ref[2]))
    assert res.logprobs[2] is None and res.top_logprobs[2] is None


def test_build_checks_lengths_and_vocab():
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError):
        SamplingBatch.build([SamplingParams()] * 2, [1], [0, 0], None, [[], []], None, 5, "cpu")
    batch = _build([SamplingParams()] * 2, logits)
    with pytest.raises(ValueError):
        sample(torch.zeros(2, 6), batch)


def test_top_p_threshold_matches_sorted_reference():
    from batchllm.sampler import _top_p_threshold

    gen = torch.Generator().manual_seed(5)
    # peaked rows take the top-64 cut, flat rows the bisection; both must give the sorted-cumsum cut
    x = torch.cat([torch.randn(3, 3000, generator=gen) * 6, torch.randn(3, 3000, generator=gen) * 0.3])  # [6, V]
    x[1, :7] = x[1, 0]  # ties
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.1, 0.5, 0.9])
    got = _top_p_threshold(x, top_p)
    sv = torch.sort(x.double(), dim=-1, descending=True).values
    cum = torch.cumsum(torch.softmax(sv, -1), -1)
    ref = sv.gather(1, (cum < top_p.double()[:, None]).sum(-1, keepdim=True))[:, 0].float()
    assert torch.equal(got, ref)
    assert _top_p_threshold(x, torch.full((6,), 2.0)).tolist() == [-math.inf] * 6


def test_flat_top_p_rows_are_batch_invariant():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(6, 2000, generator=gen) * torch.tensor([[0.1], [5.0], [0.5], [8.0], [0.2], [1.0]])
    params = [SamplingParams(temperature=1.0, top_p=p) for p in (0.9, 0.9, 0.5, 0.95, 0.3, 0.8)]
    full = sample(logits, _build(params, logits, positions=[3] * 6)).token_ids
    for i in range(6):
        alone = sample(logits[i:i + 1], _build([params[i]], logits[i:i + 1], seeds=[100 + i], positions=[3]))
        assert alone.token_ids[0] == full[i]

"""SamplingParams: vLLM's defaults, normalisation, and every invalid value named by its field (no torch)."""

from __future__ import annotations

import pytest

from batchllm.sampling_params import SamplingParams, derive_seed

# ----------------------------------------------------------------------------------------------------------------------
# SamplingParams
# ----------------------------------------------------------------------------------------------------------------------


def test_defaults_match_vllm():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (1, 1.0, 1.0, 0, 0.0, None)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids, p.ignore_eos, p.logprobs) == (16, 0, (), (), False,
                                                                                               None)
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.skip_special_tokens) == (0.0, 0.0, 1.0,
                                                                                                      True)
    assert not p.is_greedy
    assert SamplingParams(temperature=0).is_greedy
    assert isinstance(SamplingParams(temperature=0).temperature, float)


def test_normalisation_and_frozen():
    p = SamplingParams(stop="###", stop_token_ids=[3, 4])
    assert p.stop == ("###",) and p.stop_token_ids == (3, 4)
    assert SamplingParams(stop=["a", "bc"]).stop == ("a", "bc")
    with pytest.raises(AttributeError):
        p.n = 2  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": True}, "n"),
        ({"n": 1.0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"n": 10**9}, "n must be <= 1024"),
        ({"max_tokens": 1e12}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.01}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"top_k": 2.0}, "top_k"),
        ({"top_k": False}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"seed": 1.5}, "seed"),
        ({"seed": True}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": None}, "max_tokens"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17}, "min_tokens"),
        ({"stop": ""}, "stop"),
        ({"stop": ["a", ""]}, "stop"),
        ({"stop": [1]}, "stop"),
        ({"stop": 3}, "stop"),
        ({"stop_token_ids": [1, "2"]}, "stop_token_ids"),
        ({"stop_token_ids": [True]}, "stop_token_ids"),
        ({"stop_token_ids": "12"}, "stop_token_ids"),
        ({"ignore_eos": 1}, "ignore_eos"),
        ({"logprobs": -1}, "logprobs"),
        ({"logprobs": 21}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"skip_special_tokens": None}, "skip_special_tokens"),
    ],
)
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [{"top_k": -1}, {"top_k": 0}, {"top_k": 5}, {"top_p": 1.0}, {"min_p": 1.0},
                                    {"logprobs": 0}, {"logprobs": 20}, {"min_tokens": 16}, {"presence_penalty": -2},
                                    {"frequency_penalty": 2}, {"repetition_penalty": 0.5}, {"seed": -(2**70)},
                                    {"n": 1024}])
def test_edge_values_are_valid(kwargs):
    SamplingParams(**kwargs)


def test_derive_seed_is_stable_and_distinct():
    assert derive_seed(0, 1) == derive_seed(0, 1)
    assert len({derive_seed(0, i) for i in range(1000)}) == 1000
    assert 0 <= derive_seed("x", 3) < 2**63

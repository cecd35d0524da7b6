"""HF transformers fp32 references for the engine's tests: greedy tokens and per-position log-probabilities.

Every prompt runs alone (no padding, no batching), so the numbers are HF's plain fp32 math. Loaded models are cached
per folder for the life of the test process.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["check_greedy_close", "hf_greedy", "hf_last_logits", "hf_logprobs", "load_hf_model"]


@functools.lru_cache(maxsize=8)
def _load(model_dir: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="eager")
    return model.eval()


def load_hf_model(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """The HF model of `model_dir` in eval mode with eager attention, fp32 unless `dtype` says otherwise (cached per
    resolved folder and dtype)."""
    return _load(str(Path(model_dir).resolve()), dtype)


@torch.inference_mode()
def hf_greedy(
    model_dir: str | Path, prompts_token_ids: list[list[int]], max_new_tokens: int, ignore_eos: bool = True,
    dtype: torch.dtype = torch.float32,
) -> list[list[int]]:
    """Greedy continuations of each prompt, computed one prompt at a time with HF's KV cache (fp32 unless `dtype`).

    Returns only the new token ids: exactly `max_new_tokens` of them when `ignore_eos`, otherwise stopping right
    after the first eos (eos included, like vLLM's `token_ids`). Ties in argmax go to the lowest id (torch.argmax).
    """
    model = load_hf_model(model_dir, dtype)
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    results = []
    for prompt in prompts_token_ids:
        if not prompt:
            raise ValueError("empty prompt")
        input_ids = torch.tensor([prompt], dtype=torch.long)  # [1, L]
        past = None
        new: list[int] = []
        while len(new) < max_new_tokens:
            out = model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = int(torch.argmax(out.logits[0, -1].float()))  # logits [1, L, V] -> [V]
            new.append(token)
            if not ignore_eos and token in eos_ids:
                break
            input_ids = torch.tensor([[token]], dtype=torch.long)  # [1, 1]
        results.append(new)
    return results


@torch.inference_mode()
def hf_logprobs(model_dir: str | Path, token_ids: list[int]) -> torch.Tensor:
    """fp32 log-softmax of the logits at every position of `token_ids`: a [L, V] tensor (row i predicts token i+1)."""
    model = load_hf_model(model_dir)
    input_ids = torch.tensor([list(token_ids)], dtype=torch.long)  # [1, L]
    logits = model(input_ids=input_ids, use_cache=False).logits[0].float()  # [L, V]
    return torch.log_softmax(logits, dim=-1)  # [L, V]


@torch.inference_mode()
def hf_last_logits(model_dir: str | Path, prompts_token_ids: list[list[int]]) -> list[torch.Tensor]:
    """fp32 logits of the last position of each prompt, run alone: a list of [V] tensors."""
    model = load_hf_model(model_dir)
    return [model(input_ids=torch.tensor([p], dtype=torch.long), use_cache=False).logits[0, -1].float()
            for p in prompts_token_ids]


def check_greedy_close(
    model_dir: str | Path,
    prompts_token_ids: list[list[int]],
    got: list[list[int]],
    max_new_tokens: int,
    ignore_eos: bool = True,
    tol: float = 1e-3,
) -> int:
    """Assert that `got` (an engine's greedy tokens per prompt) equals HF's fp32 greedy tokens, up to near-ties.

    A sequence may leave HF's only where HF's logit of its own choice beats the logit of the engine's choice by at
    most `tol` (a near-tie that fp32 rounding can flip); after that point the two are not compared further (as in
    vLLM's check_outputs_equal / check_logprobs_close). Any other difference, in tokens or in length before the
    divergence, raises AssertionError. Returns how many sequences matched exactly.
    """
    ref = hf_greedy(model_dir, prompts_token_ids, max_new_tokens, ignore_eos=ignore_eos)
    assert len(got) == len(ref), f"{len(got)} outputs for {len(ref)} prompts"
    exact = 0
    for i, (prompt, want, have) in enumerate(zip(prompts_token_ids, ref, got)):
        have = list(have)
        if have == want:
            exact += 1
            continue
        k = next((j for j, (a, b) in enumerate(zip(want, have)) if a != b), None)
        assert k is not None, f"prompt {i}: lengths differ, HF {len(want)} tokens {want} vs engine {len(have)} {have}"
        logits = hf_last_logits(model_dir, [list(prompt) + want[:k]])[0]  # [V]
        gap = float(logits[want[k]] - logits[have[k]])
        assert gap <= tol, (f"prompt {i}: token {k} differs (HF {want[k]}, engine {have[k]}) with logit gap {gap:.3g} "
                            f"> tol {tol}; HF {want} vs engine {have}")
    return exact

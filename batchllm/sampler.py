"""The vectorised, batch-invariant sampler (the parameters are `batchllm.sampling_params.SamplingParams`).

Processing order of one step, for every row of the batch (documented contract, tested):

1. penalties on the raw logits, in vLLM's order: repetition (tokens seen in prompt or output: positive logits are
   divided by the penalty, negative ones multiplied), then frequency (``- f * count`` over output tokens), then
   presence (``- p * [count > 0]`` over output tokens);
2. min_tokens: while the output is shorter than ``min_tokens`` the eos token (unless ``ignore_eos``) and every
   ``stop_token_ids`` entry get ``-inf``; structured outputs: every token the row's constraint forbids gets ``-inf``
   (its packed bitmask, see ``batchllm.structured``; rows without a constraint are not touched);
   -> the *logprobs* reported are ``log_softmax`` of the logits at this point (after penalties and the min_tokens
   mask, before temperature and filtering), i.e. the model's distribution as the penalties shape it, like vLLM's
   "processed" logprobs without the temperature;
   -> greedy rows (``temperature < 1e-5``) take ``argmax`` here (ties: lowest id, like ``torch.argmax``);
3. temperature: ``logits / temperature``;
4. top-k: keep the tokens whose logit is >= the k-th largest logit (ties at the k-th value are all kept);
5. top-p: on the top-k-filtered distribution, keep the shortest run of the tokens sorted by decreasing
   probability whose mass reaches ``top_p`` (tokens tied with the last kept one are kept too);
6. min-p: keep the tokens with ``p >= min_p * p_max`` (on the scaled, filtered distribution);
7. sampling by an exponential race (Gumbel-max): ``argmax(logit - log(E))`` with ``E = -log(u)`` and ``u`` uniform
   noise from a counter-based hash of ``(seed, output position, token id)``.

Reproducibility: the random choice of a row depends only on its seed, its output position and its own logits;
never on the other rows, their order or any global RNG state. There is no Python loop over rows except to build
the batch from lists and to turn the result into lists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from batchllm.model.cpu_kernels import load_fused_ops
from batchllm.sampling_params import SamplingParams
from batchllm.structured import apply_bitmask

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
# Odd multipliers of the noise hash (below 2**31, so they are int32 scalars).
_MIX_MUL_1 = 0x7FEB352D
_MIX_MUL_2 = 0x1B873593
_TOKEN_MUL = 0x2545F491


# ----------------------------------------------------------------------------------------------------------------------
# Counter-based noise
# ----------------------------------------------------------------------------------------------------------------------


def _splitmix64(x: int) -> int:
    """The SplitMix64 finaliser on a Python int (mod 2**64)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_key(seed: int, position: int) -> int:
    """The 32-bit key of the noise stream of one (seed, output position); pure Python, mixes all 64 seed bits."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) & _MASK32


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """Mix 32-bit values held in an int32 tensor in place (xorshift-multiply finaliser).

    Multiplication wraps mod 2**32 (two's complement, as torch's int32 kernels do on CPU and CUDA); right shifts are
    masked so they act as logical shifts. ``hash32`` is the same function on Python ints (the test reference).
    """
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    x.mul_(_MIX_MUL_1)
    x.bitwise_xor_((x >> 15) & 0x1FFFF)
    x.mul_(_MIX_MUL_2)
    x.bitwise_xor_((x >> 16) & 0xFFFF)
    return x


def hash32(key: int, token_id: int) -> int:
    """Pure-Python reference of the noise hash: the unsigned 32-bit hash of (row key, token id)."""

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * _MIX_MUL_1) & _MASK32
        x ^= x >> 15
        x = (x * _MIX_MUL_2) & _MASK32
        return x ^ (x >> 16)

    return mix((key & _MASK32) ^ mix((token_id * _TOKEN_MUL) & _MASK32))


def _to_int32(value: int) -> int:
    """The int32 (two's complement) reading of an unsigned 32-bit value."""
    return value - (1 << 32) if value >= (1 << 31) else value


def uniform_noise(keys: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Uniform noise in (0, 1), shape [R, C], for row keys ``keys`` [R] (int32) and ``token_ids`` [R or 1, C].

    Element (r, c) is a pure function of (keys[r], token_ids[r, c]): ``(hash32(key, id) >> 8) + 0.5) / 2**24``, so
    never 0 or 1, and the same whether computed over the whole vocabulary or over a few candidate ids.
    """
    tok = token_ids.to(torch.int32, copy=True).mul_(_to_int32(_TOKEN_MUL))  # [R or 1, C]
    h = _mix32_(keys[:, None] ^ _mix32_(tok))  # [R, C]
    u = ((h >> 8) & 0xFFFFFF).to(torch.float32)  # [R, C], exact integers < 2**24
    return u.add_(0.5).mul_(1.0 / (1 << 24))


# ----------------------------------------------------------------------------------------------------------------------
# The batch and the sampler
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class SamplingBatch:
    """Per-step tensors for the B rows that sample this step (built once per step by ``build``).

    Optional tensors are None when no row of the batch needs them; the sampler then skips that work.
    """

    num_rows: int
    vocab_size: int
    random_rows: torch.Tensor | None  # [R] int64 rows that sample (not greedy); None when all greedy
    all_random: bool
    temperature: torch.Tensor | None  # [R] float32
    top_k: torch.Tensor | None  # [R] int64, vocab_size where disabled; None when no row filters by top-k
    top_p: torch.Tensor | None  # [R] float32, 2.0 where disabled; None when no row filters by top-p
    min_p_log: torch.Tensor | None  # [R] float32 log(min_p), -inf where disabled; None when unused
    noise_keys: torch.Tensor | None  # [R] int32 noise keys (see noise_key)
    repetition: torch.Tensor | None  # [B, 1] float32
    frequency: torch.Tensor | None  # [B, 1] float32
    presence: torch.Tensor | None  # [B, 1] float32
    output_counts: torch.Tensor | None  # [B, V] float32 counts of each token in the output so far
    seen: torch.Tensor | None  # [B, V] bool token in prompt or output (for the repetition penalty)
    ban_rows: torch.Tensor | None  # [N] int64 (row, token) pairs masked by min_tokens
    ban_cols: torch.Tensor | None  # [N] int64
    num_logprobs: list[int | None] = field(default_factory=list)  # per row: None or k
    max_logprobs: int = -1  # max k over rows; -1 when no row asked for logprobs

    @classmethod
    def build(
        cls,
        params: Sequence[SamplingParams],
        seeds: Sequence[int],
        output_positions: Sequence[int],
        prompt_ids: Sequence[Sequence[int]] | None,
        output_ids: Sequence[Sequence[int]],
        eos_token_id: int | None,
        vocab_size: int,
        device,
    ) -> SamplingBatch:
        """Build the step's batch from per-row lists (the only Python loops over rows are here).

        ``seeds[i]``: the row's effective seed; ``output_positions[i]``: index in the output of the token being
        sampled; ``prompt_ids`` may be None when no row has a repetition penalty; ``output_ids[i]`` is only read for
        rows with penalties (other rows may pass an empty list).
        """
        b = len(params)
        if not (len(seeds) == len(output_positions) == len(output_ids) == b):
            raise ValueError("params, seeds, output_positions and output_ids must have the same length")
        v = vocab_size
        random_idx = [i for i, p in enumerate(params) if not p.is_greedy]
        rp = [params[i] for i in random_idx]
        random_rows = temperature = top_k = top_p = min_p_log = noise_keys = None
        if random_idx:
            random_rows = torch.tensor(random_idx, dtype=torch.int64, device=device)
            temperature = torch.tensor([p.temperature for p in rp], dtype=torch.float32, device=device)
            ks = [p.top_k if 0 < p.top_k < v else v for p in rp]
            if any(k < v for k in ks):
                top_k = torch.tensor(ks, dtype=torch.int64, device=device)
            if any(p.top_p < 1.0 for p in rp):
                top_p = torch.tensor([p.top_p if p.top_p < 1.0 else 2.0 for p in rp], dtype=torch.float32,
                                     device=device)
            if any(p.min_p > 0.0 for p in rp):
                min_p_log = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in rp],
                                         dtype=torch.float32, device=device)
            keys = [_to_int32(noise_key(seeds[i], output_positions[i])) for i in random_idx]
            noise_keys = torch.tensor(keys, dtype=torch.int32, device=device)

        repetition = frequency = presence = output_counts = seen = None
        if any(p.has_penalties for p in params):
            pen = [p.has_penalties for p in params]
            output_counts = _token_counts([o if keep else () for o, keep in zip(output_ids, pen)], v, device)
            frequency = torch.tensor([[p.frequency_penalty] for p in params], dtype=torch.float32, device=device)
            presence = torch.tensor([[p.presence_penalty] for p in params], dtype=torch.float32, device=device)
            if any(p.repetition_penalty != 1.0 for p in params):
                if prompt_ids is None:
                    raise ValueError("prompt_ids are required when a row has a repetition_penalty")
                rep = [p.repetition_penalty != 1.0 for p in params]
                seen = _token_counts([pr if keep else () for pr, keep in zip(prompt_ids, rep)], v, device) > 0
                seen |= output_counts > 0
                repetition = torch.tensor([[p.repetition_penalty] for p in params], dtype=torch.float32,
                                          device=device)

        ban_r: list[int] = []
        ban_c: list[int] = []
        for i, p in enumerate(params):
            if output_positions[i] < p.min_tokens:
                banned = set(p.stop_token_ids)
                if eos_token_id is not None and not p.ignore_eos:
                    banned.add(eos_token_id)
                banned = sorted(t for t in banned if 0 <= t < v)
                ban_r.extend([i] * len(banned))
                ban_c.extend(banned)
        ban_rows = ban_cols = None
        if ban_r:
            ban_rows = torch.tensor(ban_r, dtype=torch.int64, device=device)
            ban_cols = torch.tensor(ban_c, dtype=torch.int64, device=device)

        num_logprobs = [p.logprobs for p in params]
        max_logprobs = max((k for k in num_logprobs if k is not None), default=-1)
        return cls(b, v, random_rows, len(random_idx) == b, temperature, top_k, top_p, min_p_log, noise_keys,
                   repetition, frequency, presence, output_counts, seen, ban_rows, ban_cols, num_logprobs,
                   max_logprobs)


def _token_counts(rows: Sequence[Sequence[int]], vocab_size: int, device) -> torch.Tensor:
    """Counts [B, V] float32 of each token id of each row (ids outside [0, V) are ignored), by one scatter_add."""
    lengths = [len(r) for r in rows]
    counts = torch.zeros(len(rows) * vocab_size, dtype=torch.float32, device=device)  # [B * V]
    if sum(lengths):
        flat = torch.tensor([t for r in rows for t in r], dtype=torch.int64, device=device)  # [T]
        row_of = torch.repeat_interleave(torch.arange(len(rows), device=device),
                                         torch.tensor(lengths, device=device))  # [T]
        valid = (flat >= 0) & (flat < vocab_size)  # [T]
        idx = (row_of * vocab_size + flat)[valid]  # [T']
        counts.scatter_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
    return counts.view(len(rows), vocab_size)


@dataclass
class SampleResult:
    """What ``sample`` chose: one entry per row.

    ``logprobs[i]`` is the sampled token's logprob (see the module docstring for which distribution) when row i
    asked for logprobs (``logprobs`` not None), else None. ``top_logprobs[i]`` is, for a row with ``logprobs=k``,
    the k most likely ``(token_id, logprob)`` pairs, most likely first (empty for k=0); None for other rows.
    """

    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Return logits [B, V] float32 after penalties and the min_tokens mask (a new tensor when anything applies)."""
    x = logits
    if batch.output_counts is not None:
        x = x.to(torch.float32, copy=True)  # [B, V]
        if batch.repetition is not None:
            scaled = torch.where(x > 0, x / batch.repetition, x * batch.repetition)  # [B, V]
            x = torch.where(batch.seen, scaled, x)  # [B, V]
        x -= batch.frequency * batch.output_counts
        x -= batch.presence * (batch.output_counts > 0)
    if batch.ban_rows is not None:
        if x is logits:
            x = x.to(torch.float32, copy=True)
        x[batch.ban_rows, batch.ban_cols] = -math.inf
    return x


def _top_p_threshold(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` [R, V] the smallest logit top-p keeps: [R] (-inf where top_p is disabled, i.e. 2.0).

    The kept tokens are the shortest run of the tokens sorted by decreasing logit whose mass reaches ``top_p``
    (plus the tokens tied with the last one). No full sort (slow on CPU): a row whose 64 largest logits reach the
    mass takes the cut from their cumulative sum; any other row bisects over the float order (``_top_p_bisect``).
    Which way a row goes depends on that row alone.
    """
    r, v = x.shape
    threshold = torch.full((r,), -math.inf, dtype=torch.float32, device=x.device)  # [R]
    lse = torch.logsumexp(x, dim=-1)  # [R]
    pending = torch.nonzero(top_p <= 1.0)[:, 0]  # [P]
    if pending.numel() == 0:
        return threshold
    k = min(64, v)
    vals = torch.topk(x[pending], k, dim=-1).values  # [P, k] decreasing
    mass = torch.cumsum(torch.exp(vals - lse[pending, None]), dim=-1)  # [P, k]
    before = (mass < top_p[pending, None]).sum(dim=-1)  # [P] tokens kept before the one reaching top_p
    done = (before < k) | (k >= v)  # [P]
    last = vals.gather(1, before.clamp(max=k - 1)[:, None])[:, 0]  # [P]
    threshold[pending[done]] = last[done]
    rest = pending[~done]  # [Q]
    if rest.numel():
        threshold[rest] = _top_p_bisect(x[rest], lse[rest], top_p[rest])
    return threshold


def _float_order_keys(x: torch.Tensor) -> torch.Tensor:
    """int32 keys with the same order as the float32 values ``x`` (finite and infinite values)."""
    bits = x.view(torch.int32)
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _top_p_bisect(x: torch.Tensor, lse: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The largest logit t of each row of ``x`` [Q, V] with mass(x >= t) >= top_p: [Q].

    Bisection over the int32 images of the float32 values: 33 fixed rounds of a masked sum, exact in the float
    order, no sort and no host synchronisation.
    """
    probs = torch.exp(x - lse[:, None])  # [Q, V]
    keys = _float_order_keys(x)  # [Q, V]
    lo = keys.min(dim=-1).values.to(torch.int64)  # [Q] invariant: mass(keys >= lo) >= top_p
    hi = keys.max(dim=-1).values.to(torch.int64) + 1  # [Q] invariant: mass(keys >= hi) < top_p
    for _ in range(33):
        mid = lo + (hi - lo) // 2  # [Q]
        mass = (probs * (keys >= mid.to(torch.int32)[:, None])).sum(dim=-1)  # [Q]
        ok = mass >= top_p  # [Q]
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    bits = lo.to(torch.int32)  # [Q]
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).view(torch.float32)


def _filter_and_sample(x: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Sample one token id per row of ``x`` [R, V] (the processed logits of the random rows). Changes ``x``.

    Every filter is a per-row logit threshold (top-k: the k-th largest; top-p: see ``_top_p_threshold``; min-p:
    ``max + log(min_p)``). When all rows keep few tokens, the exponential race runs over the kept candidates only;
    the noise of a token depends only on (row key, token id), so both paths pick the same token.
    """
    x = x.to(torch.float32)
    x.div_(batch.temperature[:, None])
    r, v = x.shape
    filtered = False
    if batch.top_k is not None:
        k_max = int(batch.top_k.max())
        top_vals = torch.topk(x, k_max, dim=-1).values  # [R, k_max]
        kth = top_vals.gather(1, (batch.top_k.clamp(max=k_max) - 1)[:, None])  # [R, 1]
        kth = torch.where(batch.top_k[:, None] >= v, -math.inf, kth)  # [R, 1]
        x.masked_fill_(x < kth, -math.inf)
        filtered = True
    if batch.top_p is not None:
        x.masked_fill_(x < _top_p_threshold(x, batch.top_p)[:, None], -math.inf)
        filtered = True
    if batch.min_p_log is not None:
        threshold = x.max(dim=-1, keepdim=True).values + batch.min_p_log[:, None]  # [R, 1]
        x.masked_fill_(x < threshold, -math.inf)
        filtered = True

    if filtered:
        num_kept = int((x > -math.inf).sum(dim=-1).max())
        if num_kept * 8 <= v:
            vals, ids = torch.topk(x, num_kept, dim=-1)  # [R, C] candidates (all kept tokens of every row)
            log_e = uniform_noise(batch.noise_keys, ids).log_().neg_().log_()  # [R, C] log of Exp(1) noise
            return ids.gather(1, torch.argmax(vals.sub_(log_e), dim=-1, keepdim=True))[:, 0]  # [R]
    all_ids = torch.arange(v, device=x.device)[None, :]  # [1, V]
    log_e = uniform_noise(batch.noise_keys, all_ids).log_().neg_().log_()  # [R, V] log of Exp(1) noise
    return torch.argmax(x.sub_(log_e), dim=-1)  # [R]


def greedy_tokens(x: torch.Tensor) -> torch.Tensor:
    """Per row of ``x`` [B, V] the index of its largest value, the lowest among ties: ``torch.argmax`` of the fp32
    values. bf16 logits on a CPU whose kernel path has the bf16 kernels take one fused pass (0.17 ms for 128 x 32000
    on Zen 5 with AVX-512, against 3.1 ms for converting and ``torch.argmax``); other inputs are converted to fp32
    first (torch's argmax of bf16 is slower still on CPU). Returns [B] int64."""
    kernels = load_fused_ops(x.dtype, x.device) if x.dtype == torch.bfloat16 else None
    if kernels is not None and x.shape[1] > 0:
        return kernels.argmax_rows(x.contiguous())
    return torch.argmax(x.float(), dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch,
           grammar: tuple[torch.Tensor, torch.Tensor] | None = None) -> SampleResult:
    """Choose one token per row of ``logits`` [B, V] (any float dtype); ``logits`` is not modified. ``grammar``:
    (rows [R], their packed bitmask [R, W] int32) of the rows under a structured-output constraint."""
    if logits.dim() != 2 or logits.shape[0] != batch.num_rows:
        raise ValueError(f"logits must be [{batch.num_rows}, V], got {tuple(logits.shape)}")
    if logits.shape[1] != batch.vocab_size:
        raise ValueError(f"logits have {logits.shape[1]} columns, the batch was built for {batch.vocab_size}")
    x = apply_penalties(logits, batch)  # [B, V]
    if grammar is not None:
        if x is logits:
            x = logits.clone()  # [B, V]
        apply_bitmask(x, *grammar)

    lp = None
    if batch.max_logprobs >= 0:
        lp = torch.log_softmax(x, dim=-1, dtype=torch.float32)  # [B, V]

    if batch.random_rows is None:
        tokens = greedy_tokens(x)  # [B]
    elif batch.all_random:
        tokens = _filter_and_sample(x if x is not logits else x.to(torch.float32, copy=True), batch)  # [B]
    else:
        tokens = greedy_tokens(x)  # [B]
        tokens[batch.random_rows] = _filter_and_sample(x[batch.random_rows], batch)

    token_list = tokens.tolist()
    logprobs: list[float | None] = [None] * batch.num_rows
    top: list[list[tuple[int, float]] | None] = [None] * batch.num_rows
    if lp is not None:
        chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()  # [B]
        top_ids: list[list[int]] = [[] for _ in range(batch.num_rows)]
        top_vals: list[list[float]] = [[] for _ in range(batch.num_rows)]
        if batch.max_logprobs > 0:
            vals, ids = torch.topk(lp, min(batch.max_logprobs, batch.vocab_size), dim=-1)  # [B, k]
            top_ids, top_vals = ids.tolist(), vals.tolist()
        for i, k in enumerate(batch.num_logprobs):
            if k is not None:
                logprobs[i] = chosen[i]
                top[i] = list(zip(top_ids[i][:k], top_vals[i][:k]))
    return SampleResult(token_list, logprobs, top)

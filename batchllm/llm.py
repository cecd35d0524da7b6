"""`LLM`: the engine behind a vLLM-shaped API.

A call to `generate` / `chat` / `generate_stream` runs the whole batch:

    validate + tokenize  ->  plan (global prefix tree -> groups)  ->  order groups (decode-heavy first)
    ->  loop { schedule -> run model -> sample -> update }  ->  outputs as requests finish

`step()` is the loop body; everything it touches lives on the engine object, nothing is module-global.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from batchllm import machine
from batchllm.batch import build_sequences
from batchllm.config import EngineConfig, ModelConfig
from batchllm.detokenize import IncrementalDetokenizer, find_stop
from batchllm.hub import resolve_model
from batchllm.kv.cache import KVCache
from batchllm.model.decoder import DecoderModel
from batchllm.model.loader import load_weights
from batchllm.outputs import CompletionOutput, RequestOutput
from batchllm.prefix.plan import plan_batch
from batchllm.request import Sequence as Seq
from batchllm.runner import ModelRunner, SampleRow
from batchllm.sampling_params import SamplingParams, derive_seed
from batchllm.scheduler import Scheduler, StepPlan
from batchllm.tokenizer import encode, encode_batch, encode_chat, load_tokenizer

Prompt = str | dict


class Stats(dict):
    """A dict of figures that also reads as attributes: `llm.stats()["computed_prompt_tokens"]` or
    `llm.stats().computed_prompt_tokens`."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class _Request:
    """Per-request bookkeeping while a batch runs."""

    index: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    leaves: list[Seq] = field(default_factory=list)
    outputs: list[CompletionOutput | None] = field(default_factory=list)
    detok: list[IncrementalDetokenizer | None] = field(default_factory=list)
    logprobs: list[list[dict[int, float]] | None] = field(default_factory=list)
    cumulative: list[float] = field(default_factory=list)
    pending: int = 0


class LLM:
    """Offline batch inference. `model`: an HF folder, a .gguf file (or a folder holding one), a named model
    (`smollm2-135m-instruct`) or a hub id; see `batchllm.hub`."""

    def __init__(self, model: str | Path, dtype: str | torch.dtype = "auto", kv_cache_memory_bytes: int | None = None,
                 block_size: int = 16, max_num_batched_tokens: int = 2048, seed: int = 0, device: str = "auto",
                 policy: str = "batchllm", decode_estimate: str = "history", max_num_seqs: int = 256,
                 plan_mode: str = "nested", kv_cache_commit: str = "auto", max_model_len: int | None = None):
        self.device = machine.resolve_device(device)
        self.dtype = machine.resolve_dtype(dtype, self.device)
        self.load_timings: dict[str, float] = {}  # seconds spent fetching, converting and loading the model
        model_dir = self.model_dir = resolve_model(model, self.dtype, self.load_timings)
        start = time.perf_counter()
        self.model_config = _with_context(ModelConfig.from_hf(model_dir), max_model_len)
        self.tokenizer = load_tokenizer(model_dir)
        budget = kv_cache_memory_bytes if kv_cache_memory_bytes is not None else machine.default_kv_budget(self.device)
        if kv_cache_commit not in ("auto", "upfront", "lazy"):
            raise ValueError(f"kv_cache_commit must be 'auto', 'upfront' or 'lazy', got {kv_cache_commit!r}")
        # An explicit budget is a reservation: committed now, as vLLM does, so the run never waits on fresh pages.
        # The default budget (a guessed share of RAM) stays a ceiling: committed only as blocks fill.
        commit = kv_cache_commit == "upfront" or (kv_cache_commit == "auto" and kv_cache_memory_bytes is not None)
        available = machine.available_memory() if commit and self.device.type == "cpu" else None
        if available is not None and budget > available:
            raise ValueError(f"kv_cache_memory_bytes={budget} is more than the {available} bytes of memory available "
                             f"to commit now; pass a smaller budget, or kv_cache_commit='lazy' to map it as it fills")
        num_blocks = KVCache.blocks_for_budget(self.model_config, budget, block_size, self.dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={budget} holds no KV block of {block_size} tokens "
                             f"({KVCache.bytes_per_block(self.model_config, block_size, self.dtype)} bytes)")
        self.config = EngineConfig(block_size=block_size, max_num_batched_tokens=max_num_batched_tokens,
                                   kv_cache_blocks=num_blocks, policy=policy, seed=seed,
                                   decode_estimate=decode_estimate)
        if plan_mode not in ("nested", "one-level", "none"):
            raise ValueError(f"plan_mode must be 'nested', 'one-level' or 'none', got {plan_mode!r}")
        self.plan_mode = plan_mode if policy == "batchllm" else "none"
        self.max_num_seqs = max_num_seqs
        self.model = DecoderModel(self.model_config, self.dtype, self.device)
        load_weights(self.model, model_dir)
        self.kv = KVCache(self.model_config, num_blocks, block_size, self.dtype, self.device, commit=commit)
        eos = self.model_config.eos_token_ids or ((self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id
                                                   is not None else ())
        self.eos_token_ids = frozenset(eos)
        self.runner = ModelRunner(self.model, self.kv, next(iter(sorted(eos)), None))
        self.load_timings["load_s"] = time.perf_counter() - start
        self.progress: dict = {}
        self._stats: dict = {}

    # ------------------------------------------------------------------ API
    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params=None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        results: list[RequestOutput | None] = [None] * len(prompts)
        bar = _progress_bar(len(prompts), use_tqdm)
        for i, out in self.generate_stream(prompts, sampling_params):
            results[i] = out
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return results  # type: ignore[return-value]

    def chat(self, conversations, sampling_params=None, use_tqdm: bool = True,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """`generate` over conversations (lists of messages) rendered by the tokenizer's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts: list[Prompt] = []
        for conv in conversations:
            try:
                text, ids = encode_chat(self.tokenizer, conv, add_generation_prompt)
                prompts.append({"prompt": text, "prompt_token_ids": ids})
            except Exception as e:  # a bad conversation fails alone
                prompts.append({"error": f"invalid conversation: {e}"})
        return self.generate(prompts, sampling_params, use_tqdm)

    def stats(self) -> Stats:
        """Figures of the last generate/chat call (a dict that also reads as attributes)."""
        return Stats(self._stats)

    # ------------------------------------------------------------ the batch
    def generate_stream(self, prompts: Iterable[Prompt], sampling_params=None) -> Iterator[tuple[int, RequestOutput]]:
        """Run the batch, yielding (input index, output) as each request finishes."""
        prompts = list(prompts)
        params_list = _expand_params(sampling_params, len(prompts))
        start = self._t0 = time.perf_counter()
        self._begin(len(prompts))
        encoded = self._encode_texts(prompts)
        requests: list[_Request] = []
        for i, (p, sp) in enumerate(zip(prompts, params_list)):
            req, error = self._make_request(i, p, sp, encoded.get(i))
            if error is not None:
                self._stats["num_errors"] += 1
                self.progress["requests_done"] += 1
                yield i, RequestOutput(request_id=str(i), prompt=req.prompt, prompt_token_ids=req.prompt_ids,
                                       outputs=[CompletionOutput(0, "", [], "error")], finished=True, error=error)
            else:
                requests.append(req)
        self.scheduler = Scheduler(self.config, max_num_seqs=self.max_num_seqs)
        self._add_requests(requests)
        peak_blocks = 0
        while self.scheduler.has_work():
            finished = self.step()
            peak_blocks = max(peak_blocks, self.scheduler.kv.num_used)
            self._stats["peak_kv_blocks"] = peak_blocks
            self.progress["elapsed_s"] = time.perf_counter() - start
            for req in finished:
                yield req.index, self._request_output(req)
        self._stats["elapsed_s"] = time.perf_counter() - start
        self._stats["preemptions"] = self.scheduler.num_preemptions

    def _begin(self, n: int) -> None:
        self._stats = {"num_requests": n, "num_errors": 0, "prompt_tokens": 0, "computed_prompt_tokens": 0,
                       "output_tokens": 0, "elapsed_s": 0.0, "preemptions": 0, "peak_kv_blocks": 0,
                       "kv_blocks_total": self.config.kv_cache_blocks, "policy": self.config.policy,
                       "plan": {}, "trace": []}
        self.progress = {"step": 0, "requests_total": n, "requests_done": 0, "prompt_tokens": 0,
                         "computed_prompt_tokens": 0, "output_tokens": 0, "elapsed_s": 0.0, "kv_blocks_used": 0,
                         "kv_blocks_total": self.config.kv_cache_blocks, "num_running": 0, "num_waiting": 0}

    def _encode_texts(self, prompts: list) -> dict[int, list[int]]:
        """Token ids of every text prompt, encoded in one batch; {} if that fails (each is then encoded alone)."""
        texts = [(i, _text_of(p)) for i, p in enumerate(prompts) if _text_of(p) is not None]
        if not texts:
            return {}
        try:
            return dict(zip((i for i, _ in texts), encode_batch(self.tokenizer, [t for _, t in texts])))
        except Exception:
            return {}

    def _make_request(self, i: int, prompt: Prompt, params: SamplingParams,
                      ids: list[int] | None = None) -> tuple[_Request, str | None]:
        """Tokenize (unless `ids` are given) and validate one prompt; return the request and an error message
        (None when it can run)."""
        text, error = _text_of(prompt), None
        try:
            if text is not None:
                ids = ids if ids is not None else encode(self.tokenizer, text)
            elif isinstance(prompt, dict) and "error" in prompt:
                error = str(prompt["error"])
            elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            else:
                error = "a prompt must be a str, {'prompt': str} or {'prompt_token_ids': [int, ...]}"
        except Exception as e:
            error = f"could not tokenize the prompt: {e}"
        ids = ids if ids is not None else []
        seed = params.seed if params.seed is not None else derive_seed(self.config.seed, i)
        req = _Request(i, text, ids, params, seed)
        if error is None:
            error = self._check_fits(ids, params)
        return req, error

    def _check_fits(self, ids: list[int], params: SamplingParams) -> str | None:
        cfg, bs = self.model_config, self.config.block_size
        if not ids:
            return "the prompt is empty"
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            return f"token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})"
        total = len(ids) + params.max_tokens
        if total > cfg.max_model_len:
            return (f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) = {total} exceeds the model's "
                    f"context of {cfg.max_model_len} tokens")
        if -(-total // bs) > self.config.kv_cache_blocks:
            return (f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) needs {-(-total // bs)} KV blocks; "
                    f"the KV cache holds {self.config.kv_cache_blocks}")
        return None

    def _add_requests(self, requests: list[_Request]) -> None:
        """Plan the batch globally, build node and leaf sequences, and queue the groups in their start order."""
        flat: list[tuple[_Request, int]] = [(r, k) for r in requests for k in range(r.params.n)]
        prompts = [r.prompt_ids for r, _ in flat]
        plan = plan_batch(prompts, self.config.block_size, mode=self.plan_mode)
        seqs = build_sequences(plan, prompts, [r.params.max_tokens for r, _ in flat], [r.index for r, _ in flat],
                               [k for _, k in flat], self.config.policy)
        self._stats["plan"] = plan.stats.to_dict()
        self._stats["prompt_tokens"] = self.progress["prompt_tokens"] = sum(len(r.prompt_ids) for r in requests)
        self._leaf_req = {}
        for (req, k), leaf in zip(flat, seqs.leaves):
            self._leaf_req[leaf.seq_id] = (req, k)
            req.leaves.append(leaf)
            req.outputs.append(None)
            req.cumulative.append(0.0)
            req.logprobs.append([] if req.params.logprobs is not None else None)
            req.detok.append(IncrementalDetokenizer(self.tokenizer, req.prompt_ids, req.params.skip_special_tokens)
                             if req.params.stop else None)
            req.pending += 1
        self.scheduler.add(seqs.roots)

    # ------------------------------------------------------------------ step
    def step(self) -> list[_Request]:
        """One engine step: schedule, run, sample, update. Returns the requests that finished."""
        plan = self.scheduler.schedule()
        if not plan.seqs:
            return self._fail_stuck()
        rows = [SampleRow(s, self._leaf_req[s.seq_id][0].params, self._leaf_seed(s))
                for i, s in enumerate(plan.seqs) if plan.samples(i)]
        result = self.runner.execute(plan, rows)
        self.scheduler.commit(plan)
        self._account(plan, rows)
        finished = []
        if result is not None:
            for row, tok, lp, top in zip(rows, result.token_ids, result.logprobs, result.top_logprobs):
                req = self._append_token(row.seq, tok, lp, top)
                if req is not None:
                    finished.append(req)
        return finished

    def _leaf_seed(self, seq: Seq) -> int:
        req, k = self._leaf_req[seq.seq_id]
        return req.seed if k == 0 else derive_seed(req.seed, k)

    def _account(self, plan: StepPlan, rows: list[SampleRow]) -> None:
        prefill = 0
        for s, n in zip(plan.seqs, plan.num_new):
            prefill += max(0, min(s.num_computed_tokens, s.num_prompt_tokens) - (s.num_computed_tokens - n))
        st, pr = self._stats, self.progress
        st["computed_prompt_tokens"] += prefill
        st["output_tokens"] += len(rows)
        sched = self.scheduler
        st["trace"].append({"t": round(time.perf_counter() - self._t0, 4), "prefill_tokens": prefill,
                            "decode_tokens": plan.num_tokens - prefill, "num_seqs": len(plan.seqs),
                            "kv_blocks_used": sched.kv.num_used})
        pr.update(step=pr["step"] + 1, computed_prompt_tokens=st["computed_prompt_tokens"],
                  output_tokens=st["output_tokens"], kv_blocks_used=sched.kv.num_used,
                  num_running=len(sched.running), num_waiting=sched.num_waiting)

    def _append_token(self, seq: Seq, tok: int, lp: float | None, top) -> _Request | None:
        """Append a sampled token to a leaf; finish it on a stop condition. Returns its request if that finished."""
        req, k = self._leaf_req[seq.seq_id]
        p = req.params
        seq.token_ids.append(tok)
        if lp is not None:
            req.cumulative[k] += lp
        if req.logprobs[k] is not None:
            entry = {tok: lp} if lp is not None else {}
            for t, v in top or ():
                entry.setdefault(t, v)
            req.logprobs[k].append(entry)
        n_out = seq.num_output_tokens
        reason, stop_reason, text = None, None, None
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_token_ids:
                reason = "stop"
            elif tok in p.stop_token_ids:
                reason, stop_reason = "stop", tok
        det = req.detok[k]
        if det is not None:
            new = det.push(tok)
            if reason is None and n_out >= p.min_tokens:
                full = det.text
                at = find_stop(full, len(new), p.stop)
                if at is not None:
                    reason = "stop"
                    stop_reason = next(s for s in p.stop if full.startswith(s, at))
                    text = full[:at]
        if reason is None and (n_out >= p.max_tokens or seq.num_tokens >= self.model_config.max_model_len):
            reason = "length"
        if reason is None:
            return None
        if text is None and det is not None:
            det.flush()
            text = det.text
        if text is None:
            text = self.tokenizer.decode(
                seq.output_ids, skip_special_tokens=p.skip_special_tokens)
        req.outputs[k] = CompletionOutput(k, text, list(seq.output_ids), reason, stop_reason,
                                          req.cumulative[k] if p.logprobs is not None else None, req.logprobs[k])
        self.scheduler.finish(seq)
        req.pending -= 1
        if req.pending:
            return None
        self.progress["requests_done"] += 1
        return req

    def _fail_stuck(self) -> list[_Request]:
        """No sequence could be scheduled even with nothing running: fail the head of the queue."""
        head = self.scheduler.head()
        leaves = head.leaves()
        finished = []
        for leaf in leaves:
            req, k = self._leaf_req[leaf.seq_id]
            req.outputs[k] = CompletionOutput(k, "", list(leaf.output_ids), "error")
            self.scheduler.finish(leaf)
            req.pending -= 1
            if req.pending == 0:
                self.progress["requests_done"] += 1
                finished.append(req)
        if head.is_node:
            self.scheduler.remove_queued(head)
        return finished

    def _request_output(self, req: _Request) -> RequestOutput:
        outs = [o for o in req.outputs if o is not None]
        error = None
        if any(o.finish_reason == "error" for o in outs):
            error = "the request could not be scheduled within the KV cache budget"
        return RequestOutput(request_id=str(req.index), prompt=req.prompt, prompt_token_ids=req.prompt_ids,
                             outputs=outs, num_cached_tokens=req.leaves[0].num_cached_tokens, finished=True,
                             error=error)


def _with_context(cfg: ModelConfig, max_model_len: int | None) -> ModelConfig:
    """The model's config with the engine's context length: `max_model_len`, or by default the model's own (for a
    longrope model, its original context, within which it equals HF exactly; see `layers.rope_inv_freq`)."""
    limit = cfg.max_model_len
    if max_model_len is None:
        long_rope = cfg.rope.rope_type == "longrope"
        return replace(cfg, max_model_len=cfg.rope.original_max_position_embeddings) if long_rope else cfg
    if not 0 < max_model_len <= limit:
        raise ValueError(f"max_model_len must be in [1, {limit}] (the model's max_position_embeddings), "
                         f"got {max_model_len}")
    return replace(cfg, max_model_len=max_model_len)


def _text_of(prompt) -> str | None:
    """The text of a prompt given as text (a str, or {'prompt': str} without token ids); None otherwise."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict) and "prompt_token_ids" not in prompt and "error" not in prompt \
            and isinstance(prompt.get("prompt"), str):
        return prompt["prompt"]
    return None


def _expand_params(sampling_params, n: int) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts")
    return params


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", disable=os.environ.get("BATCHLLM_NO_TQDM") == "1")

"""BatchRun: one generate call over an Engine. It plans the whole batch (global prefix tree -> groups), builds the
node and leaf sequences, queues the groups in their start order and steps until every request has finished:

    step:  plan = scheduler.schedule()  ->  runner.execute(plan, sampling rows)  ->  scheduler.commit(plan)
           ->  each sampled token to its leaf's LeafOutput  ->  finished leaves to scheduler.finish

Its state (requests, sequences, scheduler, stats) lives here and nowhere else; the engine only lends the model and
the KV cache.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from batchllm.batch import build_sequences, plan_for_cache
from batchllm.outputs import CompletionOutput, LeafOutput, RequestOutput
from batchllm.request import Sequence
from batchllm.runner import SampleRow
from batchllm.sampling_params import SamplingParams, derive_seed
from batchllm.scheduler import Scheduler, StepPlan
from batchllm.stats import RunStats


@dataclass
class Request:
    """One request of a run: its prompt (text, for the output) and token ids, sampling params and seed, or the
    error that keeps it from running. While it runs: one leaf sequence and one LeafOutput per sample."""

    index: int
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    error: str | None = None
    leaves: list[Sequence] = field(default_factory=list)
    samples: list[LeafOutput] = field(default_factory=list)
    pending: int = 0

    def output(self, prompt_lps: dict[int, dict] | None = None) -> RequestOutput:
        """The request's output; `prompt_lps`: the run's prompt-logprob rows (seq_id -> position -> row)."""
        if self.error is not None:
            return RequestOutput(request_id=str(self.index), prompt=self.prompt, prompt_token_ids=self.prompt_ids,
                                 outputs=[CompletionOutput(0, "", [], "error")], finished=True, error=self.error)
        outs = [s.output for s in self.samples if s.output is not None]
        error = None
        if any(o.finish_reason == "error" for o in outs):
            error = "the request could not be scheduled within the KV cache budget"
        return RequestOutput(request_id=str(self.index), prompt=self.prompt, prompt_token_ids=self.prompt_ids,
                             outputs=outs, num_cached_tokens=self.leaves[0].num_cached_tokens, finished=True,
                             error=error, prompt_logprobs=self._prompt_logprobs(prompt_lps) if error is None else None)

    def _prompt_logprobs(self, rows: dict[int, dict] | None) -> list[dict[int, float] | None] | None:
        """Per prompt position j, the row at position j - 1 of whichever sequence holds it (a shared node's rows
        serve every request below it): the logprob of token j, and the top tokens."""
        if self.params.prompt_logprobs is None or rows is None:
            return None
        chain = [*self.leaves[0].ancestors(), self.leaves[0]]
        first = self.params.prompt_logprobs_from
        out: list[dict[int, float] | None] = []
        for j, token in enumerate(self.prompt_ids):
            if j == 0 or j < first:
                out.append(None)
                continue
            holder = next(s for s in reversed(chain) if s.start <= j - 1)
            row = rows[holder.seq_id][j - 1]
            entry = {token: row.logprobs[token]}
            for t, v in row.top:
                entry.setdefault(t, v)
            out.append(entry)
        return out


class BatchRun:
    """Iterate for (request index, RequestOutput) as requests finish (failed ones first)."""

    def __init__(self, engine, requests: list[Request]):
        self.engine = engine
        self.requests = requests
        cfg = engine.config
        self.stats = RunStats(num_requests=len(requests), kv_blocks_total=cfg.kv_cache_blocks, policy=cfg.policy)
        self.scheduler = Scheduler(cfg, max_num_seqs=engine.args.max_num_seqs)
        self._leaf: dict[int, tuple[Request, int]] = {}  # leaf seq_id -> (request, sample index)
        self._prompt_lps: dict[int, dict] = {}  # seq_id -> position -> PromptLogprobRow
        self._start = time.perf_counter()
        runnable = [r for r in requests if r.error is None]
        self.stats.num_errors = len(requests) - len(runnable)
        self._plan(runnable)

    def _plan(self, requests: list[Request]) -> None:
        """Plan the batch globally, build node and leaf sequences, and queue the groups in their start order."""
        flat = [(r, k) for r in requests for k in range(r.params.n)]
        prompts = [r.prompt_ids for r, _ in flat]
        cfg = self.engine.config
        plan = plan_for_cache(prompts, [len(p) + r.params.max_tokens for p, (r, _) in zip(prompts, flat)],
                              cfg.block_size, self.engine.args.plan, cfg.kv_cache_blocks)
        want = [None if r.params.prompt_logprobs is None else (r.params.prompt_logprobs, r.params.prompt_logprobs_from)
                for r, _ in flat]
        seqs = build_sequences(plan, prompts, [r.params.max_tokens for r, _ in flat], [r.index for r, _ in flat],
                               [k for _, k in flat], self.engine.config.policy, want)
        self.stats.plan = plan.stats.to_dict()
        self.stats.prompt_tokens = sum(len(p) for p in prompts)  # per sample: what no reuse would compute
        for (req, k), leaf in zip(flat, seqs.leaves):
            self._leaf[leaf.seq_id] = (req, k)
            req.leaves.append(leaf)
            req.samples.append(LeafOutput(k, req.params, self.engine.tokenizer, req.prompt_ids, self.engine.grammars))
            req.pending += 1
        self.scheduler.add(seqs.roots)

    def __iter__(self) -> Iterator[tuple[int, RequestOutput]]:
        for req in self.requests:
            if req.error is not None:
                self.stats.requests_done += 1
                yield req.index, req.output()
        while self.scheduler.has_work():
            for req in self.step():
                yield req.index, req.output(self._prompt_lps)
                if req.params.prompt_logprobs is not None:
                    for leaf in req.leaves:
                        self._prompt_lps.pop(leaf.seq_id, None)
        self.stats.elapsed_s = time.perf_counter() - self._start

    # ------------------------------------------------------------------ step
    def step(self) -> list[Request]:
        """One engine step: schedule, run, sample, update. Returns the requests that finished."""
        plan = self.scheduler.schedule()
        if not plan.seqs:
            return self._fail_stuck()
        rows = [SampleRow(s, self._leaf[s.seq_id][0].params, self._seed(s), self._sample(s).matcher)
                for i, s in enumerate(plan.seqs) if plan.samples(i)]
        result, prompt_lps = self.engine.runner.execute(plan, rows)
        for row in prompt_lps:
            self._prompt_lps.setdefault(row.seq.seq_id, {})[row.position] = row
        self.scheduler.commit(plan)
        self._account(plan, len(rows))
        finished = []
        for seq in plan.seqs:  # scored prompts (max_tokens 0) end once computed, with nothing generated
            if not seq.is_node and seq.max_tokens == 0 and seq.num_computed_tokens == seq.num_tokens:
                req, k = self._leaf[seq.seq_id]
                req.samples[k].finish(seq, "length")
                if self._finish_leaf(seq):
                    finished.append(req)
        if result is not None:
            for row, tok, lp, top in zip(rows, result.token_ids, result.logprobs, result.top_logprobs):
                row.seq.token_ids.append(tok)
                req, k = self._leaf[row.seq.seq_id]
                done = req.samples[k].append(row.seq, tok, lp, top, self.engine.eos_token_ids,
                                             self.engine.model_config.max_model_len)
                if done is not None and self._finish_leaf(row.seq):
                    finished.append(req)
        return finished

    def _sample(self, seq: Sequence) -> LeafOutput:
        req, k = self._leaf[seq.seq_id]
        return req.samples[k]

    def _seed(self, seq: Sequence) -> int:
        req, k = self._leaf[seq.seq_id]
        return req.seed if k == 0 else derive_seed(req.seed, k)

    def _finish_leaf(self, leaf: Sequence) -> bool:
        """Free a finished leaf; returns whether that was its request's last sample."""
        req, _ = self._leaf[leaf.seq_id]
        self.scheduler.finish(leaf)
        req.pending -= 1
        if req.pending:
            return False
        self.stats.requests_done += 1
        return True

    def _account(self, plan: StepPlan, sampled: int) -> None:
        prefill = 0
        for s, n in zip(plan.seqs, plan.num_new):
            prefill += max(0, min(s.num_computed_tokens, s.num_prompt_tokens) - (s.num_computed_tokens - n))
        st, sched = self.stats, self.scheduler
        st.computed_prompt_tokens += prefill
        st.output_tokens += sampled
        st.steps += 1
        st.kv_blocks_used = sched.kv.num_used
        st.peak_kv_blocks = max(st.peak_kv_blocks, st.kv_blocks_used)
        st.num_running, st.num_waiting = len(sched.running), sched.num_waiting
        st.preemptions = sched.num_preemptions
        st.elapsed_s = time.perf_counter() - self._start
        st.trace.add(round(st.elapsed_s, 4), prefill, plan.num_tokens - prefill, len(plan.seqs), st.kv_blocks_used)

    def _fail_stuck(self) -> list[Request]:
        """No sequence could be scheduled even with nothing running: fail the head of the queue."""
        head = self.scheduler.head()
        finished = []
        for leaf in head.leaves():
            req, k = self._leaf[leaf.seq_id]
            req.samples[k].output = CompletionOutput(k, "", list(leaf.output_ids), "error")
            if self._finish_leaf(leaf):
                finished.append(req)
        if head.is_node:
            self.scheduler.remove_queued(head)
        return finished

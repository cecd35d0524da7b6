"""`batchllm run --ray`: one batch job over Ray actors, with the whole batch planned once and sharded by prefix.

The driver (this process) does all a local run does except generation: pass 1 validates every line and writes the
error lines, resume skips the custom_ids already in OUT, and results are formatted by `write_result` and appended
through the same synced ResultWriter. Pass 2 (`ray_pass`) differs:

1. The runnable requests not yet in OUT are tokenized and planned once, globally (`plan_batch`). `shard_plan` spreads
   the plan's groups over the workers: whole groups as *pieces*, balanced by cost (prompt tokens to compute plus
   max decode tokens); a group is split only when it alone costs more than a worker's fair share.
2. Each worker is a long-lived actor holding one engine (`EngineWorker`). Its pieces are packed into engine calls of
   at most `--window` requests (whole pieces). A call is one `generate_stream` over its pieces, so the engine mixes
   their groups in its steps, and each piece comes back as soon as its last request finishes (an item of a Ray
   streaming generator): the piece is the unit of delivery. `CALLS_IN_FLIGHT` calls are queued on each actor, so it
   never waits for the driver. A worker whose queue runs dry takes a queued call from the most loaded worker.
3. A worker that dies loses only its undelivered pieces: they are packed into new calls on the surviving workers,
   least loaded first. The dead actor's calls are dropped, so a piece is delivered (and written) exactly once.

Resume: every delivered result is in OUT (synced as the local run syncs), so a rerun after a killed driver plans
only what is missing. Results equal a local run's in fp32 (the engine is token-identical whatever the grouping);
in bf16 they may differ in the last bits where the grouping differs.

`import ray` happens only in `import_ray`: batchllm imports and runs without Ray installed.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from batchllm.distributed.shard import ShardPlan, calls_of_workers, lpt, pack_pieces, shard_plan
from batchllm.engine_args import EngineArgs
from batchllm.jobs import openai_batch as ob
from batchllm.jobs.generate import Progress, served_model_name, write_result
from batchllm.jobs.report import JobTotals
from batchllm.jobs.scan import SCAN_CHUNK, JobError, Pending, Validator, prepare_runnable, read_lines_at
from batchllm.jobs.writer import ResultWriter
from batchllm.prefix.plan import PrefixPlan, plan_batch

RAY_HINT = "pip install 'batchllm[ray]'"
CALLS_IN_FLIGHT = 2  # engine calls queued on each actor: one running, the next ready to start

# piece id, [(request key, token ids, SamplingParams)]: what a call sends for one piece
PiecePayload = tuple[int, list[tuple[int, np.ndarray, Any]]]
# hook(dispatcher, worker, piece id), called after each delivered piece
PieceHook = Callable[["Dispatcher", int, int], None]


def import_ray() -> Any:
    """The `ray` module. Raises ImportError with the install hint when Ray is missing."""
    try:
        import ray
    except ImportError:
        raise ImportError(f"Ray is not installed; {RAY_HINT}") from None
    return ray


# ----------------------------------------------------------------------------------------------------------------
# the worker


class EngineWorker:
    """One engine in a Ray actor (made with `ray.remote(...)` by `start_workers`), built once from the same engine
    options as a local run."""

    def __init__(self, model: str, options: dict[str, Any]):
        from batchllm import LLM

        self.llm = LLM(model, **options)

    def ready(self) -> int:
        """Returns the engine's KV blocks once the engine is built (the driver waits on it)."""
        return self.llm.config.kv_cache_blocks

    def run(self, pieces: list[PiecePayload]) -> Iterator[tuple[int | None, Any]]:
        """One engine call over all requests of `pieces`. Yields (piece id, [(request key, RequestOutput)]) as each
        piece finishes, then (None, the call's engine stats without the step trace)."""
        prompts, params, where = [], [], []
        for piece, reqs in pieces:
            for key, ids, sp in reqs:
                prompts.append({"prompt_token_ids": ids})
                params.append(sp)
                where.append((piece, key))
        left = Counter(piece for piece, _ in where)
        done: dict[int, list] = defaultdict(list)
        for i, out in self.llm.generate_stream(prompts, params):
            piece, key = where[i]
            done[piece].append((key, out))
            left[piece] -= 1
            if not left[piece]:
                yield piece, done.pop(piece)
        yield None, {k: v for k, v in self.llm.stats().to_dict().items() if k != "trace"}


def start_workers(ray: Any, n: int, model: str, options: dict[str, Any], num_cpus: float, num_gpus: float) -> list:
    """Starts `n` engine actors, spread over the cluster's nodes, and waits until each has built its engine."""
    cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, scheduling_strategy="SPREAD")(EngineWorker)
    actors = [cls.remote(model, options) for _ in range(n)]
    try:
        ray.get([a.ready.remote() for a in actors])
    except ray.exceptions.RayError as e:
        for a in actors:
            ray.kill(a)
        raise JobError(f"a Ray engine worker failed to start: {_reason(e)}") from None
    return actors


def _reason(e: BaseException) -> str:
    """The last line of a Ray error's message (Ray puts the cause there, after the traceback)."""
    lines = [x for x in str(e).strip().splitlines() if x.strip()]
    return lines[-1].strip() if lines else type(e).__name__


# ----------------------------------------------------------------------------------------------------------------
# the driver


@dataclass
class Work:
    """The runnable requests of this run (those not yet in OUT), in input order. Index = request key."""

    offsets: list[int] = field(default_factory=list)  # byte offset of the input line
    line_nos: list[int] = field(default_factory=list)
    token_ids: list[np.ndarray] = field(default_factory=list)  # [prompt tokens] int32 each
    params: list[Any] = field(default_factory=list)  # SamplingParams

    def __len__(self) -> int:
        return len(self.offsets)


def collect_work(path: str | Path, pending: Pending, validator: Validator, writer: ResultWriter, totals: JobTotals,
                 chunk: int = SCAN_CHUNK) -> Work:
    """Reads and prepares the runnable lines not yet in OUT (as the local pass does per window); writes the error
    line of any that no longer validates."""
    work = Work()
    todo = [i for i in range(len(pending)) if not pending.done[i]]
    for start in range(0, len(todo), chunk):
        idx = todo[start:start + chunk]
        offsets = {pending.line_nos[i]: pending.offsets[i] for i in idx}
        items = read_lines_at(path, list(offsets.values()), list(offsets))
        reqs = [it for it in items if isinstance(it, ob.BatchRequest)]
        for req, ids, sp in prepare_runnable(reqs, validator, writer, totals):
            work.offsets.append(offsets[req.line_no])
            work.line_nos.append(req.line_no)
            work.token_ids.append(np.asarray(ids, dtype=np.int32))
            work.params.append(sp)
    return work


class Dispatcher:
    """Keeps the live workers busy with calls of whole pieces and hands each finished piece to `deliver` exactly
    once; re-queues the undelivered pieces of a lost worker on the survivors.

    Per worker: `queued` calls (lists of piece ids, not yet submitted) and running calls (`running`: a streaming
    generator -> (worker, its undelivered piece ids)); at most CALLS_IN_FLIGHT run per worker.
    """

    LOSS = ("RayActorError", "ObjectLostError", "WorkerCrashedError", "NodeDiedError")

    def __init__(self, ray: Any, actors: list, calls: list[list[list[int]]], piece_sizes: Sequence[int],
                 piece_cost: Sequence[int], call_size: int, payload: Callable[[list[int]], list[PiecePayload]],
                 deliver: Callable[[int, list], None], on_stats: Callable[[int, dict], None],
                 on_piece: PieceHook | None = None):
        self.ray = ray
        self.actors = list(actors)
        self.alive = set(range(len(actors)))
        self.queued = [deque(c) for c in calls]
        self.running: dict[Any, tuple[int, set[int]]] = {}
        self.piece_sizes, self.piece_cost, self.call_size = piece_sizes, piece_cost, call_size
        self.payload, self.deliver, self.on_stats, self.on_piece = payload, deliver, on_stats, on_piece
        self._loss_errors = tuple(getattr(ray.exceptions, name) for name in self.LOSS)
        self.workers_lost = 0
        self.pieces_rerun = 0
        self.calls_stolen = 0

    def undelivered(self, worker: int) -> int:
        """Pieces of `worker` not delivered yet (queued or running)."""
        running = sum(len(left) for w, left in self.running.values() if w == worker)
        return running + sum(len(call) for call in self.queued[worker])

    def run(self) -> None:
        """Runs until every piece is delivered. Raises JobError when every worker is lost."""
        for w in sorted(self.alive):
            self._fill(w)
        while self.running:
            [gen], _ = self.ray.wait(list(self.running), num_returns=1)
            w, left = self.running[gen]
            try:
                piece, result = self.ray.get(next(gen))
            except StopIteration:
                del self.running[gen]
                self._fill(w)
                continue
            except self._loss_errors as e:
                self._lose(w, e)
                continue
            if piece is None:
                self.on_stats(w, result)
                continue
            left.discard(piece)
            self.deliver(piece, result)
            if self.on_piece is not None:
                self.on_piece(self, w, piece)

    def _fill(self, w: int) -> None:
        """Submits queued calls of worker `w` until CALLS_IN_FLIGHT run; steals one when its queue is empty."""
        if w not in self.alive:
            return
        if not self.queued[w]:
            self._steal(w)
        while self.queued[w] and sum(1 for v, _ in self.running.values() if v == w) < CALLS_IN_FLIGHT:
            call = self.queued[w].popleft()
            self.running[self.actors[w].run.remote(self.payload(call))] = (w, set(call))

    def _steal(self, w: int) -> None:
        """Moves the last queued call of the worker with the most queued cost to `w` (nothing runs twice: queued
        calls were never submitted)."""
        others = [v for v in self.alive if v != w and self.queued[v]]
        if others:
            victim = max(others, key=lambda v: (self._queued_cost(v), -v))
            self.queued[w].append(self.queued[victim].pop())
            self.calls_stolen += 1

    def _queued_cost(self, w: int) -> int:
        return sum(self.piece_cost[p] for call in self.queued[w] for p in call)

    def _lose(self, w: int, error: BaseException) -> None:
        """Worker `w` is gone: drops its calls and re-queues its undelivered pieces on the survivors."""
        self.alive.discard(w)
        self.workers_lost += 1
        self.ray.kill(self.actors[w])  # it may be alive but unreachable: make sure it computes nothing more
        orphans = [p for gen, (v, left) in self.running.items() if v == w for p in sorted(left)]
        orphans += [p for call in self.queued[w] for p in call]
        self.running = {gen: v for gen, v in self.running.items() if v[0] != w}
        self.queued[w].clear()
        if not self.alive:
            raise JobError(f"every Ray worker was lost (the last: {_reason(error)}); rerun the same command to resume")
        print(f"batchllm run: Ray worker {w} lost ({_reason(error)}); {len(orphans)} pieces run again elsewhere",
              file=sys.stderr)
        self.pieces_rerun += len(orphans)
        alive = sorted(self.alive)
        loads = [self._queued_cost(v) + sum(self.piece_cost[p] for u, left in self.running.values() if u == v
                                            for p in left) for v in alive]
        where, _ = lpt([self.piece_cost[p] for p in orphans], loads)  # as shard_plan, from the current loads
        for i, v in enumerate(alive):
            pieces = [p for p, j in zip(orphans, where) if j == i]
            for call in pack_pieces([self.piece_sizes[p] for p in pieces], self.call_size):
                self.queued[v].append([pieces[k] for k in call])
            self._fill(v)


def connect(ray: Any, address: str | None) -> bool:
    """Attaches this process to Ray unless it is already: `address` (host:port, ray://...), or without one
    RAY_ADDRESS / the latest local cluster / a new local one. Returns whether it connected (so should disconnect)."""
    if ray.is_initialized():
        return False
    ray.init(address=address or None)
    return True


def default_num_workers(ray: Any, cpus_per_worker: float, gpus_per_worker: float) -> int:
    """As many workers as the cluster's GPUs (when workers take GPUs) or CPUs hold."""
    res = ray.cluster_resources()
    if gpus_per_worker > 0:
        return max(1, int(res.get("GPU", 0) // gpus_per_worker))
    return max(1, int(res.get("CPU", 1) // cpus_per_worker))


def plan_shards(token_ids: Sequence[np.ndarray], params: Sequence[Any], block_size: int, num_workers: int
                ) -> tuple[PrefixPlan, ShardPlan]:
    """The global plan of the prompts and its pieces over `num_workers` workers. A request's decode cost is
    max_tokens for each of its n samples."""
    plan = plan_batch(token_ids, block_size)
    decode = [sp.max_tokens * sp.n for sp in params]
    return plan, shard_plan(plan, [len(t) for t in token_ids], decode, num_workers)


def shard_figures(plan: PrefixPlan, shard: ShardPlan) -> dict:
    """The sharding figures of a run: groups and pieces, planned prompt tokens on one machine and summed over the
    workers, planned balance (max / mean worker cost)."""
    return {"plan_groups": len(plan.groups), "pieces": len(shard.pieces),
            "plan_prompt_tokens_single_machine": plan.stats.plan_tokens,
            "plan_prompt_tokens_sharded": sum(shard.worker_prompt_tokens), "plan_balance": round(shard.balance, 4)}


def ray_pass(args: argparse.Namespace, pending: Pending, validator: Validator, writer: ResultWriter,
             totals: JobTotals, on_piece: PieceHook | None = None) -> tuple[float, dict]:
    """Pass 2 on Ray (see the module docstring). Returns (clock value when generation started, {"ray": figures})."""
    ray = import_ray()
    work = collect_work(args.input, pending, validator, writer, totals)
    if not len(work):
        return time.monotonic(), {}
    started = connect(ray, args.ray)
    actors: list = []
    try:
        n = args.ray_workers or default_num_workers(ray, args.ray_cpus_per_worker, args.ray_gpus_per_worker)
        options = EngineArgs.cli_options(args)
        block_size = options.get("block_size", EngineArgs.default("block_size"))
        plan, shard = plan_shards(work.token_ids, work.params, block_size, n)
        calls = list(calls_of_workers(shard, args.window).values())  # a worker without pieces gets no actor
        model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model  # a name: resolved there
        actors = start_workers(ray, len(calls), model, options, args.ray_cpus_per_worker, args.ray_gpus_per_worker)
        sizes = [len(p) for p in shard.pieces]

        name, encoder = served_model_name(args), validator.encoder
        progress = Progress(totals.lines_total, totals.lines_total - pending.num_todo, not args.no_progress)
        per_worker = [0] * len(calls)
        t_gen = time.monotonic()

        def payload(call: list[int]) -> list[PiecePayload]:
            return [(p, [(k, work.token_ids[k], work.params[k]) for k in shard.pieces[p]]) for p in call]

        def deliver(piece: int, results: list) -> None:
            keys = [k for k, _ in results]
            reqs = read_lines_at(args.input, [work.offsets[k] for k in keys], [work.line_nos[k] for k in keys])
            for req, (_, out) in zip(reqs, results):
                write_result(writer, req, out, totals, name, encoder)
                progress.advance(totals, None, t_gen)

        def on_stats(w: int, stats: dict) -> None:
            totals.add_engine_stats(stats, 0.0)
            totals.kv_blocks_total = max(totals.kv_blocks_total, int(stats.get("kv_blocks_total", 0) or 0))
            per_worker[w] += int(stats.get("computed_prompt_tokens", 0) or 0)

        dispatcher = Dispatcher(ray, actors, calls, sizes, shard.piece_cost, args.window, payload, deliver, on_stats,
                                on_piece)
        try:
            dispatcher.run()
        finally:
            progress.close()
    finally:
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()
    return t_gen, {"ray": {
        "workers": len(actors), "workers_lost": dispatcher.workers_lost, "pieces_rerun": dispatcher.pieces_rerun,
        "calls_stolen": dispatcher.calls_stolen, **shard_figures(plan, shard),
        "computed_prompt_tokens_per_worker": per_worker}}


# ----------------------------------------------------------------------------------------------------------------
# Python entry point


def run_batch_file(input_path: str | Path, output_path: str | Path, model: str | Path, *,
                   ray_address: str | None = None, num_workers: int | None = None, cpus_per_worker: float = 1.0,
                   gpus_per_worker: float = 0.0, on_piece: PieceHook | None = None, **options: Any) -> dict:
    """`batchllm run -i input_path -o output_path --model model --ray [ray_address]` from Python; returns the
    summary (what --stats-json writes, with a "ray" section).

    Uses the Ray this process is connected to, else connects to `ray_address` (or RAY_ADDRESS, the latest local
    cluster, a new local one). `options` are the other `run` options by destination name: dtype, block_size,
    kv_cache_memory_bytes (per worker), window, seed, stats_json, no_progress (default True), ...
    `on_piece(dispatcher, worker, piece)` is called after each delivered piece. Raises JobError when the job
    cannot run, ImportError without Ray."""
    from batchllm.jobs.job import execute_job, job_namespace

    import_ray()
    args = job_namespace(input_path, output_path, model, ray=ray_address or "", ray_workers=num_workers,
                         ray_cpus_per_worker=cpus_per_worker, ray_gpus_per_worker=gpus_per_worker,
                         **{"no_progress": True, **options})
    return execute_job(args, pass2=partial(ray_pass, on_piece=on_piece))

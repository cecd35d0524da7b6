"""Ray Data: `PrefixAffinityProcessor` runs a Dataset of prompts through batchllm engine actors, planned globally.

Ray Data's LLM processors hand rows to engine actors in blocks with no regard to their content, so rows sharing a
prefix land on different actors and each computes it. This processor looks at the prompts first:

1. the dataset is materialized on the driver (as Arrow) and its prompts tokenized with the model's tokenizer (the
   chat template for a messages column), exactly as `LLM.generate` / `LLM.chat` do;
2. all rows are planned once (`plan_batch`) and sharded (`shard_plan`): whole prefix groups per worker, balanced by
   cost;
3. each worker's pieces are packed into engine calls of whole pieces, one Arrow block per call, and an actor pool of
   engines maps over the blocks with `map_batches(batch_size=None)`, which hands every block to an actor whole (no
   bundling, no splitting), so a prefix group never straddles two engines.

Unseeded rows sample with `derive_seed(seed, row position)`, the seed `LLM.generate` gives the same rows in one
call, so the outputs equal a single `LLM.generate` over the dataset (token-identical in fp32).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from batchllm.distributed.ray_runner import default_num_workers, import_ray, plan_shards, shard_figures
from batchllm.distributed.shard import calls_of_workers
from batchllm.engine_args import EngineArgs
from batchllm.hub import resolve_model
from batchllm.inputs import E_PARAM, InvalidPrompt, PromptEncoder, PromptInput
from batchllm.sampling_params import SamplingParams, derive_seed

OUTPUT_COLUMNS = ("generated_text", "generated_token_ids", "finish_reason", "num_cached_tokens", "error")
_IDS, _PARAMS, _ERROR = "__batchllm_prompt_token_ids", "__batchllm_sampling", "__batchllm_error"


class PrefixAffinityProcessor:
    """`processor(ds)` -> a lazy Dataset: the input columns plus generated_text, generated_token_ids, finish_reason,
    num_cached_tokens and error (None unless the row could not run). Rows come back grouped by engine call, not in
    input order: carry an id column to match them.

    model: a local HF model folder, at the same path on every node. Prompts come from `prompt_column` (text) or,
    when set, `messages_column` (chat conversations). `sampling_params`: SamplingParams keyword arguments for every
    row; `sampling_column` (optional): a column of per-row dicts merged over them (None values ignored). One
    completion per row (n = 1). `num_workers` engine actors (default: the cluster's CPUs, or GPUs, divided by the
    per-worker share), each reserving `cpus_per_worker` / `gpus_per_worker`. `max_rows_per_call`: rows per engine
    call (whole pieces; a larger piece is a call alone). `engine_options`: `LLM(...)` keyword arguments (dtype,
    kv_cache_memory_bytes per worker, block_size, seed, ...). After a call, `stats` holds the sharding figures.
    """

    def __init__(self, model: str | Path, *, prompt_column: str = "prompt", messages_column: str | None = None,
                 sampling_params: dict[str, Any] | None = None, sampling_column: str | None = None,
                 num_workers: int | None = None, cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 max_rows_per_call: int = 8192, **engine_options: Any):
        self.model = str(Path(model).resolve()) if Path(model).exists() else str(model)
        self.prompt_column, self.messages_column = prompt_column, messages_column
        self.sampling_params, self.sampling_column = dict(sampling_params or {}), sampling_column
        self.num_workers, self.cpus_per_worker, self.gpus_per_worker = num_workers, cpus_per_worker, gpus_per_worker
        self.max_rows_per_call = max(1, max_rows_per_call)
        self.engine_options = engine_options
        self.stats: dict = {}

    def __call__(self, ds: Any) -> Any:
        """Plans and shards the dataset now (materializing it on the driver); returns the lazy mapped Dataset."""
        ray = import_ray()
        import pyarrow as pa

        refs = ds.to_arrow_refs()
        if not refs:
            raise ValueError("the dataset has no blocks")
        table = pa.concat_tables(ray.get(refs))
        ids, kwargs, errors = self._prepare(table)
        runnable = [i for i, e in enumerate(errors) if e is None]
        n = self.num_workers or default_num_workers(ray, self.cpus_per_worker, self.gpus_per_worker)
        block_size = self.engine_options.get("block_size", EngineArgs.default("block_size"))
        calls: list[list[int]] = []  # row positions of each engine call
        if runnable:
            params = [SamplingParams(**kwargs[i]) for i in runnable]
            plan, shard = plan_shards([ids[i] for i in runnable], params, block_size, n)
            for worker_calls in calls_of_workers(shard, self.max_rows_per_call).values():
                calls += [[runnable[r] for p in call for r in shard.pieces[p]] for call in worker_calls]
            self.stats = {"workers": min(n, len(calls)), **shard_figures(plan, shard)}
        failed = [i for i, e in enumerate(errors) if e is not None]
        if failed:  # rows that cannot run go along with the first call; the engine turns them into error outputs
            calls = [calls[0] + failed] + calls[1:] if calls else [failed]
        blocks = [_block(table, rows, ids, kwargs, errors) for rows in calls]
        remote = {"num_cpus": self.cpus_per_worker}
        if self.gpus_per_worker > 0:
            remote["num_gpus"] = self.gpus_per_worker
        mapper = _whole_block_mapper(ray.data.from_arrow(blocks), self.gpus_per_worker > 0)
        return mapper(EngineUDF, batch_size=None, batch_format="pyarrow",
                      compute=ray.data.ActorPoolStrategy(size=max(1, min(n, len(calls)))),
                      fn_constructor_kwargs={"model": self.model, "options": self.engine_options}, **remote)

    def _prepare(self, table: Any) -> tuple[list[list[int]], list[dict], list[str | None]]:
        """Per row: prompt token ids, SamplingParams keyword arguments (seed filled in) and an error message (None
        when the row can run)."""
        n = table.num_rows
        encoder = PromptEncoder.load(resolve_model(self.model))
        ids: list[list[int]] = [[] for _ in range(n)]
        errors: list[str | None] = [None] * n
        inputs: dict[int, PromptInput] = {}
        if self.messages_column is not None:
            for i, conv in enumerate(table.column(self.messages_column).to_pylist()):
                if isinstance(conv, list) and all(isinstance(m, dict) for m in conv):
                    inputs[i] = PromptInput(messages=tuple(conv))
                else:
                    errors[i] = "invalid conversation: a list of {'role': ..., 'content': ...} messages is needed"
        else:
            for i, text in enumerate(table.column(self.prompt_column).to_pylist()):
                if isinstance(text, str):
                    inputs[i] = PromptInput(text=text)
                else:
                    errors[i] = f"{self.prompt_column} is not a string"
        for i, row in zip(inputs, encoder.encode_many(list(inputs.values()))):
            if isinstance(row, InvalidPrompt):
                errors[i] = row.message  # a bad row fails alone, as in LLM.generate
            else:
                ids[i] = row
        per_row = table.column(self.sampling_column).to_pylist() if self.sampling_column else [None] * n
        seed = self.engine_options.get("seed", EngineArgs.default("seed"))
        kwargs = []
        for i, extra in enumerate(per_row):
            kw = {**self.sampling_params, **{k: v for k, v in (extra or {}).items() if v is not None}}
            if kw.get("seed") is None:
                kw["seed"] = derive_seed(seed, i)  # what LLM.generate gives row i of one call
            try:
                if SamplingParams(**kw).n != 1:
                    raise ValueError("the processor returns one completion per row; n must be 1")
            except (ValueError, TypeError) as e:
                errors[i], kw = errors[i] or f"invalid sampling parameters: {e}", {"seed": kw["seed"]}
            kwargs.append(kw)
        return ids, kwargs, errors


def _whole_block_mapper(ds: Any, gpus: bool) -> Any:
    """`ds.map_batches`, or with GPUs the method Ray's own `map_groups` calls to hand whole blocks to GPU actors:
    `map_batches` refuses batch_size=None when GPUs are requested (a batch size would cut blocks, and groups)."""
    if not gpus:
        return ds.map_batches
    return getattr(ds, "map_batches_internal", None) or ds._map_batches_without_batch_size_validation  # older Ray


def _block(table: Any, rows: Sequence[int], ids: list[list[int]], kwargs: list[dict], errors: list[str | None]) -> Any:
    """The rows of one engine call as an Arrow table, with the prepared prompt, sampling and error columns."""
    import pyarrow as pa

    t = table.take(pa.array(rows, type=pa.int64()))
    t = t.append_column(_IDS, pa.array([ids[r] for r in rows], type=pa.list_(pa.int32())))
    t = t.append_column(_PARAMS, pa.array([json.dumps(kwargs[r]) for r in rows], type=pa.string()))
    return t.append_column(_ERROR, pa.array([errors[r] for r in rows], type=pa.string()))


class EngineUDF:
    """The Ray Data map function: one engine per actor; each call runs one block (an engine call) whole."""

    def __init__(self, model: str, options: dict[str, Any]):
        from batchllm import LLM

        self.llm = LLM(model, **options)

    def __call__(self, batch: Any) -> Any:
        """The block without the prepared columns, plus the output columns."""
        import pyarrow as pa

        errors = batch.column(_ERROR).to_pylist()
        prompts = [InvalidPrompt(E_PARAM, e) if e is not None else {"prompt_token_ids": t}
                   for t, e in zip(batch.column(_IDS).to_pylist(), errors)]
        params = [SamplingParams(**json.loads(p)) for p in batch.column(_PARAMS).to_pylist()]
        outs: list[Any] = [None] * len(prompts)
        for i, out in self.llm.generate_stream(prompts, params):
            outs[i] = out
        first = [o.outputs[0] for o in outs]
        columns = {
            "generated_text": pa.array([c.text for c in first], type=pa.string()),
            "generated_token_ids": pa.array([list(c.token_ids) for c in first], type=pa.list_(pa.int64())),
            "finish_reason": pa.array([c.finish_reason for c in first], type=pa.string()),
            "num_cached_tokens": pa.array([int(o.num_cached_tokens or 0) for o in outs], type=pa.int64()),
            "error": pa.array([o.error for o in outs], type=pa.string()),
        }
        batch = batch.drop_columns([_IDS, _PARAMS, _ERROR])
        for name in OUTPUT_COLUMNS:
            batch = batch.append_column(name, columns[name])
        return batch

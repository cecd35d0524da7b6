"""Engine: what lives as long as a loaded model. It resolves the device, dtype and model folder, loads the weights,
sizes and allocates the KV cache, and holds the runner and the prompt encoder. Each generate call is a `BatchRun`
over it (`batchllm.batch_run`).

    engine = Engine(EngineArgs(model="smollm2-135m-instruct"))
    run = engine.start(requests)        # plan the batch, queue its groups
    for index, output in run: ...       # step until every request finished
"""

from __future__ import annotations

import time
from dataclasses import replace

from batchllm import machine
from batchllm.engine_args import EngineArgs
from batchllm.hub import resolve_model
from batchllm.inputs import PromptEncoder
from batchllm.kv.cache import KVCache
from batchllm.model.cpu_kernels import run_dtype
from batchllm.model.decoder import DecoderModel
from batchllm.model.loader import load_weights
from batchllm.model_config import ModelConfig
from batchllm.runner import ModelRunner
from batchllm.structured import Grammars


class Engine:
    """The loaded model and its KV cache. Mutated only by the runs it serves (the KV tensors' contents)."""

    def __init__(self, args: EngineArgs):
        self.args = args
        self.device = machine.resolve_device(args.device)
        self.dtype = run_dtype(args.dtype, self.device)
        self.load_timings: dict[str, float] = {}  # seconds spent fetching, converting and loading the model
        self.model_dir = resolve_model(args.model, self.dtype, self.load_timings)
        start = time.perf_counter()
        self.model_config = with_context(ModelConfig.from_hf(self.model_dir), args.max_model_len)
        self.encoder = PromptEncoder.load(self.model_dir, self.model_config.vocab_size)
        self.tokenizer = self.encoder.tokenizer
        num_blocks, commit = self._kv_blocks()
        self.config = args.engine_config(num_blocks)
        self.model = DecoderModel(self.model_config, self.dtype, self.device)
        load_weights(self.model, self.model_dir)
        self.kv = KVCache(self.model_config, num_blocks, args.block_size, self.dtype, self.device, commit=commit)
        eos = self.model_config.eos_token_ids or (
            (self.tokenizer.eos_token_id,) if self.tokenizer.eos_token_id is not None else ())
        self.eos_token_ids = frozenset(eos)
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, tuple(sorted(eos)))
        self.runner = ModelRunner(self.model, self.kv, min(eos) if eos else None)
        self.load_timings["load_s"] = time.perf_counter() - start

    def _kv_blocks(self) -> tuple[int, bool]:
        """The KV cache's size in blocks, and whether to commit its pages now. An explicit budget is a
        reservation: committed at start, as vLLM does, so the run never waits on fresh pages. The default budget
        (a guessed share of RAM) stays a ceiling: committed only as blocks fill."""
        args = self.args
        budget = args.kv_cache_memory_bytes
        if budget is None:
            budget = machine.default_kv_budget(self.device)
        commit = args.kv_cache_commit == "upfront" or (args.kv_cache_commit == "auto"
                                                      and args.kv_cache_memory_bytes is not None)
        available = machine.available_memory() if commit and self.device.type == "cpu" else None
        if available is not None and budget > available:
            raise ValueError(f"kv_cache_memory_bytes={budget} is more than the {available} bytes of memory available "
                             f"to commit now; pass a smaller budget, or kv_cache_commit='lazy' to map it as it fills")
        num_blocks = KVCache.blocks_for_budget(self.model_config, budget, args.block_size, self.dtype)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory_bytes={budget} holds no KV block of {args.block_size} tokens "
                             f"({KVCache.bytes_per_block(self.model_config, args.block_size, self.dtype)} bytes)")
        return num_blocks, commit

    def start(self, requests):
        """A BatchRun of `requests` (batch_run.Request, errors included) over this engine."""
        from batchllm.batch_run import BatchRun

        return BatchRun(self, requests)

    def describe(self) -> dict:
        """Where this engine runs: CPU, kernel path, device, dtype (for summaries and benchmark tables)."""
        return machine.describe(self.device, self.dtype)


def with_context(cfg: ModelConfig, max_model_len: int | None) -> ModelConfig:
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


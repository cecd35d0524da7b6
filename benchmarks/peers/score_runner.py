"""Scoring runner: the loglikelihood of each (context, continuation) pair, as lm-evaluation-harness asks for it, on one
engine. Runs in that engine's venv (standard library here; the engine imported lazily):

    <venv>/bin/python benchmarks/peers/score_runner.py --engine {batchllm,vllm,hf} --model DIR --workload W.json
                                                       --out R.json [--dtype bfloat16] [--threads 2]

Each engine does what its lm-eval backend does, at its best:
    batchllm  LLM.score_tokens: one global batch; shared contexts computed once; only continuation rows to lm_head
    vllm      generate(context + continuation, prompt_logprobs=0, max_tokens=1), as lm-eval's vllm backend (vLLM
              reads no prefix cache for a request that wants prompt logprobs)
    hf        one forward per request, longest first in batches, left-padded, logits only for the continuation
              positions; requests whose input (context + continuation[:-1]) is identical share one forward, as
              lm-eval's HF backend does for one-token continuations
The engine loads and warms up on unrelated ids first; only the scoring call is timed. Writes {"wall_s", "results":
[[logprob_sum, greedy], ...], "config"}.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402


def score_batchllm(model: str, pairs, dtype: str, kv_bytes: int, threads: int):
    from batchllm import LLM

    llm = LLM(model, dtype=dtype, kv_cache_memory_bytes=kv_bytes)
    llm.score_tokens(warmup_pairs(pairs))
    start = time.perf_counter()
    results = llm.score_tokens(pairs)
    wall = time.perf_counter() - start
    stats = llm.stats()
    return wall, results, {"engine": llm.engine.describe(), "computed_prompt_tokens": stats.computed_prompt_tokens,
                           "dtype": str(llm.engine.dtype)}


def score_vllm(model: str, pairs, dtype: str, kv_bytes: int, threads: int):
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    longest = max(len(c) + len(x) for c, x in pairs) + 1
    llm = LLM(model=model, dtype=dtype, kv_cache_memory_bytes=kv_bytes, max_model_len=-(-longest // 256) * 256,
              skip_tokenizer_init=True, seed=0, generation_config="vllm")
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)

    def run(batch):
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(c) + list(x)) for c, x in batch], params,
                            use_tqdm=False)
        results = []
        for (c, x), o in zip(batch, outs):
            rows = o.prompt_logprobs[len(c):]
            total = sum(row[t].logprob for row, t in zip(rows, x))
            greedy = all(row[t].rank == 1 for row, t in zip(rows, x))
            results.append((total, greedy))
        return results

    run(warmup_pairs(pairs))
    llm.reset_prefix_cache()
    start = time.perf_counter()
    results = run(pairs)
    return time.perf_counter() - start, results, {"vllm": vllm.__version__}


def score_hf(model: str, pairs, dtype: str, kv_bytes: int, threads: int, batch_size: int = 8):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    net = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()

    def run(batch_pairs):
        inputs = {}
        for c, x in batch_pairs:  # the model reads context + continuation[:-1]; identical inputs share a forward
            inputs.setdefault(tuple(c) + tuple(x[:-1]), max(len(x), 1))
        order = sorted(inputs, key=len, reverse=True)
        logprobs = {}
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width, keep = len(chunk[0]), max(inputs[s] for s in chunk)
                ids = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, L]
                mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, L]
                for row, s in enumerate(chunk):
                    ids[row, width - len(s):] = torch.tensor(s)
                    mask[row, width - len(s):] = 1
                positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
                logits = net(input_ids=ids, attention_mask=mask, position_ids=positions,
                             logits_to_keep=keep).logits.float()  # [B, keep, V]
                lp = torch.log_softmax(logits, dim=-1)  # [B, keep, V]
                for row, s in enumerate(chunk):
                    logprobs[s] = lp[row]
        results = []
        for c, x in batch_pairs:
            rows = logprobs[tuple(c) + tuple(x[:-1])][-len(x):]  # [len(x), V]
            target = torch.tensor(x)
            total = rows.gather(1, target[:, None]).sum().item()
            greedy = bool((rows.argmax(-1) == target).all())
            results.append((total, greedy))
        return results

    run(warmup_pairs(pairs))
    start = time.perf_counter()
    results = run(pairs)
    return time.perf_counter() - start, results, {"transformers": transformers.__version__, "batch_size": batch_size,
                                                  "attn_implementation": net.config._attn_implementation}


def warmup_pairs(pairs, n: int = 4):
    """A few pairs unrelated to the workload (the first context's ids reversed): warms kernels, not caches."""
    context = list(reversed(pairs[0][0]))[:64]
    return [(context[: 32 + 8 * i], [context[i]]) for i in range(n)]


ENGINES = {"batchllm": score_batchllm, "vllm": score_vllm, "hf": score_hf}


def main() -> None:
    args = common.one_engine_args(__doc__, ENGINES)
    workload = json.loads(Path(args.workload).read_text(encoding="utf-8"))
    pairs = [(list(c), list(x)) for c, x in workload["pairs"]]
    print(f"[score {args.engine}] {len(pairs)} pairs", file=sys.stderr, flush=True)
    wall, results, config = ENGINES[args.engine](args.model, pairs, args.dtype, args.kv_bytes, args.threads)
    config.update(dtype_asked=args.dtype, threads=args.threads, kv_bytes=args.kv_bytes)
    Path(args.out).write_text(json.dumps({"engine": args.engine, "wall_s": wall, "config": config,
                                          "results": [[float(t), bool(g)] for t, g in results]}), encoding="utf-8")
    print(f"[score {args.engine}] {wall:.2f}s", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()

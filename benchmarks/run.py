"""Side-by-side benchmark: workloads x engines on this machine, same model, dtype (bf16) and KV budget.

    /work/main/.venv/bin/python -m benchmarks.run [--quick] [--workloads a,b] [--engines x,y] [--model-size 56m]
                                                  [--rounds N]

Each engine runs as a subprocess with its own venv's python (peers: benchmarks/setup_peers.sh), one invocation per
distinct KV budget, sequentially. With --rounds N every engine runs N times, the engine order reversed in every
other round, and a second table gives batchllm's ratio to each peer per round, with the median and the range: this
machine's speed drifts by up to 40% within minutes, so one round's ratio can mislead (rounds after the first write
to round<N>/ folders). Writes bench-results/<stamp>/{results.md,results.json,workloads/,raw/,logs/} and copies the
table to bench-results/latest.md. The bf16 matmul peak (4096^2, 2 threads) is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchmarks import real_workloads, summary, workloads
from benchmarks.models import MODEL_SHAPES, REAL_MODELS, REPO, ensure_model, matmul_params

PEERS = REPO / ".cache" / "peers"
RESULTS = REPO / "bench-results"
BENCH = REPO / "benchmarks"
ENGINES = ("batchllm", "batchllm-fcfs-cache", "batchllm-lpm-cache", "batchllm-fcfs", "vllm", "vllm-fp32", "hf")
ALL_WORKLOADS = workloads.WORKLOAD_NAMES + real_workloads.REAL_WORKLOAD_NAMES
# --quick compares the default policy with the peers; the other policies (ablations) run in the full invocation or
# when named with --engines.
QUICK_ENGINES = ("batchllm", "vllm", "hf")
# Engines without a KV budget: tight-kv is the batchllm workload for them, so its record is reused, not re-run.
NO_KV_BUDGET = ("hf",)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="scaled-down workloads (~5 minutes in all)")
    ap.add_argument("--workloads", default=",".join(workloads.WORKLOAD_NAMES), help="comma-separated")
    ap.add_argument("--engines", default=None,
                    help=f"comma-separated, from {ENGINES} (default: all; with --quick: {','.join(QUICK_ENGINES)})")
    ap.add_argument("--model-size", default="56m", choices=[*MODEL_SHAPES, *REAL_MODELS],
                    help="a random-weight shape, or smollm2 (the real SmolLM2-135M-Instruct; use it with the real "
                         f"workloads {','.join(real_workloads.REAL_WORKLOAD_NAMES)})")
    ap.add_argument("--reference", default="hf", help="engine whose greedy outputs the others are compared to")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "auto"],
                    help="every engine's dtype (float32 for an exact cross-check of greedy outputs); auto: batchllm's "
                         "own choice for this CPU, bf16 for the peers (vllm-fp32 runs vLLM in fp32)")
    ap.add_argument("--timeout", type=float, default=1200,
                    help="seconds per runner invocation (workloads it finished before are kept)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--emulate-isa", choices=["avx2"], default=None,
                    help="hold every engine to this instruction set, as on a CPU that has nothing wider: batchllm's "
                         "kernel path (BATCHLLM_ISA) and torch, oneDNN and MKL (ATEN_CPU_CAPABILITY, "
                         "ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS); kernels a peer compiled itself stay as built")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run every engine this many times, alternating the order; report per-round ratios")
    ap.add_argument("--out", default=str(RESULTS), help="results root folder")
    args = ap.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    if args.engines is None:
        args.engines = ",".join(QUICK_ENGINES if args.quick else ENGINES)
    args.engines = [e for e in args.engines.split(",") if e]
    for e in args.engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}; expected one of {ENGINES}")
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    for w in args.workloads:
        if w not in ALL_WORKLOADS:
            ap.error(f"unknown workload {w!r}; expected one of {ALL_WORKLOADS}")
    return args


def measure_bf16_peak(threads: int, n: int = 4096, reps: int = 5) -> float:
    """Best-of-`reps` FLOP/s of an n x n bf16 matmul on `threads` threads (sets torch's thread count)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n, dtype=torch.bfloat16)  # [n, n]
    b = torch.randn(n, n, dtype=torch.bfloat16)  # [n, n]
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)  # [n, n]
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best


def default_kv_bytes(loads: list[dict], bytes_per_token: int) -> int:
    """A KV budget shared by every engine for the workloads that do not fix one: the whole batch without any
    sharing plus 10%, in whole MiB, clamped to [256 MiB, 4 GiB]."""
    need = max((w["kv_tokens_no_sharing"] for w in loads if w["kv_cache_memory_bytes"] is None), default=0)
    mib = 1 << 20
    value = -(-int(need * bytes_per_token * 1.1) // mib) * mib
    return min(max(value, 256 * mib), 4096 * mib)


def emulation_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment that holds an engine to `--emulate-isa` (empty without it)."""
    if args.emulate_isa != "avx2":
        return {}
    return {"BATCHLLM_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
            "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def engine_command(engine: str, args: argparse.Namespace) -> tuple[list[str], dict[str, str]] | str:
    """(argv prefix, extra environment) to run `engine`, or a reason string why it cannot run here."""
    env = {"OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", **emulation_env(args)}
    if engine.startswith("batchllm"):
        py = REPO / ".venv" / "bin" / "python"
        probe = subprocess.run([str(py), "-c", "from batchllm import LLM"], capture_output=True, text=True,
                               cwd=REPO)
        if probe.returncode != 0:
            return "batchllm import failed: " + (probe.stderr.strip().splitlines() or ["?"])[-1]
        policy = engine[len("batchllm-"):] if engine != "batchllm" else "batchllm"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
        return [str(py), str(BENCH / "run_batchllm.py"), "--policy", policy], env
    venv = engine.removesuffix("-fp32")
    py = PEERS / venv / "bin" / "python"
    if not (PEERS / venv / ".installed").is_file():
        return f"peer venv missing: run benchmarks/setup_peers.sh {venv}"
    if venv == "vllm":
        env.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{args.threads - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        return [str(py), str(BENCH / "peers" / "run_vllm.py")], env
    return [str(py), str(BENCH / "peers" / "run_hf.py"), "--batch-size", str(args.hf_batch_size)], env


def engine_dtype(engine: str, dtype: str) -> str:
    """The dtype an engine runs: `dtype`, except that "auto" is batchllm's to resolve (per CPU) and bf16 for a peer,
    and a "-fp32" peer always runs float32."""
    if engine.endswith("-fp32"):
        return "float32"
    return "bfloat16" if dtype == "auto" and not engine.startswith("batchllm") else dtype


def run_engine(engine: str, paths: dict[str, Path], loads: dict[str, dict], model: Path, kv_default: int,
               run_dir: Path, args: argparse.Namespace) -> dict[str, dict]:
    """Run `engine` on every workload (one subprocess per KV budget); returns workload name -> record or error."""
    cmd = engine_command(engine, args)
    if isinstance(cmd, str):
        return {w: {"error": cmd} for w in paths}
    prefix, env_extra = cmd
    by_budget: dict[int, list[str]] = {}
    reused: dict[str, str] = {}
    for name in paths:
        if engine in NO_KV_BUDGET and name == "tight-kv" and "batchllm" in paths:
            reused[name] = "batchllm"  # same prompts; the KV budget means nothing to this engine
            continue
        budget = 0 if engine in NO_KV_BUDGET else loads[name]["kv_cache_memory_bytes"] or kv_default
        by_budget.setdefault(budget, []).append(name)
    out: dict[str, dict] = {}
    for budget, names in by_budget.items():
        argv = prefix + ["--model", str(model), "--out-dir", str(run_dir / "raw"), "--label", engine,
                         "--threads", str(args.threads), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
                         "--default-kv-bytes", str(kv_default), "--dtype", engine_dtype(engine, args.dtype)]
        for name in names:
            argv += ["--workload", str(paths[name])]
        log_path = run_dir / "logs" / f"{engine}__{'+'.join(names)}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        kv_note = f"KV {budget / 2**20:.0f} MiB" if budget else "no KV budget"
        print(f"  {engine}: {', '.join(names)} ({kv_note}) ...", flush=True)
        load_before = os.getloadavg()[0]
        t0 = time.perf_counter()
        with open(log_path, "w") as log:
            try:
                proc = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, timeout=args.timeout,
                                      env={**os.environ, **env_extra})
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        elapsed = time.perf_counter() - t0
        for name in names:
            raw = run_dir / "raw" / f"{engine}__{name}.json"
            if raw.is_file():
                record = json.loads(raw.read_text(encoding="utf-8"))
                record["load_avg_1m_before"] = load_before
                out[name] = record
            else:
                out[name] = {"error": f"exit {rc}; see {log_path}"}
        print(f"  {engine}: done in {elapsed:.0f}s (exit {rc})", flush=True)
    for name, source in reused.items():
        if "error" in out.get(source, {"error": ""}):
            out[name] = {"error": f"not run: reuses {source}, which failed"}
        else:
            out[name] = {**out[source], "workload": name, "reused_from": source}
    return out


def main(argv: list[str] | None = None) -> int:
    """Build the model and workloads, run every engine, print and write the table. Returns the exit status."""
    args = parse_args(argv)
    t_start = time.perf_counter()
    stamp = time.strftime("%Y%m%d-%H%M%S") + ("-quick" if args.quick else "")
    run_dir = Path(args.out) / stamp
    model = ensure_model(args.model_size)
    config = json.loads((model / "config.json").read_text(encoding="utf-8"))
    space = workloads.token_space_from_model(model)
    per_tok = workloads.kv_bytes_per_token(config, dtype_bytes=4 if args.dtype == "float32" else 2)
    loads = {name: real_workloads.make_real_workload(name, model, quick=args.quick, seed=args.seed)
             if name in real_workloads.REAL_WORKLOAD_NAMES else
             workloads.make_workload(name, space, quick=args.quick, kv_bytes_per_tok=per_tok, seed=args.seed)
             for name in args.workloads}
    kv_default = default_kv_bytes(list(loads.values()), per_tok)
    for w in loads.values():  # every engine gets the same budget, written into the file it reads
        w["kv_cache_memory_bytes"] = w["kv_cache_memory_bytes"] or kv_default
    paths = {name: workloads.write_workload(w, run_dir / "workloads" / f"{name}.json") for name, w in loads.items()}
    layer_params, head_params = matmul_params(model)
    print(f"model {model.name}: {layer_params / 1e6:.1f}M layer + {head_params / 1e6:.1f}M lm_head matmul params; "
          f"default KV budget {kv_default / 2**20:.0f} MiB; results in {run_dir}", flush=True)
    peak_before = measure_bf16_peak(args.threads)
    print(f"bf16 matmul peak (4096^2, {args.threads} threads): {peak_before / 1e9:.0f} GFLOP/s", flush=True)

    rounds: list[dict[tuple[str, str], dict]] = []
    for r in range(args.rounds):
        round_dir = run_dir if r == 0 else run_dir / f"round{r + 1}"
        if args.rounds > 1:
            print(f"round {r + 1} of {args.rounds}", flush=True)
        results: dict[tuple[str, str], dict] = {}
        for engine in (args.engines if r % 2 == 0 else args.engines[::-1]):
            for name, record in run_engine(engine, paths, loads, model, kv_default, round_dir, args).items():
                results[(name, engine)] = record
        rounds.append(results)
    results = rounds[0]
    peak_after = measure_bf16_peak(args.threads)
    peak = max(peak_before, peak_after)

    reference = args.reference if args.reference in args.engines else None
    rows = summary.build_rows(results, args.workloads, args.engines, reference, peak, layer_params, head_params)
    table = summary.to_markdown(rows, reference)
    from batchllm.machine import cpu_name, selected_isa

    header = (f"# batchllm vs peers ({'quick' if args.quick else 'full'}, model {model.name}, {args.dtype}, "
              f"{args.threads} threads)\n\nCPU {cpu_name()}; batchllm's kernel path "
              f"{args.emulate_isa or selected_isa()}"
              f"{'; every engine held to AVX2 (--emulate-isa)' if args.emulate_isa else ''}. "
              f"bf16 matmul peak: {peak_before / 1e9:.0f} GFLOP/s before, {peak_after / 1e9:.0f} after (max used). "
              f"Default KV budget {kv_default / 2**20:.0f} MiB (tight-kv: its own). "
              f"Load average at end: {os.getloadavg()[0]:.1f}. Wall {time.perf_counter() - t_start:.0f}s.\n\n")
    notes = "\n".join(f"- {name}: {w['description']}" for name, w in loads.items())
    pairs = summary.pairwise_agreement(results, args.workloads, args.engines)
    text = header + table + "\nIdentical greedy sequences between engines (mean leading-token agreement):\n" + pairs
    if args.rounds > 1:
        per_round = summary.round_ratios(rounds, args.workloads, args.engines)
        text += (f"\nbatchllm's total-throughput ratio to each engine in each of {args.rounds} rounds (the table above "
                 "is round 1):\n\n" + summary.rounds_markdown(per_round))
    text += "\nWorkloads:\n" + notes + "\n"
    print("\n" + text, flush=True)
    (run_dir / "results.md").write_text(text, encoding="utf-8")
    payload = {
        "args": {k: v for k, v in vars(args).items()},
        "model": str(model), "layer_params": layer_params, "head_params": head_params,
        "peak_flops_before": peak_before, "peak_flops_after": peak_after, "default_kv_bytes": kv_default,
        "rows": [r.__dict__ for r in rows],
        "records": [{k: v for k, v in rec.items() if k != "outputs"} | {"workload": w, "engine": e, "round": i + 1}
                    for i, res in enumerate(rounds) for (w, e), rec in res.items()],
    }
    (run_dir / "results.json").write_text(json.dumps(payload, indent=1), encoding="utf-8")
    shutil.copyfile(run_dir / "results.md", Path(args.out) / "latest.md")
    shutil.copyfile(run_dir / "results.json", Path(args.out) / "latest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

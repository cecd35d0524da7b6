"""Scoring benchmark: an MMLU-shaped evaluation (few-shot prefix per subject, questions, 4 choices each, scored by
loglikelihood) on batchllm, vLLM's CPU build and HF transformers, side by side in one run.

    .venv/bin/python -m benchmarks.scoring [--model-size smollm2|56m|0.5b] [--subjects 2] [--questions 40]
                                           [--answers text|letters] [--engines batchllm,vllm,hf] [--rounds 1]

Subject s has a 5-shot prefix of ~600 tokens; each of its questions (~60 tokens) is scored as 4 continuations. On
the real model (smollm2) the text is Python's own module docstrings through the real tokenizer, laid out as lm-eval
lays out MMLU; on a random shape it is random ids of the same lengths. With `--answers text` (the default, as ARC or
HellaSwag) a continuation is the choice's text (several tokens); with `letters` (as MMLU) it is " A".." D", one
token, which lets HF share one forward between a question's four choices, as lm-eval's HF backend does.

The ratio does not depend on the number of subjects (each subject's requests are the same work for every engine);
it does depend on questions per subject and choices per question. `--subjects 16 --questions 40` is the full
16 x 40 x 4 shape (HF and vLLM then run for an hour or more on 2 cores). Every engine runs in its own venv
(benchmarks/setup_peers.sh), one at a time, the order reversed in every other round; the table gives wall time,
batchllm's speedup over each engine per round, and how often each engine picks the same choice as the reference
(HF) and its largest loglikelihood difference. Writes bench-results/scoring-<stamp>/{results.md,results.json}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks.models import MODEL_SHAPES, REAL_MODELS, REPO, ensure_model
from benchmarks.real_workloads import PLAIN_MODULES, _docstring
from benchmarks.side_by_side import add_common_args, parse, run_runner

RUNNER = REPO / "benchmarks" / "peers" / "score_runner.py"
ENGINES = ("batchllm", "vllm", "hf")
SHOTS, CHOICES = 5, 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-size", default="smollm2", choices=[*REAL_MODELS, *MODEL_SHAPES])
    ap.add_argument("--subjects", type=int, default=2)
    ap.add_argument("--questions", type=int, default=40, help="questions per subject")
    ap.add_argument("--answers", default="text", choices=["text", "letters"])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="every engine's dtype (batchllm's bf16 is its fast path where the CPU has one)")
    ap.add_argument("--seed", type=int, default=0)
    add_common_args(ap, ENGINES, rounds=1, timeout=7200)
    return parse(ap, argv, ENGINES)


def _words(module: str) -> list[str]:
    words = _docstring(module).split()
    return words if len(words) > 40 else words + _docstring("argparse").split()


def _span(rng: random.Random, words: list[str], n: int) -> str:
    start = rng.randrange(len(words))
    return " ".join((words * 2)[start:start + n])


def _question(rng: random.Random, words: list[str]) -> tuple[str, list[str], int]:
    """(question block ending in "Answer:", the 4 choice texts, the index of the right one)."""
    choices = [_span(rng, words, rng.randrange(3, 8)) for _ in range(CHOICES)]
    text = _span(rng, words, 36) + "?\n" + "".join(f"{'ABCD'[i]}. {c}\n" for i, c in enumerate(choices))
    return text + "Answer:", choices, rng.randrange(CHOICES)


def real_pairs(model_dir: Path, subjects: int, questions: int, answers: str, seed: int) -> list[tuple[list, list]]:
    """(context ids, continuation ids) of every choice of every question, in lm-eval's MMLU layout, grouped by
    question, questions grouped by subject (the order lm-eval hands them over)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(seed)
    pairs = []
    for module in (PLAIN_MODULES * (subjects // len(PLAIN_MODULES) + 1))[:subjects]:
        words = _words(module)
        head = f"The following are multiple choice questions (with answers) about {module}.\n\n"
        for _ in range(SHOTS):
            text, choices, right = _question(rng, words)
            head += f"{text} {choices[right] if answers == 'text' else 'ABCD'[right]}\n\n"
        for _ in range(questions):
            text, choices, _ = _question(rng, words)
            context = list(tok(head + text)["input_ids"])
            for i, choice in enumerate(choices):
                pairs.append((context, list(tok(" " + (choice if answers == "text" else "ABCD"[i]),
                                                    add_special_tokens=False)["input_ids"])))
    return pairs


def random_pairs(vocab: int, subjects: int, questions: int, answers: str, seed: int) -> list[tuple[list, list]]:
    """The same shape in random ids: a 600-token prefix per subject, 60-token questions, 1-token (letters) or
    3-7-token (text) continuations."""
    rng = random.Random(seed)

    def ids(n):
        return [rng.randrange(4, vocab) for _ in range(n)]

    pairs = []
    for _ in range(subjects):
        head = [1] + ids(599)
        for _ in range(questions):
            context = head + ids(60)
            for _ in range(CHOICES):
                pairs.append((context, ids(1 if answers == "letters" else rng.randrange(3, 8))))
    return pairs


def run_engine(engine: str, model: Path, workload: Path, out: Path, args) -> dict | str:
    return run_runner(RUNNER, engine, ["--engine", engine, "--model", str(model), "--workload", str(workload),
                                       "--dtype", args.dtype], out, args)


def picks(results: list, choices: int = CHOICES) -> list[int]:
    """The chosen answer of every question: the choice of the highest loglikelihood."""
    sums = [r[0] for r in results]
    return [max(range(choices), key=lambda i: sums[q + i]) for q in range(0, len(sums), choices)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = ensure_model(args.model_size)
    if args.model_size in REAL_MODELS:
        pairs = real_pairs(model, args.subjects, args.questions, args.answers, args.seed)
    else:
        pairs = random_pairs(MODEL_SHAPES[args.model_size]["vocab_size"], args.subjects, args.questions, args.answers,
                             args.seed)
    run_dir = Path(args.out) / time.strftime("scoring-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    workload = run_dir / "workload.json"
    workload.write_text(json.dumps({"pairs": pairs}))
    tokens = sum(len(c) + len(x) for c, x in pairs)
    print(f"{len(pairs)} pairs, {tokens} tokens; results in {run_dir}", file=sys.stderr)
    rounds: list[dict[str, dict | str]] = []
    for r in range(args.rounds):
        order = args.engines if r % 2 == 0 else list(reversed(args.engines))
        rounds.append({})
        for engine in order:
            print(f"round {r + 1}: {engine} ...", file=sys.stderr, flush=True)
            rounds[-1][engine] = run_engine(engine, model, workload, run_dir / f"{engine}-r{r + 1}.json", args)
    report = render(args, model, pairs, tokens, rounds)
    (run_dir / "results.md").write_text(report)
    (run_dir / "results.json").write_text(json.dumps({"args": vars(args), "rounds": rounds}, default=str))
    print(report)
    return 0


def render(args, model: Path, pairs, tokens: int, rounds: list[dict]) -> str:
    from batchllm.machine import cpu_name, selected_isa

    first = rounds[0]
    ref_name = "hf" if isinstance(first.get("hf"), dict) else next((e for e in args.engines
                                                                    if isinstance(first.get(e), dict)), None)
    ref = first.get(ref_name) if ref_name else None
    contexts = len({tuple(c) for c, _ in pairs})
    lines = [f"# Scoring: {args.subjects} subjects x {args.questions} questions x {CHOICES} choices "
             f"({args.answers} answers), {args.model_size}, {args.dtype}",
             "", f"CPU: {cpu_name()}, {args.threads} threads; batchllm kernel path: {selected_isa()}. "
             f"{len(pairs)} pairs, {tokens} tokens as pairs, {contexts} distinct contexts.", "",
             "| engine | wall s (round 1) | pairs/s | batchllm speedup (median of rounds) | per round | "
             f"same pick as {ref_name} | max abs loglik diff |", "|---|---:|---:|---:|---|---:|---:|"]
    for engine in args.engines:
        res = first.get(engine)
        if not isinstance(res, dict):
            lines.append(f"| {engine} | {res} | | | | | |")
            continue
        speedups = [rd[engine]["wall_s"] / rd["batchllm"]["wall_s"] for rd in rounds
                    if isinstance(rd.get(engine), dict) and isinstance(rd.get("batchllm"), dict)]
        same = diff = ""
        if ref is not None:
            a, b = picks(res["results"]), picks(ref["results"])
            same = f"{sum(x == y for x, y in zip(a, b)) / len(a):.3f}"
            diff = f"{max(abs(x[0] - y[0]) for x, y in zip(res['results'], ref['results'])):.2e}"
        ratio = f"{statistics.median(speedups):.2f}x | {', '.join(f'{s:.2f}' for s in speedups)}" if speedups else " | "
        rate = len(pairs) / res["wall_s"]
        lines.append(f"| {engine} | {res['wall_s']:.1f} | {rate:.1f} | {ratio} | {same} | {diff} |")
    lines += ["", f"Command: `.venv/bin/python -m benchmarks.scoring --model-size {args.model_size} --subjects "
              f"{args.subjects} --questions {args.questions} --answers {args.answers} --dtype {args.dtype} "
              f"--engines {','.join(args.engines)} --rounds {args.rounds}`", ""]
    bl = first.get("batchllm")
    if isinstance(bl, dict):
        lines.append(f"batchllm computed {bl['config'].get('computed_prompt_tokens')} of {tokens} prompt tokens "
                     f"({bl['config'].get('engine')}).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

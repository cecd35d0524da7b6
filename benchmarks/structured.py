"""Structured-output benchmark on the real SmolLM2-135M-Instruct: JSON extraction and label classification, each
constrained on batchllm, the same prompts unconstrained on batchllm (the same number of output tokens per request,
so only the masks differ), and constrained on vLLM's CPU build, side by side in one run.

    .venv/bin/python -m benchmarks.structured [--extraction 512] [--classification 2000] [--rounds 2]
                                              [--engines batchllm,batchllm-free,vllm]

extraction      N records (name, age, city, email written out in a sentence) under one instruction; each answer
                one JSON object under one schema (4 required fields, no others), max_tokens 96
classification  N customer messages under one instruction that defines 5 labels; each answer one of the labels
                (structured_outputs choice), max_tokens 8

Every engine runs in its own venv (benchmarks/setup_peers.sh), one at a time, the order reversed in every other
round; greedy; batchllm in its `auto` dtype, vLLM in bf16. The table gives wall time, output tokens/s, how many
outputs parse and validate (or are one of the labels), and batchllm-constrained's speedup over each row, per round.
Writes bench-results/structured-<stamp>/{results.md,results.json}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from benchmarks.models import REPO, ensure_model
from benchmarks.side_by_side import add_common_args, parse, run_runner

RUNNER = REPO / "benchmarks" / "peers" / "structured_runner.py"
ENGINES = ("batchllm", "batchllm-free", "vllm")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}, "email": {"type": "string"}},
          "required": ["name", "age", "city", "email"], "additionalProperties": False}
LABELS = ["billing", "delivery", "technical", "account", "praise"]
EXTRACT_SYSTEM = ("You read short records about people and return exactly one JSON object with their name, age (an "
                  "integer), city and email address. Use the spelling of the record. Do not add fields, comments or "
                  "explanations. If a value is missing, make the best guess from the record.")
CLASSIFY_SYSTEM = ("You sort customer messages into exactly one of five labels. billing: charges, refunds, invoices, "
                   "prices and payment methods. delivery: shipping, parcels, couriers, delays and addresses. "
                   "technical: the product or app does not work, crashes, errors, setup problems. account: login, "
                   "passwords, profile data, subscriptions and cancellations. praise: thanks, compliments and happy "
                   "customers. Answer with the label only.")
FIRST = ["Ada", "Alan", "Grace", "Edsger", "Barbara", "Donald", "Frances", "John", "Radia", "Ken", "Margaret", "Tim"]
LAST = ["Lovelace", "Turing", "Hopper", "Dijkstra", "Liskov", "Knuth", "Allen", "McCarthy", "Perlman", "Thompson"]
CITIES = ["London", "Paris", "Berlin", "Madrid", "Rome", "Vienna", "Oslo", "Lisbon", "Prague", "Dublin"]
TOPICS = {"billing": ["I was charged twice for order {n}", "please refund the {n} euros you took", "where is my "
                      "invoice for {n}"],
          "delivery": ["parcel {n} never arrived", "the courier left order {n} at the wrong address", "shipping of "
                       "{n} is two weeks late"],
          "technical": ["the app crashes when I open report {n}", "error {n} appears at setup", "the device "
                        "restarts every {n} minutes"],
          "account": ["I cannot log in since {n} days", "please cancel subscription {n}", "change the email of "
                      "account {n}"],
          "praise": ["thank you, order {n} was perfect", "your support team solved case {n} in minutes", "best "
                     "service in {n} years"]}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--extraction", type=int, default=512)
    ap.add_argument("--classification", type=int, default=2000)
    add_common_args(ap, ENGINES, rounds=2, timeout=3600)
    return parse(ap, argv, ENGINES)


def workloads(model_dir: Path, n_extract: int, n_classify: int, seed: int = 0) -> dict[str, dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(seed)

    def chat(system, user):
        text = tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": user}],
                                       tokenize=False, add_generation_prompt=True)
        return list(tok(text, add_special_tokens=False)["input_ids"])

    records = []
    for i in range(n_extract):
        first, last, city = rng.choice(FIRST), rng.choice(LAST), rng.choice(CITIES)
        records.append(f"Record {i}: {first} {last} is {rng.randrange(18, 90)} years old, lives in {city} and can "
                       f"be reached at {first.lower()}.{last.lower()}{i}@example.org.")
    messages = []
    for i in range(n_classify):
        label = LABELS[i % len(LABELS)]
        messages.append(rng.choice(TOPICS[label]).format(n=rng.randrange(10, 9999)).capitalize() + ".")
    return {
        "extraction": {"prompts": [chat(EXTRACT_SYSTEM, r) for r in records], "max_tokens": 96,
                       "constraints": [{"json": SCHEMA}] * n_extract},
        "classification": {"prompts": [chat(CLASSIFY_SYSTEM, m) for m in messages], "max_tokens": 8,
                           "constraints": [{"choice": LABELS}] * n_classify},
    }


def valid(name: str, text: str) -> bool:
    if name == "classification":
        return text in LABELS
    try:
        value = json.loads(text)
    except ValueError:
        return False
    import jsonschema

    try:
        jsonschema.validate(value, SCHEMA)
    except jsonschema.ValidationError:
        return False
    return True


def run(engine: str, model: Path, workload: Path, out: Path, args) -> dict | str:
    """batchllm in its auto dtype, vLLM in bf16; batchllm-free is batchllm unconstrained."""
    venv, mode = ("batchllm", "free") if engine == "batchllm-free" else (engine, "constrained")
    return run_runner(RUNNER, venv, ["--engine", venv, "--mode", mode, "--model", str(model), "--workload",
                                     str(workload), "--dtype", "auto" if venv == "batchllm" else "bfloat16"], out, args)


def main(argv=None) -> int:
    args = parse_args(argv)
    model = ensure_model("smollm2")
    run_dir = Path(args.out) / time.strftime("structured-%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {}
    for name, w in workloads(model, args.extraction, args.classification).items():
        path = run_dir / f"{name}.json"
        path.write_text(json.dumps(w))
        results[name] = []
        for r in range(args.rounds):
            order = args.engines if r % 2 == 0 else list(reversed(args.engines))
            if "batchllm-free" in order and "free_tokens" not in w:  # the free run needs the constrained lengths
                order = ["batchllm"] + [e for e in order if e != "batchllm"]
            got = {}
            for engine in order:
                print(f"{name} round {r + 1}: {engine} ...", file=sys.stderr, flush=True)
                got[engine] = run(engine, model, path, run_dir / f"{name}-{engine}-r{r + 1}.json", args)
                if engine == "batchllm" and isinstance(got[engine], dict) and "free_tokens" not in w:
                    w["free_tokens"] = got[engine]["tokens"]
                    path.write_text(json.dumps(w))
            results[name].append(got)
    report = render(args, results)
    (run_dir / "results.md").write_text(report)
    (run_dir / "results.json").write_text(json.dumps(results))
    print(report)
    return 0


def render(args, results: dict[str, list[dict]]) -> str:
    from batchllm.machine import cpu_name, selected_isa

    lines = [f"# Structured outputs: {args.extraction} JSON extractions, {args.classification} classifications "
             "(SmolLM2-135M-Instruct)", "",
             f"CPU: {cpu_name()}, {args.threads} threads; batchllm kernel path: {selected_isa()}, dtype auto; "
             "vLLM bf16.", "",
             "| workload | engine | wall s (round 1) | output tok/s | valid | batchllm speedup (median) | per round |",
             "|---|---|---:|---:|---:|---:|---|"]
    for name, rounds in results.items():
        for engine in args.engines:
            first = rounds[0].get(engine)
            if not isinstance(first, dict):
                lines.append(f"| {name} | {engine} | {first} | | | | |")
                continue
            ratios = [rd[engine]["wall_s"] / rd["batchllm"]["wall_s"] for rd in rounds
                      if isinstance(rd.get(engine), dict) and isinstance(rd.get("batchllm"), dict)]
            tokens = sum(first["tokens"])
            ok = "-" if engine == "batchllm-free" else \
                f"{sum(valid(name, t) for t in first['outputs'])}/{len(first['outputs'])}"
            ratio = f"{statistics.median(ratios):.2f}x | {', '.join(f'{x:.2f}' for x in ratios)}" if ratios else " | "
            lines.append(f"| {name} | {engine} | {first['wall_s']:.1f} | {tokens / first['wall_s']:.0f} | {ok} | "
                         f"{ratio} |")
    lines += ["", "batchllm-free: the same prompts unconstrained, each generating as many tokens as its constrained "
              "answer (EOS ignored): the cost of the masks is the difference.", "",
              f"Command: `.venv/bin/python -m benchmarks.structured --extraction {args.extraction} --classification "
              f"{args.classification} --rounds {args.rounds} --engines {','.join(args.engines)}`", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

"""Turn runner result records into the comparison table (pure functions, no torch, no I/O).

A result record is what a runner writes (benchmarks/peers/common.py: make_result). The table has one row per
(workload, engine): throughput, the ratio of batchllm (default policy) to that engine, prompt tokens computed, the
fraction of the machine's bf16 matmul peak reached, and how many greedy outputs agree with the reference engine.
"""

from __future__ import annotations

from dataclasses import dataclass

OURS = "batchllm"


@dataclass(frozen=True)
class Row:
    """One line of the table; None where a figure does not apply or the engine failed."""

    workload: str
    engine: str
    wall_s: float | None
    prompt_tokens: int | None
    computed_prompt_tokens: int | None
    output_tokens: int | None
    total_tok_s: float | None
    output_tok_s: float | None
    ours_ratio: float | None
    peak_fraction: float | None
    same_as_ref: float | None
    prefix_agreement: float | None
    error: str | None = None


def forward_flops(record: dict, layer_params: int, head_params: int) -> float:
    """Matmul FLOPs the engine did: 2 x layer params x tokens run through the layers + 2 x lm_head params x tokens
    sampled. Tokens through the layers = computed prompt tokens + decode steps (outputs minus the first token of each
    request, which comes from the prompt's last position); engines that pad (HF) report their padded counts."""
    n = record["num_requests"]
    decode = record.get("decode_tokens_computed", record["output_tokens"])
    prompt = record.get("computed_prompt_tokens")
    if prompt is None:
        prompt = record["prompt_tokens"]
    through_layers = prompt + max(decode - n, 0)
    return 2.0 * layer_params * through_layers + 2.0 * head_params * decode


def agreement(outputs: list[list[int]], reference: list[list[int]]) -> tuple[float, float]:
    """(fraction of sequences identical to the reference, mean fraction of leading tokens that agree)."""
    if not reference or len(outputs) != len(reference):
        return 0.0, 0.0
    same = 0
    lead = 0.0
    for a, b in zip(outputs, reference):
        same += a == b
        n = 0
        for x, y in zip(a, b):
            if x != y:
                break
            n += 1
        lead += n / max(len(b), 1)
    return same / len(reference), lead / len(reference)


def build_rows(results: dict[tuple[str, str], dict], workloads: list[str], engines: list[str], reference: str | None,
               peak_flops: float, layer_params: int, head_params: int) -> list[Row]:
    """One Row per (workload, engine) in the given orders. `results[(workload, engine)]` is a record, or
    {"error": msg} for a failed run; missing pairs are skipped."""
    rows: list[Row] = []
    for w in workloads:
        ours = results.get((w, OURS))
        ours_tps = ours.get("total_tok_s") if ours and "error" not in ours else None
        ref = results.get((w, reference)) if reference else None
        ref_out = ref.get("outputs") if ref and "error" not in ref else None
        for e in engines:
            r = results.get((w, e))
            if r is None:
                continue
            if "error" in r:
                rows.append(Row(w, e, *([None] * 10), error=r["error"]))
                continue
            tps = r["total_tok_s"]
            ratio = ours_tps / tps if ours_tps and tps and e != OURS else None
            flops = forward_flops(r, layer_params, head_params)
            frac = flops / r["wall_s"] / peak_flops if peak_flops > 0 and r["wall_s"] > 0 else None
            same = lead = None
            if ref_out is not None and e != reference:
                same, lead = agreement(r["outputs"], ref_out)
            rows.append(Row(w, e, r["wall_s"], r["prompt_tokens"], r.get("computed_prompt_tokens"),
                            r["output_tokens"], tps, r["output_tok_s"], ratio, frac, same, lead))
    return rows


def _fmt(value, spec: str, none: str = "-") -> str:
    """Format `value` with `spec`, or `none` when it is None."""
    return none if value is None else format(value, spec)


def to_markdown(rows: list[Row], reference: str | None) -> str:
    """The table as GitHub markdown (one header line, one line per row)."""
    ref = reference or "ref"
    head = ("| workload | engine | wall s | prompt tok | computed prompt tok (saved) | output tok | total tok/s "
            f"| output tok/s | batchllm x | % bf16 peak | same as {ref} (lead agree) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.error is not None:
            lines.append(f"| {r.workload} | {r.engine} | FAILED: {r.error[:80]} |" + " |" * 8)
            continue
        saved = None
        if r.computed_prompt_tokens is not None and r.prompt_tokens:
            saved = 1 - r.computed_prompt_tokens / r.prompt_tokens
        computed = _fmt(r.computed_prompt_tokens, "d")
        if saved is not None:
            computed += f" ({saved:+.0%})" if saved < 0 else f" ({saved:.0%})"
        same = "(ref)" if r.same_as_ref is None and r.engine == reference else _fmt(r.same_as_ref, ".0%")
        if r.prefix_agreement is not None:
            same += f" ({r.prefix_agreement:.0%})"
        pct = None if r.peak_fraction is None else 100 * r.peak_fraction
        lines.append(
            f"| {r.workload} | {r.engine} | {_fmt(r.wall_s, '.2f')} | {_fmt(r.prompt_tokens, 'd')} | {computed} "
            f"| {_fmt(r.output_tokens, 'd')} | {_fmt(r.total_tok_s, ',.0f')} | {_fmt(r.output_tok_s, ',.0f')} "
            f"| {_fmt(r.ours_ratio, '.2f')} | {_fmt(pct, '.1f')} "
            f"| {same} |"
        )
    return "\n".join(lines) + "\n"


def pairwise_agreement(results: dict[tuple[str, str], dict], workloads: list[str], engines: list[str]) -> str:
    """One markdown bullet per workload listing every pair of engines that both succeeded: identical sequences
    (and mean leading-token agreement) as percentages."""
    lines = []
    for w in workloads:
        ok = [e for e in engines if (w, e) in results and "error" not in results[(w, e)]]
        parts = []
        for i, a in enumerate(ok):
            for b in ok[i + 1:]:
                same, lead = agreement(results[(w, a)]["outputs"], results[(w, b)]["outputs"])
                parts.append(f"{a}~{b} {same:.0%} ({lead:.0%})")
        if parts:
            lines.append(f"- {w}: " + ", ".join(parts))
    return "\n".join(lines) + "\n"


def round_ratios(rounds: list[dict[tuple[str, str], dict]], workloads: list[str],
                 engines: list[str]) -> list[tuple[str, str, list[float | None]]]:
    """Per (workload, peer engine): batchllm's total-throughput ratio to that engine in each round (None where either
    failed). Each round ran every engine once, so a ratio compares two runs minutes apart, not hours."""
    out = []
    for w in workloads:
        for e in engines:
            if e == OURS:
                continue
            ratios: list[float | None] = []
            for results in rounds:
                ours, peer = results.get((w, OURS)), results.get((w, e))
                ok = ours and peer and "error" not in ours and "error" not in peer and peer["total_tok_s"] > 0
                ratios.append(ours["total_tok_s"] / peer["total_tok_s"] if ok else None)
            if any(r is not None for r in ratios):
                out.append((w, e, ratios))
    return out


def rounds_markdown(ratios: list[tuple[str, str, list[float | None]]]) -> str:
    """The per-round ratios as a markdown table: every round's figure, then the median and the range."""
    n = max((len(r) for _, _, r in ratios), default=0)
    head = "| workload | vs engine | " + " | ".join(f"round {i + 1}" for i in range(n)) + " | median | min - max |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for w, e, rs in ratios:
        ok = sorted(r for r in rs if r is not None)
        mid = None
        if ok:
            mid = ok[len(ok) // 2] if len(ok) % 2 else (ok[len(ok) // 2 - 1] + ok[len(ok) // 2]) / 2
        spread = f"{ok[0]:.2f} - {ok[-1]:.2f}" if ok else "-"
        lines.append(f"| {w} | {e} | " + " | ".join(_fmt(r, ".2f") for r in rs) + f" | {_fmt(mid, '.2f')} | {spread} |")
    return "\n".join(lines) + "\n"

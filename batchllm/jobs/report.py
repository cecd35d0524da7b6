"""Job figures: totals over engine calls, the end-of-job summary (text and JSON), and a self-contained HTML report
with inline SVG plots (throughput over time, prefill vs decode tokens per step, KV use, group sizes)."""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from batchllm.stats import StepTrace


@dataclass
class JobTotals:
    """Running totals of one job (this run only, plus what resume skipped). Updated by the command."""

    lines_total: int = 0  # non-blank input lines
    skipped_done: int = 0  # already in OUT from an earlier run
    ok: int = 0
    failed_validation: int = 0
    failed_engine: int = 0
    prompt_tokens: int = 0  # of the requests that ran (from their results)
    engine_prompt_tokens: int = 0  # logical prompt tokens the engine was handed (llm.stats())
    computed_prompt_tokens: int = 0
    output_tokens: int = 0
    structured_incomplete: int = 0  # constrained outputs cut short by max_tokens (finish_reason "length")
    engine_elapsed_s: float = 0.0
    preemptions: int = 0
    peak_kv_blocks: int = 0
    kv_blocks_total: int = 0
    engine_calls: int = 0
    plans: list[dict] = field(default_factory=list)  # planner stats of each engine call (small dicts)
    trace: StepTrace = field(default_factory=StepTrace)

    def add_engine_stats(self, stats, t_offset: float) -> None:
        """Adds llm.stats() (a RunStats, or its dict) of one finished engine call; its trace is shifted to start at
        t_offset."""
        self.engine_calls += 1
        self.engine_prompt_tokens += int(stats.get("prompt_tokens", 0) or 0)
        self.computed_prompt_tokens += int(stats.get("computed_prompt_tokens", 0) or 0)
        self.engine_elapsed_s += float(stats.get("elapsed_s", 0.0) or 0.0)
        self.preemptions += int(stats.get("preemptions", 0) or 0)
        self.peak_kv_blocks = max(self.peak_kv_blocks, int(stats.get("peak_kv_blocks", 0) or 0))
        plan = stats.get("plan")
        if isinstance(plan, dict) and len(self.plans) < 64:
            self.plans.append(plan)
        trace = stats.get("trace") or ()
        self.trace.extend(trace, t_offset - _trace_origin(trace, float(stats.get("elapsed_s", 0.0) or 0.0)))


def _trace_origin(trace: Sequence[dict], elapsed_s: float) -> float:
    """The clock value of the call's start in the trace's "t": 0 when t counts from the call's start; when t is a
    raw clock reading (larger than the call lasted), the last step's t minus the call's duration."""
    if not trace:
        return 0.0
    last = float(trace[-1].get("t", 0.0))
    return last - elapsed_s if last > elapsed_s + 1.0 else 0.0


def summary(totals: JobTotals, elapsed_s: float) -> dict:
    """The end-of-job figures (JSON-ready). Tokens are those of this run; saving = prompt tokens not computed."""
    failed = totals.failed_validation + totals.failed_engine
    tokens = totals.prompt_tokens + totals.output_tokens
    logical = totals.engine_prompt_tokens or totals.prompt_tokens
    saving = 1.0 - totals.computed_prompt_tokens / logical if logical else 0.0
    el = max(elapsed_s, 1e-9)
    return {
        "requests": {"total": totals.lines_total, "ok": totals.ok, "failed": failed,
                     "failed_validation": totals.failed_validation, "failed_engine": totals.failed_engine,
                     "skipped_already_done": totals.skipped_done},
        "tokens": {"prompt": totals.prompt_tokens, "computed_prompt": totals.computed_prompt_tokens,
                   "output": totals.output_tokens, "total": tokens},
        "prefix_saving": round(saving, 6),
        "structured_outputs_cut_short": totals.structured_incomplete,
        "throughput": {"requests_per_s": round((totals.ok + totals.failed_engine) / el, 3),
                       "total_tokens_per_s": round(tokens / el, 3),
                       "output_tokens_per_s": round(totals.output_tokens / el, 3)},
        "elapsed_s": round(elapsed_s, 3),
        "engine_elapsed_s": round(totals.engine_elapsed_s, 3),
        "preemptions": totals.preemptions,
        "peak_kv_blocks": totals.peak_kv_blocks,
        "kv_blocks_total": totals.kv_blocks_total,
        "engine_calls": totals.engine_calls,
    }


def format_summary(s: dict) -> str:
    """A few human-readable lines of a summary dict."""
    r, t, th = s["requests"], s["tokens"], s["throughput"]
    lines = [
        f"requests: {r['ok']} ok, {r['failed']} failed ({r['failed_validation']} invalid lines, "
        f"{r['failed_engine']} rejected by the engine), {r['skipped_already_done']} already done, {r['total']} total",
        f"tokens: {t['prompt']} prompt ({t['computed_prompt']} computed, "
        f"prefix saving {100 * s['prefix_saving']:.1f}%), {t['output']} output",
        f"throughput: {th['total_tokens_per_s']:.1f} tok/s total, {th['output_tokens_per_s']:.1f} output tok/s, "
        f"{th['requests_per_s']:.2f} req/s; elapsed {s['elapsed_s']:.2f} s",
    ]
    if s.get("structured_outputs_cut_short"):
        lines.append(f"structured outputs: {s['structured_outputs_cut_short']} cut short by max_tokens "
                     "(finish_reason length, structured_output_complete false): raise max_tokens for them")
    if s.get("kv_blocks_total"):
        lines.append(f"KV: peak {s['peak_kv_blocks']}/{s['kv_blocks_total']} blocks, {s['preemptions']} preemptions")
    if s.get("machine"):
        m = s["machine"]
        lines.append(f"machine: {m['cpu']}, kernel path {m['isa']}, {m.get('device', '?')}, {m.get('dtype', '?')}")
    if s.get("ray"):
        ray = s["ray"]
        single = ray["plan_prompt_tokens_single_machine"]
        lines.append(f"ray: {ray['workers']} workers ({ray['workers_lost']} lost, {ray['pieces_rerun']} pieces run "
                     f"again), {ray['pieces']} pieces; prompt tokens computed {t['computed_prompt']} "
                     f"(per worker {ray['computed_prompt_tokens_per_worker']}), {single} planned on one machine"
                     + (f" ({100 * (t['computed_prompt'] / single - 1):+.1f}%)" if single else ""))
    return "\n".join(lines)


def write_stats_json(path: str | Path, s: dict) -> None:
    """Writes the summary as JSON (creates parent folders)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(s, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# HTML report


def group_size_histogram(plans: Sequence[dict]) -> list[tuple[str, int]]:
    """(requests per group, number of groups) summed over the planner stats of every engine call. Reads the
    planner's `degree_histogram` ({"2": n, "3-4": n, ...}) or else a list `group_sizes`; label order kept."""
    counts: dict[str, int] = {}
    for p in plans:
        hist = p.get("degree_histogram")
        if isinstance(hist, dict):
            for label, c in hist.items():
                counts[str(label)] = counts.get(str(label), 0) + int(c)
        elif isinstance(p.get("group_sizes"), list):
            for v in p["group_sizes"]:
                counts[str(int(v))] = counts.get(str(int(v)), 0) + 1
    return sorted(counts.items(), key=lambda kv: int(kv[0].split("-")[0]) if kv[0].split("-")[0].isdigit() else 0)


def svg_bars(title: str, labels: Sequence[str], values: Sequence[float], x_label: str, y_label: str,
             color: str = "#9467bd", width: int = 720, height: int = 260) -> str:
    """An inline SVG bar chart with one labelled bar per category. Returns markup."""
    ml, mr, mt, mb = 64, 16, 28, 40
    pw, ph = width - ml - mr, height - mt - mb
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(title)}">',
           f'<text x="{ml}" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>',
           f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    if not labels:
        out.append(f'<text x="{ml + 8}" y="{mt + ph / 2}" font-size="12">no shared-prefix groups</text></svg>')
        return "".join(out)
    y_max = max(values) or 1.0
    slot = pw / len(labels)
    for k in range(5):
        yv = y_max * k / 4
        y = mt + ph - yv / y_max * ph
        out.append(f'<text x="{ml - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{_fmt(yv)}</text>')
    for i, (lab, v) in enumerate(zip(labels, values)):
        h = v / y_max * ph
        x = ml + i * slot
        out.append(f'<rect x="{x + slot * 0.15:.1f}" y="{mt + ph - h:.1f}" width="{slot * 0.7:.1f}" height="{h:.1f}" '
                   f'fill="{color}"><title>{html.escape(lab)}: {_fmt(v)}</title></rect>'
                   f'<text x="{x + slot / 2:.1f}" y="{mt + ph + 14}" font-size="10" text-anchor="middle">'
                   f'{html.escape(lab)}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
               f'{html.escape(x_label)}</text>'
               f'<text x="12" y="{mt + ph / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {mt + ph / 2})">{html.escape(y_label)}</text></svg>')
    return "".join(out)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.0f}"
    return f"{v:.3g}"


def svg_chart(title: str, xs: Sequence[float], series: Sequence[tuple[str, Sequence[float], str]],
              x_label: str, y_label: str, kind: str = "line", width: int = 720, height: int = 260) -> str:
    """An inline SVG chart: `kind` "line" (one polyline per series) or "stack" (stacked bars). Returns markup."""
    ml, mr, mt, mb = 64, 16, 28, 40
    pw, ph = width - ml - mr, height - mt - mb
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="{html.escape(title)}">',
           f'<text x="{ml}" y="18" font-size="14" font-weight="bold">{html.escape(title)}</text>']
    n = len(xs)
    if n == 0:
        out.append(f'<text x="{ml}" y="{mt + ph / 2}" font-size="12">no data</text></svg>')
        return "".join(out)
    if kind == "stack":
        tops = [sum(s[1][i] for s in series) for i in range(n)]
    else:
        tops = [max(s[1][i] for s in series) for i in range(n)]
    y_max = max(tops) or 1.0
    x_min, x_max = min(xs), max(xs)
    x_span = (x_max - x_min) or 1.0

    def sx(x: float) -> float:
        return ml + (x - x_min) / x_span * pw

    def sy(y: float) -> float:
        return mt + ph - y / y_max * ph

    out.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for k in range(5):  # y grid and ticks
        yv = y_max * k / 4
        out.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{sy(yv):.1f}" y2="{sy(yv):.1f}" stroke="#eee"/>'
                   f'<text x="{ml - 4}" y="{sy(yv) + 4:.1f}" font-size="10" text-anchor="end">{_fmt(yv)}</text>')
    for k in range(5):
        xv = x_min + x_span * k / 4
        out.append(f'<text x="{sx(xv):.1f}" y="{mt + ph + 14}" font-size="10" text-anchor="middle">{_fmt(xv)}</text>')
    out.append(f'<text x="{ml + pw / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
               f'{html.escape(x_label)}</text>')
    out.append(f'<text x="12" y="{mt + ph / 2}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 12 {mt + ph / 2})">{html.escape(y_label)}</text>')
    if kind == "stack":
        bw = max(pw / n, 0.5)
        base = [0.0] * n
        for _, ys, color in series:
            for i in range(n):
                if ys[i] > 0:
                    y0, y1 = sy(base[i]), sy(base[i] + ys[i])
                    out.append(f'<rect x="{ml + i * pw / n:.2f}" y="{y1:.2f}" width="{bw:.2f}" '
                               f'height="{y0 - y1:.2f}" fill="{color}"/>')
                base[i] += ys[i]
    else:
        for _, ys, color in series:
            pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
    for j, (name, _, color) in enumerate(series):  # legend
        lx = ml + pw - 150
        ly = mt + 12 + 14 * j
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{color}"/>'
                   f'<text x="{lx + 14}" y="{ly}" font-size="11">{html.escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def render_html(s: dict, totals: JobTotals, title: str = "batchllm job report") -> str:
    """The whole report page (no scripts, no external resources)."""
    bins = totals.trace.bins
    xs = [b["t"] for b in bins]
    tput = []
    prev_t = 0.0
    for b in bins:
        dt = b["t"] - prev_t if b["t"] > prev_t else 0.0
        tput.append((b["prefill_tokens"] + b["decode_tokens"]) / dt if dt > 0 else 0.0)
        prev_t = b["t"]
    steps = list(range(len(bins)))
    kv_total = totals.kv_blocks_total
    kv = [100.0 * b["kv_blocks_used"] / kv_total if kv_total else float(b["kv_blocks_used"]) for b in bins]
    per = f" per {totals.trace.steps_per_bin} steps" if totals.trace.steps_per_bin > 1 else " per step"
    charts = [
        svg_chart("Throughput over time", xs, [("tokens/s (prefill + decode)", tput, "#1f77b4")], "time (s)",
                  "tokens/s"),
        svg_chart("Batch composition" + per, steps, [("prefill tokens", [b["prefill_tokens"] for b in bins], "#ff7f0e"),
                                                     ("decode tokens", [b["decode_tokens"] for b in bins], "#2ca02c")],
                  "engine step" if totals.trace.steps_per_bin == 1 else "bin", "tokens", kind="stack"),
        svg_chart("KV cache use", xs, [("KV blocks used" + (" (%)" if kv_total else ""), kv, "#d62728")], "time (s)",
                  "% of blocks" if kv_total else "blocks"),
    ]
    hist = group_size_histogram(totals.plans)
    charts.append(svg_bars("Shared-prefix group sizes", [h[0] for h in hist], [h[1] for h in hist],
                           "requests per group", "groups"))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(json.dumps(v))}</td></tr>" for k, v in s.items())
    plan_rows = ""
    if totals.plans:
        scalars = {k: v for k, v in totals.plans[0].items() if isinstance(v, (int, float, str, bool))}
        plan_rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>"
                            for k, v in scalars.items())
        plan_rows = f"<h2>Prefix plan (first engine call)</h2><table>{plan_rows}</table>"
    style = ("body{font-family:sans-serif;margin:24px;max-width:780px}table{border-collapse:collapse}"
             "th,td{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}svg{margin:12px 0}")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<pre>{html.escape(format_summary(s))}</pre>{''.join(charts)}"
            f"<h2>Summary</h2><table>{rows}</table>{plan_rows}</body></html>\n")


def write_report(out_dir: str | Path, s: dict, totals: JobTotals) -> Path:
    """Writes out_dir/report.html (and out_dir/stats.json); returns the page's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    page = out_dir / "report.html"
    page.write_text(render_html(s, totals))
    write_stats_json(out_dir / "stats.json", s)
    return page

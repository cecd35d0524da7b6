"""Job figures: bounded trace bins, totals over engine calls, summary, HTML report."""

import json

from batchllm.jobs.report import JobTotals, group_size_histogram, render_html, summary, write_report
from batchllm.stats import StepTrace


def step(t, p=0, d=0, kv=0):
    return {"t": t, "prefill_tokens": p, "decode_tokens": d, "num_seqs": 1, "kv_blocks_used": kv}


def test_trace_bins_stay_bounded_and_keep_sums():
    tb = StepTrace(max_bins=4)
    tb.extend([step(i + 1, p=i, d=1, kv=(7 * i) % 10) for i in range(10)], t_offset=0.0)
    assert tb.steps_per_bin == 4 and len(tb.bins) <= 4
    assert sum(b["steps"] for b in tb.bins) == 10
    assert sum(b["prefill_tokens"] for b in tb.bins) == sum(range(10))
    assert sum(b["decode_tokens"] for b in tb.bins) == 10
    assert [b["kv_blocks_used"] for b in tb.bins] == [7, 9, 6]  # max within each bin
    assert [(b["t0"], b["t"]) for b in tb.bins] == [(1.0, 4.0), (5.0, 8.0), (9.0, 10.0)]


def test_totals_over_calls_shift_raw_clock_traces():
    tot = JobTotals()
    # a call whose trace carries raw clock readings (t ~ 1000 s) and lasted 2 s
    tot.add_engine_stats({"prompt_tokens": 100, "computed_prompt_tokens": 40, "elapsed_s": 2.0, "preemptions": 1,
                          "peak_kv_blocks": 7, "trace": [step(999.0, p=50), step(1000.0, d=4)],
                          "plan": {"degree_histogram": {"2": 3, "3-4": 1}}}, t_offset=0.0)
    # a call whose trace counts from its own start, started 5 s into the job
    tot.add_engine_stats({"prompt_tokens": 10, "computed_prompt_tokens": 10, "elapsed_s": 1.0, "peak_kv_blocks": 3,
                          "trace": [step(0.5, p=10), step(1.0, d=2)], "plan": {"degree_histogram": {"2": 1}}},
                         t_offset=5.0)
    assert [b["t"] for b in tot.trace.bins] == [1.0, 2.0, 5.5, 6.0]
    assert (tot.engine_prompt_tokens, tot.computed_prompt_tokens, tot.preemptions, tot.peak_kv_blocks,
            tot.engine_calls) == (110, 50, 1, 7, 2)
    assert group_size_histogram(tot.plans) == [("2", 4), ("3-4", 1)]
    tot.lines_total, tot.ok, tot.failed_validation, tot.prompt_tokens, tot.output_tokens = 12, 9, 3, 110, 40
    s = summary(tot, 10.0)
    assert s["requests"] == {"total": 12, "ok": 9, "failed": 3, "failed_validation": 3, "failed_engine": 0,
                             "skipped_already_done": 0}
    assert s["tokens"] == {"prompt": 110, "computed_prompt": 50, "output": 40, "total": 150}
    assert s["prefix_saving"] == round(60 / 110, 6)
    assert s["throughput"] == {"requests_per_s": 0.9, "total_tokens_per_s": 15.0, "output_tokens_per_s": 4.0}
    page = render_html(s, tot)
    assert page.count("<svg") == 4 and "<script" not in page and "3-4" in page


def test_write_report_files(tmp_path):
    tot = JobTotals()
    s = summary(tot, 0.0)
    page = write_report(tmp_path / "r", s, tot)
    assert page == tmp_path / "r" / "report.html"
    text = page.read_text()
    assert text.count("no data") == 3 and "no shared-prefix groups" in text
    assert json.loads((tmp_path / "r" / "stats.json").read_text()) == s

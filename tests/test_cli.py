"""The `batchllm` command line: `analyze` reports what prefix sharing a prompts file allows, `bench` passes through."""

import json

from batchllm.cli import main


def test_analyze_reports_figures(tiny_llama, tmp_path, capsys):
    system = "You are a helpful assistant who answers questions about rivers and mountains briefly. " * 3
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "system", "content": system},
                                    {"role": "user", "content": f"question number {i}?"}]}} for i in range(6)]
    lines.append({"prompt": "a plain prompt"})
    lines.append({"prompt_token_ids": [1, 5, 6, 7]})
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    assert main(["analyze", str(path), "--model", str(tiny_llama), "--block-size", "4", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["num_requests"] == 8
    assert figures["skipped_lines"] == 1
    assert figures["radix_tokens"] <= figures["nested_plan_tokens"] <= figures["one_level_plan_tokens"]
    assert figures["one_level_plan_tokens"] < figures["logical_tokens"]
    assert figures["nested_num_groups"] == 1


def test_analyze_skips_lines_it_cannot_use_and_refuses_a_zero_block_size(tiny_llama, tmp_path, capsys):
    no_content = {"custom_id": "x", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user"}]}}
    lines = [json.dumps(no_content), "[" * 5000 + "]" * 5000, '{"prompt": "\\ud800 half an emoji"}',
             json.dumps({"prompt": "a plain prompt"})]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    assert main(["analyze", str(path), "--model", str(tiny_llama), "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert (figures["num_requests"], figures["skipped_lines"]) == (1, 3)
    assert main(["analyze", str(path), "--model", str(tiny_llama), "--block-size", "0"]) == 2
    assert "--block-size must be >= 1" in capsys.readouterr().err


def test_bench_passes_its_arguments_through():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "batchllm", "bench", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0
    assert "--workloads" in out.stdout and "--quick" in out.stdout

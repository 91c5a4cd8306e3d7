#!/usr/bin/env bash
# Set up (if needed) and generate with a 4-bit KV cache on the default model.
# Extra arguments go to 'mlxkv generate', e.g.: scripts/demo.sh --prompt "Tell me about Paris" --max-kv 256
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/mlxkv generate --kv-bits 4 --max-tokens 64 --prompt "What is the capital of France?" "$@"

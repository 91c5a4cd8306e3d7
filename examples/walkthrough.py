# %% [markdown]
# # mlxkv walkthrough: load, plan, generate, watch memory, plot
#
# Run it as a script (`python examples/walkthrough.py`) or cell by cell in an editor that
# understands `# %%` cells (VS Code, PyCharm, Jupytext). It uses the bundled
# SmolLM2-135M-Instruct, so it needs no download. `MLXKV_WALKTHROUGH_SHORT=1` runs it with a
# short prompt and few tokens (the test suite does); `MLXKV_WALKTHROUGH_OUT` says where the
# report and the plot go.

# %%
import os
from pathlib import Path

import mlxkv  # first: it picks the fast BLAS before MLX loads
import mlx.core as mx
from mlx_lm import stream_generate

from mlxkv.memory import (
    MemoryTracker, candidate_configs, device_memory, format_bytes, layout_from_model,
    model_weights_bytes, plan, plot_memory_runs, predict_kv_bytes, recommend_config,
)

SHORT = os.environ.get("MLXKV_WALKTHROUGH_SHORT") == "1"
MAX_TOKENS, REPEATS, WINDOW = (12, 2, 64) if SHORT else (200, 12, 256)
PREFILL_STEP = 32 if SHORT else 64  # small prefill chunks: a smooth memory curve, a low peak
OUT = Path(os.environ.get("MLXKV_WALKTHROUGH_OUT", "."))
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Load a model
# `mlxkv.load()` takes a .gguf file, a model directory or a Hugging Face repo id; without
# one it loads the bundled default. On a CPU device the weights are expanded to float32.

# %%
model, tokenizer = mlxkv.load()
print(model.mlxkv_load_info.note)

# %% [markdown]
# ## 2. What fits? Plan before generating
# The layout is read off the model (heads, head size, windows, dtype); the planner turns it
# into bytes per token for each KV configuration.

# %%
story = (
    "The lighthouse keeper counted the ships that passed each night and wrote their names in a "
    "book that nobody read. One winter a ship came by that had no name at all. "
) * REPEATS
messages = [{"role": "user", "content": story + "\nWhat might the nameless ship be? Answer in a story."}]
prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
context = len(prompt) + MAX_TOKENS

layout = layout_from_model(model)
weights = model_weights_bytes(model)
budget = device_memory().recommended
print(f"{layout.describe()}; prompt {len(prompt)} tokens, target context {context}")
for row in plan(layout, context, budget, weights, candidate_configs(["fp16", "q8", "q4"]), layout.dtype_bytes):
    print(f"  {row.config:5} {row.kv_bytes_per_token:7,} bytes/token  KV {format_bytes(row.kv_bytes):>9}  "
          f"max context {row.max_context:,}")

name, reason = recommend_config(model, context, budget)
print("recommended:", reason)

# %% [markdown]
# ## 3. Generate while tracking memory
# `MemoryTracker` records, at each step, the tokens so far, the KV bytes (total and per
# layer) and MLX's active / peak / cache memory. mlx-lm reports each prefill chunk through
# `prompt_progress_callback`, and each generated token by yielding it.

# %%
def generate(config, label):
    cache = mlxkv.make_kv_cache(model, config)
    mx.clear_cache()
    with MemoryTracker(cache, label=label, kv_config=config.describe()) as tracker:
        pieces = []
        for response in stream_generate(
            model, tokenizer, prompt, max_tokens=MAX_TOKENS, prompt_cache=cache,
            prefill_step_size=PREFILL_STEP, prompt_progress_callback=lambda done, total: tracker.step(),
        ):
            pieces.append(response.text)
            tracker.step()
    return tracker, cache, "".join(pieces)


runs = {}
for label, config in {
    "fp16": mlxkv.KVConfig(),
    "4-bit": mlxkv.KVConfig(bits=4),
    f"4-bit, {WINDOW}-token window": mlxkv.KVConfig(bits=4, max_kv=WINDOW),
}.items():
    tracker, cache, text = generate(config, label)
    runs[label] = (tracker, cache, config)
    print(f"{tracker.summary()}\n  {text[:100]!r}...")

# %% [markdown]
# ## 4. Predicted vs measured
# The planner mirrors each cache's growth, so its prediction equals what the caches hold.

# %%
for label, (tracker, cache, config) in runs.items():
    tokens = tracker.records[-1]["tokens"]
    predicted = predict_kv_bytes(config, layout, tokens, dtype_bytes=layout.dtype_bytes)
    measured = sum(c.nbytes for c in cache)
    print(f"{label:25} {tokens} tokens: predicted {format_bytes(predicted)}, measured {format_bytes(measured)}")

# %% [markdown]
# ## 5. Save and plot
# Reports are JSON or CSV; the plot puts every run on one figure (needs matplotlib).

# %%
runs["4-bit"][0].save(OUT / "walkthrough_memory.json")
try:
    print("plot:", plot_memory_runs([tracker.run for tracker, _, _ in runs.values()], OUT / "walkthrough_memory.png"))
except mlxkv.UserError as hint:  # matplotlib missing: a one-line hint
    print(hint)

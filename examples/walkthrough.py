# %% [markdown]
# # mlxkv walkthrough: load, plan, generate, watch memory, plot
#
# Run it as a script (`python examples/walkthrough.py [OUT_DIR] [--short]`) or cell by cell in
# an editor that understands `# %%` cells (VS Code, PyCharm, Jupytext). It uses the bundled
# SmolLM2-135M-Instruct, so it needs no download. The memory reports and the plot go to
# OUT_DIR (default ./walkthrough-out); `--short` runs a short prompt and few tokens (the test
# suite does).

# %%
import argparse
from pathlib import Path

import mlxkv  # first: it picks the fast BLAS before MLX loads
import mlx.core as mx
from mlx_lm import stream_generate

from mlxkv.memory import (
    MemoryTracker, candidate_configs, device_memory, format_bytes, layout_from_model,
    model_weights_bytes, plan, plot_memory_runs, predict_kv_bytes, recommend_config,
)

parser = argparse.ArgumentParser(description="mlxkv's walkthrough: plan, generate three ways, compare memory")
parser.add_argument("out", nargs="?", default="walkthrough-out", help="folder for the reports and the plot")
parser.add_argument("--short", action="store_true", help="a short prompt and few tokens")
options, _ = parser.parse_known_args()  # in a notebook, the kernel's own arguments are left alone
MAX_TOKENS, REPEATS, WINDOW = (12, 2, 64) if options.short else (200, 12, 256)
PREFILL_STEP = 32 if options.short else 64  # small prefill chunks: a smooth memory curve, a low peak
OUT = Path(options.out)
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
#
# Like with like: every run gets the same prompt and exactly `MAX_TOKENS` new tokens (the
# end-of-text token is banned, so no run stops early), and starts from the same memory:
# the previous run's cache is freed and MLX's buffer cache emptied before the next begins.
# `start_active_bytes` in each report records that starting point.

# %%
eos = sorted(tokenizer.eos_token_ids)


def no_eos(tokens, logits):
    return logits.at[:, eos].add(-float("inf"))


def generate(config, label):
    """One run on a fresh cache: its tracker, the KV bytes predicted and held at the end, the text."""
    mx.clear_cache()
    start = mx.get_active_memory()
    cache = mlxkv.make_kv_cache(model, config)
    with MemoryTracker(cache, label=label, kv_config=config.describe(), start_active_bytes=start) as tracker:
        pieces = []
        for response in stream_generate(
            model, tokenizer, prompt, max_tokens=MAX_TOKENS, prompt_cache=cache, logits_processors=[no_eos],
            prefill_step_size=PREFILL_STEP, prompt_progress_callback=lambda done, total: tracker.step(),
        ):
            pieces.append(response.text)
            tracker.step()
    tokens = tracker.records[-1]["tokens"]
    predicted = predict_kv_bytes(config, layout, tokens, dtype_bytes=layout.dtype_bytes)
    measured = sum(c.nbytes for c in cache)
    tracker.attach([])  # the tracker keeps its records, not the cache: it is freed on return
    return tracker, predicted, measured, "".join(pieces)


runs = {}
for label, config in {
    "fp16": mlxkv.KVConfig(),
    "4-bit": mlxkv.KVConfig(bits=4),
    f"4-bit, {WINDOW}-token window": mlxkv.KVConfig(bits=4, max_kv=WINDOW),
}.items():
    runs[label] = generate(config, label)
    tracker, _, _, text = runs[label]
    print(f"{tracker.summary()}\n  {text[:100]!r}...")

# %% [markdown]
# ## 4. Predicted vs measured
# The planner mirrors each cache's growth, so its prediction equals what the caches held.

# %%
for label, (tracker, predicted, measured, _) in runs.items():
    tokens = tracker.records[-1]["tokens"]
    print(f"{label:25} {tokens} tokens: predicted {format_bytes(predicted)}, measured {format_bytes(measured)}")

# %% [markdown]
# ## 5. Save and plot
# Reports are JSON or CSV; the plot puts every run on one figure (needs matplotlib).

# %%
for label, (tracker, *_) in runs.items():
    tracker.save(OUT / f"memory-{label.replace(', ', '-').replace(' ', '-')}.json")
try:
    print("plot:", plot_memory_runs([tracker.run for tracker, *_ in runs.values()], OUT / "memory.png"))
except mlxkv.UserError as hint:  # matplotlib missing: a one-line hint
    print(hint)
print("reports and plot in", OUT)

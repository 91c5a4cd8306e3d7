"""Prefill (mlxkv.stepping): the prompt fills the cache in steps without logits, the last
token's logits equal a plain full forward's (no cache at all), and no [chunk, vocab] array
is ever allocated (peak memory on a tiny model with a large vocabulary)."""

from __future__ import annotations

import gc

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlxkv
from mlxkv.loading.tiny import tiny_model
from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE, fill_cache, forward_chunks, prefill

PROMPT = mx.random.randint(0, 256, (33,), key=mx.random.key(5))


@pytest.mark.parametrize("step", [1, 5, 32, 33, 100, DEFAULT_PREFILL_STEP_SIZE])
@pytest.mark.parametrize("cache_kind", ["mlxkv", "mlx-lm"])
def test_prefill_gives_the_last_tokens_logits_and_fills_the_cache(step, cache_kind):
    model = tiny_model("qwen3")
    cache = mlxkv.make_kv_cache(model, "fp16") if cache_kind == "mlxkv" else make_prompt_cache(model)
    logits = prefill(model, PROMPT, cache, step)
    full = model(PROMPT[None])[0]
    assert logits.shape == full[-1].shape
    assert mx.abs(logits - full[-1]).max().item() < 1e-4
    # the cache holds the whole prompt: the next token continues it as a full forward would
    after = model(mx.array([[7]]), cache=cache)[0, -1]
    whole = model(mx.concatenate([PROMPT, mx.array([7])])[None])[0, -1]
    assert mx.abs(after - whole).max().item() < 1e-4


def test_prefill_takes_a_list_and_rejects_what_it_cannot_run():
    model = tiny_model("llama")
    assert prefill(model, [1, 2, 3], make_prompt_cache(model)).shape == (256,)
    with pytest.raises(ValueError, match="empty prompt"):
        prefill(model, [], make_prompt_cache(model))
    with pytest.raises(ValueError, match="prefill_step_size"):
        fill_cache(model, [1, 2, 3], make_prompt_cache(model), 0)


def _peak_above_start(run) -> int:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    run()
    return mx.get_peak_memory() - before


def test_prefill_never_materializes_chunk_by_vocab_logits():
    """[step, vocab] float32 logits would be 64 MB here; the prefill's whole transient stays
    far below them, while feeding the same chunks with every position's logits (what
    ``forward_chunks`` does for ``eval kld``) allocates them: the measurement can see it."""
    vocab, step = 65536, 256
    model = tiny_model("llama", vocab_size=vocab, head_dim=64)
    prompt = mx.random.randint(0, vocab, (2 * step + 1,), key=mx.random.key(0))
    logits_bytes = step * vocab * 4

    def with_all_logits():
        cache = mlxkv.make_kv_cache(model, "q4")
        for _ in forward_chunks(model, prompt, cache, step):
            pass

    def prefill_only():
        prefill(model, prompt, mlxkv.make_kv_cache(model, "q4"), step)

    assert _peak_above_start(with_all_logits) >= logits_bytes
    assert _peak_above_start(prefill_only) < logits_bytes / 4

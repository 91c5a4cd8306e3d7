"""Tiny random models: each architecture builds, is deterministic, and decodes with mlx-lm's caches."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache, make_prompt_cache

from mlxkv.errors import UserError
from mlxkv.loading.tiny import TINY_ARCHS, TINY_VOCAB_SIZE, tiny_model

PROMPT = mx.array([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]])  # longer than the sliding windows


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_prefill_then_decode_matches_a_full_forward(arch: str) -> None:
    model = tiny_model(arch)
    params = dict(tree_flatten(model.parameters()))
    assert all(v.dtype == mx.float32 for v in params.values())
    assert sum(v.size for v in params.values()) < 300_000

    cache = make_prompt_cache(model)
    prefill = model(PROMPT, cache=cache)
    step = model(mx.array([[7]]), cache=cache)
    full = model(mx.concatenate([PROMPT, mx.array([[7]])], axis=1))
    assert prefill.shape == (1, PROMPT.shape[1], TINY_VOCAB_SIZE)
    np.testing.assert_allclose(np.array(step[0, -1]), np.array(full[0, -1]), atol=1e-4)


def test_same_seed_same_weights_and_overrides_apply() -> None:
    first, second = tiny_model("qwen3", seed=3), tiny_model("qwen3", seed=3)
    other = tiny_model("qwen3", seed=4)
    a, b, c = (np.array(m.model.embed_tokens.weight) for m in (first, second, other))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(tiny_model("llama", num_hidden_layers=3).layers) == 3


def test_cache_kinds_cover_what_kv_caches_must_handle() -> None:
    kinds = {arch: {type(c) for c in make_prompt_cache(tiny_model(arch))} for arch in TINY_ARCHS}
    assert kinds["llama"] == {KVCache}
    assert kinds["gemma3_text"] == {KVCache, RotatingKVCache}  # sliding-window layers
    assert kinds["gpt_oss"] == {KVCache, RotatingKVCache}
    assert ArraysCache in kinds["lfm2"]  # recurrent state layers
    sinks = tiny_model("gpt_oss").model.layers[0].self_attn.sinks
    assert mx.abs(sinks).sum().item() > 0  # attention sinks are non-trivial parameters


def test_unknown_arch() -> None:
    with pytest.raises(UserError, match="no tiny model for 'mamba'"):
        tiny_model("mamba")

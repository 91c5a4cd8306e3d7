"""Bits per element count what the cache holds, for every store layout."""

import mlx.core as mx
import pytest

import mlxkv
from mlxkv.memory.held import bits_per_element
from mlxkv.loading.tiny import tiny_model
from mlxkv.stepping import forward_chunks


@pytest.mark.parametrize(
    "config,expected",
    [
        (mlxkv.KVConfig(bits=4, residual=0, sinks=0), 4.5),  # 4 bits + 32 bits of scale and bias per 64
        (mlxkv.KVConfig(bits=4, per_channel_keys=True, residual=0, sinks=0), 4.5),  # same, along tokens
        (mlxkv.KVConfig(k_bits=4, v_bits=2, residual=0, sinks=0), 3.5),
        (mlxkv.KVConfig(mode="mxfp4", residual=0, sinks=0), 4.25),  # 8-bit scale per 32
        # the 4 sinks (default) in 16-bit beside 252 packed tokens
        (mlxkv.KVConfig(bits=4, residual=0), (252 * 4.5 + 4 * 16) / 256),
        # per-channel groups count from the first token after the sinks: 3 groups of 64 are
        # packed, the incomplete fourth (60 tokens) waits in 16-bit with the sinks
        (mlxkv.KVConfig(bits=4, per_channel_keys=True, residual=0), (192 * 4.5 + 64 * 16) / 256),
        # 32 tokens and the 4 sinks in 16-bit beside 220 packed 4.5-bit tokens
        (mlxkv.KVConfig(bits=4, residual=32), (220 * 4.5 + 36 * 16) / 256),
        # a window keeps 4 sinks in 16-bit and 60 packed tokens
        (mlxkv.KVConfig(bits=4, residual=0, max_kv=64, sinks=4), (60 * 4.5 + 4 * 16) / 64),
    ],
)
def test_bits_per_element(config, expected):
    model = tiny_model("llama", head_dim=64)
    cache = mlxkv.make_kv_cache(model, config)
    for _ in forward_chunks(model, mx.arange(256) % 200, cache, 64):
        pass
    assert bits_per_element(model, cache) == pytest.approx(expected, rel=1e-6)

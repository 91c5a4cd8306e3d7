"""One config dialect: names, spec strings and flags mean the same in every command, values are
strict, token counts parse alike, and the registry decides what --kv-bits N means."""

from __future__ import annotations

import argparse

import pytest

from mlxkv.cli.kv_args import add_kv_arguments, request_from_args, specs_from_args
from mlxkv.config import KVConfig, parse_spec
from mlxkv.errors import UserError
from mlxkv.schemes import SCHEMES, best_at_bits, ranked
from mlxkv.units import parse_tokens


def flags(*argv: str, multi: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_kv_arguments(parser, multi=multi)
    if multi:
        parser.add_argument("--configs", default="fp16")
    return parser.parse_args(list(argv))


@pytest.mark.parametrize("spec, argv", [
    ("q4:residual=64", ["--kv-config", "q4", "--kv-residual", "64"]),
    ("bits=4:max_kv=4k:sinks=8", ["--kv-config", "bits=4", "--max-kv", "4k", "--sinks", "8"]),
    ("q3:layer_bits=0@8/-1@16", ["--kv-config", "q3", "--kv-bits-map", "0:8,-1:16"]),
    ("fp16:adaptive=1k@8/4k@4", ["--kv-adaptive", "1024:8,4096:4"]),
    ("k8v4:rotate=1:per_channel_keys=yes", ["--kv-config", "k8v4", "--kv-rotate", "--per-channel-keys"]),
    ("fp16:max_kv=256:evict=h2o", ["--max-kv", "256", "--kv-evict", "h2o"]),
])
def test_spec_strings_and_flags_mean_the_same(spec, argv):
    assert parse_spec(spec) == request_from_args(flags(*argv)).resolve()


def test_every_multi_config_command_takes_the_flags_as_overrides():
    args = flags("--max-kv", "512", "--kv-residual", "16", multi=True)
    specs = specs_from_args(args, "q4,q8-nores")
    assert [parse_spec(s) for s in specs] == [
        KVConfig(bits=4, max_kv=512, residual=16), KVConfig(bits=8, max_kv=512, residual=16)]


@pytest.mark.parametrize("spec, message", [
    ("q4:rotate=2", "rotate takes 1 or 0"),
    ("q4:bits=7", "bits=7 is not supported"),
    ("q4:k_bits=0", "16 for full precision"),
    ("q4:max_kv=-3", "cannot read the max_kv"),
    ("q4:group_size=48", "group size 48"),
    ("q4:mode=fp5", "unknown quantization mode"),
    ("q4:layer_bits=0:8", "in a spec string: 0@8/-1@8"),
    ("q4:residual", "write FIELD=VALUE"),
    ("q9", "unknown KV config 'q9'"),
])
def test_values_are_strict(spec, message):
    with pytest.raises(UserError, match=message):
        parse_spec(spec)


def test_full_precision_is_written_sixteen_and_read_as_none():
    config = parse_spec("q4:k_bits=16")
    assert config.key_bits is None and config.value_bits == 4
    assert parse_spec("q4:bits=16") == KVConfig()
    assert KVConfig(bits=4, layer_bits=((0, 16),)).for_layer(0, 2).key_bits is None
    assert [s.key_bits for s in KVConfig(bits=4, quantized_kv_start=100).stages] == [None, 4]


@pytest.mark.parametrize("text, tokens", [("4096", 4096), ("4k", 4096), ("32K", 32768), ("32,768", 32768),
                                          ("1.5k", 1536), ("1m", 2**20)])
def test_token_counts_parse_alike(text, tokens):
    assert parse_tokens(text) == tokens


def test_kv_bits_takes_the_best_measured_scheme_the_model_can_hold():
    measured_4bit = [s for s in ranked() if s.config().key_bits == s.config().value_bits == 4
                     and s.config().mode == "affine"]
    assert best_at_bits(4) == measured_4bit[0].config()
    assert best_at_bits(4) == KVConfig.from_name("q4-kivi-rot")  # today's measurements
    # what the user set narrows the choice: no rotation, or H2O (per-token placement)
    assert best_at_bits(4, rotate=False) == KVConfig.from_name("q4-kivi")
    h2o = best_at_bits(4, max_kv=256, evict="h2o")
    assert not h2o.per_channel_keys and h2o.max_kv == 256
    # a model whose head size cannot rotate gets the best scheme without rotation
    assert best_at_bits(4, usable=lambda c: not c.rotate) == KVConfig.from_name("q4-kivi")


def test_every_scheme_builds_and_baselines_are_never_ranked():
    for name, scheme in SCHEMES.items():
        assert scheme.config() == parse_spec(name)
    assert all(not s.baseline for s in ranked())
    klds = [s.measured.kld for s in ranked() if s.measured]
    assert klds == sorted(klds)


def test_window_bits_reach_the_models_own_window_layers_only():
    """Gemma's sliding-window layers take window_bits; its global layers keep the scheme."""
    import mlx.core as mx

    import mlxkv
    from mlxkv.loading.tiny import tiny_model

    model = tiny_model("gemma3_text", head_dim=64, query_pre_attn_scalar=64)
    tokens = mx.zeros((1, 40), dtype=mx.int32)

    def layer_bytes(config):
        cache = mlxkv.make_kv_cache(model, config)
        model(tokens, cache=cache)
        return [c.nbytes for c in cache]

    mixed = layer_bytes(KVConfig.from_name("q4-kivi-rot", window_bits=16))
    full, packed = layer_bytes(KVConfig()), layer_bytes(KVConfig.from_name("q4-kivi-rot:window_bits=same"))
    sliding = [type(c).__name__ == "RotatingKVCache" for c in model.make_cache()]
    assert any(sliding) and not all(sliding)
    assert mixed == [f if s else p for f, p, s in zip(full, packed, sliding)]


def test_window_bits_default_and_same():
    """8-bit window layers by default in a quantized cache (QUALITY.md, Gemma 3 270M), full
    precision in a full-precision one; 'same' quantizes them like the rest."""
    from mlxkv.config import parse_spec

    assert KVConfig().window_bits == 8 == KVConfig.from_name("q4-kivi-rot").window_bits
    assert KVConfig().for_layer(0, 6, sliding=True).quantized is False
    same = parse_spec("q4-kivi-rot:window_bits=same")
    assert same.window_bits is None and "like the others" in same.describe()
    assert "window layers" not in KVConfig.from_name("q4-kivi-rot").describe()
    assert parse_spec("q4:window_bits=8").for_layer(0, 6, sliding=True).bits == 8

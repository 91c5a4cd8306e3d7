"""Heavy-hitter eviction (H2O, ``evict="h2o"``) against the documented reference
(kv_reference.py): it keeps the sinks, the newest ``residual`` tokens and, up to the budget,
the older tokens with the highest attention accumulated by float32 attention over exactly
the tokens it keeps (quantized when packed). The cache must attend like it at every step.
tests/test_cache_properties.py runs random programs of the same kind, ties included."""

from __future__ import annotations

import argparse

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import save_prompt_cache

import mlxkv
from conftest import KVData, check_counts, random_tokens, run_chunks, run_logits
from kv_reference import Layout, ReferenceCache
from mlxkv.caches import HeavyHitterCache
from mlxkv.config import KVConfig, parse_spec
from mlxkv.loading.tiny import tiny_model


def h2o_layout(cfg: KVConfig) -> Layout:
    return Layout("h2o", cfg.sinks, cfg.residual, max_kv=cfg.max_kv)


CHUNKS = [10] + [1] * 30 + [7, 1, 1, 33] + [1] * 20 + [5, 1]


@pytest.mark.parametrize(
    "cfg",
    [
        KVConfig(max_kv=24, sinks=4, residual=4, evict="h2o"),
        KVConfig(bits=8, max_kv=24, sinks=4, residual=4, evict="h2o"),
        KVConfig(bits=4, max_kv=24, sinks=4, residual=4, evict="h2o"),
        KVConfig(k_bits=8, v_bits=4, max_kv=20, sinks=0, residual=1, evict="h2o", rotate=True),
        KVConfig(mode="mxfp4", max_kv=30, sinks=2, residual=8, evict="h2o"),
    ],
    ids=lambda c: c.describe(),
)
def test_h2o_attends_like_the_reference(cfg):
    ref = ReferenceCache(cfg, h2o_layout(cfg))
    run_chunks(HeavyHitterCache(cfg), ref, CHUNKS, KVData(0, heads=(6, 2), h2o=True))
    assert set(ref.heavy) - set(range(4, 14)), "no later token became a heavy hitter: the data tests nothing"


def test_h2o_over_a_long_decode_keeps_its_budget():
    """200 decode steps after a prompt: the reference keeps the sinks, the 8 newest and the
    heaviest 28 others, exactly the budget; the cache attends like it throughout."""
    cfg = KVConfig(bits=4, max_kv=40, sinks=4, residual=8, evict="h2o")
    cache, ref = HeavyHitterCache(cfg), ReferenceCache(cfg, h2o_layout(cfg))
    run_chunks(cache, ref, [12] + [1] * 200, KVData(3, heads=(4, 2), h2o=True))
    assert len(ref.heavy) == 28 and cache.size() == cfg.max_kv
    assert not cache.is_trimmable()


def test_h2o_is_trimmable_until_something_is_evicted():
    cfg = KVConfig(bits=8, max_kv=20, sinks=2, residual=4, evict="h2o")
    cache, ref = HeavyHitterCache(cfg), ReferenceCache(cfg, h2o_layout(cfg))
    data = KVData(4, h2o=True)
    run_chunks(cache, ref, [1] * 12, data)
    assert cache.is_trimmable() and cache.trim(3) == ref.trim(3) == 3
    check_counts(cache, ref, "after the trim")
    run_chunks(cache, ref, [1] * 30, data)  # continues as if the 3 tokens had never come
    assert not cache.is_trimmable()


# -- through unmodified mlx-lm -------------------------------------------------------------
def test_h2o_in_mlx_lm_generate_has_constant_kv_bytes_and_flat_memory():
    model = tiny_model("llama", head_dim=64)
    config = KVConfig(bits=4, max_kv=64, sinks=4, residual=8, evict="h2o")
    cache = mlxkv.make_kv_cache(model, config)
    assert all(type(c) is HeavyHitterCache for c in cache)
    kv_bytes, active = {}, {}
    for step, _ in zip(range(1, 401), generate_step(random_tokens(8), model, max_tokens=400, prompt_cache=cache)):
        if step in (100, 400):
            mx.eval([c.state for c in cache])
            kv_bytes[step] = sum(c.nbytes for c in cache)
            active[step] = mx.get_active_memory()
    assert kv_bytes[100] == kv_bytes[400] > 0
    assert all(c.size() == 64 for c in cache)
    # scores are summed step by step: no graph (and no attention weights) piles up
    assert active[400] - active[100] < 100_000, active


def test_h2o_prompt_cache_round_trip_continues_identically(tmp_path):
    model = tiny_model("llama", head_dim=64)
    toks = random_tokens(90)
    config = KVConfig(bits=8, max_kv=40, sinks=4, residual=6, evict="h2o")
    cache = mlxkv.make_kv_cache(model, config)
    run_logits(model, cache, toks[:60], chunks=(16, 16, 16) + (1,) * 12)
    assert not cache[0].is_trimmable()  # tokens were evicted: the state matters
    path = tmp_path / "h2o.safetensors"
    save_prompt_cache(str(path), cache)
    restored = mlxkv.load_prompt_cache(path)
    assert [type(c) for c in restored] == [HeavyHitterCache] * len(cache)
    assert all(a.meta_state == b.meta_state for a, b in zip(cache, restored))
    cont_a = run_logits(model, cache, toks[60:], chunks=(1,) * 30)
    cont_b = run_logits(model, restored, toks[60:], chunks=(1,) * 30)
    assert mx.array_equal(cont_a, cont_b)


# -- configuration -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"evict": "h2o"}, "needs a token budget: set max_kv"),
        ({"evict": "h2o", "max_kv": 36, "residual": 32}, "max_kv=36 must exceed sinks \\+ residual"),
        ({"evict": "h2o", "max_kv": 64, "residual": 0}, "residual >= 1"),
        ({"evict": "h2o", "max_kv": 64, "backend": "mlx-lm"}, "mlx-lm's caches cannot evict"),
        ({"evict": "h2o", "max_kv": 256, "bits": 4, "per_channel_keys": True}, "drop per_channel_keys"),
        ({"evict": "lru", "max_kv": 64}, "unknown eviction 'lru'"),
    ],
)
def test_bad_h2o_budgets_are_one_line_errors(kwargs, message):
    with pytest.raises(mlxkv.UserError, match=message) as e:
        KVConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_h2o_from_specs_and_flags():
    cfg = parse_spec("q8:max_kv=256:evict=h2o")  # by default half of what the sinks leave is recent
    assert (cfg.bits, cfg.max_kv, cfg.evict, cfg.effective_residual) == (8, 256, "h2o", 126)
    assert "h2o 256 = 4 sinks + 126 heavy hitters + 126 recent" in cfg.describe()
    assert parse_spec("q8:max_kv=256:evict=h2o:residual=32").effective_residual == 32
    assert KVConfig(max_kv=64, evict="h2o").effective_residual == 30  # full precision too
    assert KVConfig(bits=4).effective_residual == 32 and KVConfig().effective_residual == 0
    from mlxkv.cli.kv_args import add_kv_arguments, request_from_args

    parser = argparse.ArgumentParser()
    add_kv_arguments(parser)
    args = parser.parse_args(["--max-kv", "128", "--kv-evict", "h2o", "--kv-bits", "4"])
    # the best measured 4-bit scheme H2O can hold: per-channel keys are written in groups, so rotated per-token
    assert request_from_args(args).resolve() == KVConfig(bits=4, rotate=True, max_kv=128, evict="h2o")

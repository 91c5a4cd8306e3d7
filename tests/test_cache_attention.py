"""Our caches + attention against the documented reference (kv_reference.py) on chosen chunk
sequences: every bit width and group size, K and V with their own bits, residual and sink
sizes, windows across many wraps, per-channel keys at group boundaries, rotation and the
microscaling formats. tests/test_cache_properties.py runs random programs of the same kind."""

from __future__ import annotations

import itertools

import mlx.core as mx
import pytest

from conftest import KVData, run_chunks
from kv_reference import Layout, ReferenceCache
from mlxkv.attention import attend
from mlxkv.caches import QuantizedCache, SinkWindowCache
from mlxkv.config import KVConfig


def run_against_reference(cache, cfg: KVConfig, layout: Layout, chunks, heads, head_dim: int = 64) -> ReferenceCache:
    """Feed chunks of these sizes through ``cache``; compare every step with the reference."""
    ref = ReferenceCache(cfg, layout)
    run_chunks(cache, ref, chunks, KVData(0, heads=heads, head_dim=head_dim))
    return ref


def keep_all(cfg: KVConfig) -> Layout:
    return Layout("all", cfg.sinks, cfg.residual)


BITS = [None, 2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]
GQA = [(4, 4), (6, 2)]


@pytest.mark.parametrize("bits,group_size,heads", list(itertools.product(BITS, GROUPS, GQA)))
def test_unbounded_cache_matches_reference(bits, group_size, heads):
    n_q, n_kv = heads
    head_dim = 128 if group_size == 128 else 64
    cfg = KVConfig(bits=bits, group_size=group_size, residual=8)
    # a prefill chunk, decode steps, a chunk longer than the residual, more decode
    chunks = [13, 1, 1, 1, 20, 1, 1, 5, 1]
    run_against_reference(QuantizedCache(cfg), cfg, keep_all(cfg), chunks, (n_q, n_kv), head_dim)


@pytest.mark.parametrize("k_bits,v_bits", [(8, 4), (4, 2), (16, 4), (4, 16)])
def test_keys_and_values_with_their_own_bits(k_bits, v_bits):
    cfg = KVConfig(k_bits=k_bits, v_bits=v_bits, residual=4)
    run_against_reference(QuantizedCache(cfg), cfg, keep_all(cfg), [9, 1, 1, 7, 1, 1], (4, 2))


@pytest.mark.parametrize("residual", [0, 1, 16])
@pytest.mark.parametrize("sinks", [0, 4, 20])
def test_residual_and_sink_sizes(residual, sinks):
    cfg = KVConfig(bits=4, residual=residual, sinks=sinks)
    run_against_reference(QuantizedCache(cfg), cfg, keep_all(cfg), [17, 1, 1, 1, 3, 1], (4, 2))


@pytest.mark.parametrize("bits,per_channel", [(None, False), (8, False), (4, False), (2, False), (4, True)])
@pytest.mark.parametrize("residual", [0, 4])
def test_sink_window_matches_explicit_reference_across_many_wraps(bits, per_channel, residual):
    sinks, max_kv = 4, 24 if not per_channel else 100
    cfg = KVConfig(bits=bits, max_kv=max_kv, sinks=sinks, residual=residual, per_channel_keys=per_channel, group_size=32)
    cache = SinkWindowCache(cfg)
    # decode past several wraps, chunks that wrap, and a chunk longer than the window
    chunks = [10] + [1] * 30 + [7, 1, 1, 33] + [1] * 25 + [5, 1] + ([1] * 100 + [70, 1] if per_channel else [])
    run_against_reference(cache, cfg, Layout("window", sinks, residual, window=max_kv - sinks), chunks, (6, 2))
    assert cache.size() == max_kv


def test_prompt_longer_than_window_in_one_chunk():
    cfg = KVConfig(bits=4, max_kv=16, sinks=2, residual=2)
    run_against_reference(SinkWindowCache(cfg), cfg, Layout("window", 2, 2, window=14), [50, 1, 1, 40, 1], (4, 2))


def test_sliding_window_without_sinks():
    cfg = KVConfig(bits=8, residual=2)
    cache = SinkWindowCache(cfg, window=9, sinks=0)
    run_against_reference(cache, cfg, Layout("window", 0, 2, window=9), [5, 1, 1, 12, 1, 1, 1, 1, 1, 1, 4], (4, 4))


def test_bounded_memory_for_endless_generation():
    cfg = KVConfig(bits=4, max_kv=64, sinks=4, residual=8)
    cache = SinkWindowCache(cfg)
    k = mx.ones((1, 2, 1, 64))
    sizes = {}
    cache.update_and_fetch(mx.ones((1, 2, 10, 64)), mx.ones((1, 2, 10, 64)))
    for step in range(1, 10 * 64 + 1):
        view, _ = cache.update_and_fetch(k, k)
        if step in (64, 640):
            mx.eval(cache.state)
            sizes[step] = cache.nbytes
    assert sizes[64] == sizes[640]


@pytest.mark.parametrize("per_channel", [False, True])
def test_quantized_kv_start_converts_mid_stream(per_channel):
    """Full precision until the cache holds 60 tokens; then what left the 16-bit tier is
    quantized in place (per-channel keys: whole groups, the rest stays 16-bit). Steps start
    at 59, 60 and 61 tokens: the reference with the switch one token off either way fails."""
    cfg = KVConfig(bits=4, group_size=32, per_channel_keys=per_channel, quantized_kv_start=60, residual=4)
    layout = Layout("all", cfg.sinks, cfg.residual, quantize_from=60)
    chunks = [8, 1, 1, 1, 1, 25, 1, 1, 1, 5, 1, 1, 11, 1, 1, 1, 40, 1]
    run_against_reference(QuantizedCache(cfg), cfg, layout, chunks, (4, 2))


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (2, 64), (8, 128), (3, 64)])
@pytest.mark.parametrize("residual", [0, 5])
def test_per_channel_keys_match_reference_at_group_boundaries(bits, group_size, residual):
    cfg = KVConfig(bits=bits, group_size=group_size, per_channel_keys=True, residual=residual)
    head_dim = 128 if group_size == 128 else 64
    # chunks that end before, exactly at, and across group boundaries
    chunks = [group_size - 3, 1, 1, 1, 1, group_size + 7, 1, 2 * group_size, 1, 1]
    run_against_reference(QuantizedCache(cfg), cfg, keep_all(cfg), chunks, (6, 2), head_dim)


def test_per_channel_trim_returns_the_cut_group_to_the_exact_tier():
    """Trimming into a packed per-channel group returns the group's remaining tokens to the
    16-bit tier as the store read them; flushing resumes on a group boundary."""
    cfg = KVConfig(bits=4, group_size=32, per_channel_keys=True, residual=0, sinks=0)  # groups from token 0
    cache, ref = QuantizedCache(cfg), ReferenceCache(cfg, Layout("all", 0, 0))
    data = KVData(3, heads=(2, 2))
    run_chunks(cache, ref, [70], data)
    assert cache.trim(10) == ref.trim(10) == 10  # 60 tokens: group [32, 64) is cut
    run_chunks(cache, ref, [1, 40, 1, 1], data)


def test_rotation_is_its_own_inverse():
    x = mx.random.normal((2, 3, 5, 64))
    assert mx.allclose(mx.hadamard_transform(mx.hadamard_transform(x)), x, atol=1e-5)


def test_rotation_leaves_full_precision_attention_unchanged():
    plain, rotated = QuantizedCache(KVConfig()), QuantizedCache(KVConfig(rotate=True))
    for n in (9, 1, 1, 6):
        k, v, q = (mx.random.normal((1, h, n, 64)) for h in (2, 2, 6))
        out_plain = attend(q, plain.update_and_fetch(k, v)[0], scale=0.125)
        out_rotated = attend(q, rotated.update_and_fetch(k, v)[0], scale=0.125)
        assert mx.abs(out_plain - out_rotated).max().item() < 1e-5


@pytest.mark.parametrize(
    "cfg",
    [
        KVConfig(bits=4, rotate=True, residual=0),
        KVConfig(bits=3, rotate=True, per_channel_keys=True, group_size=32, residual=0),
        KVConfig(k_bits=8, v_bits=4, rotate=True, residual=0),
        KVConfig(mode="mxfp4", residual=0),
        KVConfig(mode="nvfp4", residual=0),
        KVConfig(mode="mxfp8", residual=0),
        KVConfig(mode="mxfp4", rotate=True, residual=0),
        KVConfig(mode="mxfp4", per_channel_keys=True, residual=0),
    ],
    ids=lambda c: c.describe(),
)
def test_rotated_and_microscaling_caches_match_reference(cfg):
    run_against_reference(QuantizedCache(cfg), cfg, keep_all(cfg), [40, 1, 1, 1, 33, 1, 1], (6, 2))


def test_rotation_rejects_head_dims_hadamard_cannot_do():
    from mlxkv.errors import UserError

    with pytest.raises(UserError, match="rotation needs head_dim"):
        QuantizedCache(KVConfig(bits=4, group_size=32, rotate=True)).update_and_fetch(
            mx.ones((1, 2, 1, 36)), mx.ones((1, 2, 1, 36))
        )


def test_microscaling_fixes_bits_and_group_size():
    from mlxkv.errors import UserError

    assert (KVConfig(mode="nvfp4").key_bits, KVConfig(mode="nvfp4").precision.group) == (4, 16)
    with pytest.raises(UserError, match="mxfp4 is 4-bit"):
        KVConfig(mode="mxfp4", bits=8)

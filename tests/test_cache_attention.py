"""Our caches + attention against an independent reference: fp32 attention over the tokens a
cache should hold, each token either fake-quantized (if it was flushed to the packed store
before the step) or exact, with visibility decided by positions (causal, sinks, window)."""

from __future__ import annotations

import itertools

import mlx.core as mx
import pytest

from mlxkv.attention import attend
from mlxkv.caches import QuantizedCache, SinkWindowCache
from mlxkv.config import KVConfig


def fake_quant(x: mx.array, bits: int | None, group_size: int, mode: str = "affine") -> mx.array:
    """Quantize-dequantize with 16-bit scales, the reference for what the store holds."""
    if bits is None:
        return x
    if mode != "affine":
        return mx.dequantize(*mx.quantize(x, mode=mode), mode=mode).astype(mx.float32)
    w, s, b = mx.quantize(x, group_size=group_size, bits=bits)
    s = s.astype(mx.float16).astype(mx.float32)
    b = b.astype(mx.float16).astype(mx.float32)
    return mx.dequantize(w, s, b, group_size=group_size, bits=bits)


def reference_attention(q, keys, values, q_pos, k_pos, visible_fn, scale):
    """Plain fp32 attention with heads repeated explicitly (GQA) and a positional mask."""
    n_rep = q.shape[1] // keys.shape[1]
    keys = mx.repeat(keys, n_rep, axis=1)
    values = mx.repeat(values, n_rep, axis=1)
    scores = (q * scale) @ keys.swapaxes(-1, -2)
    mask = visible_fn(q_pos[:, None], k_pos[None, :])
    scores = mx.where(mask, scores, -1e30)
    return mx.softmax(scores, axis=-1) @ values


def f16_exact(shape, key):
    """Random data exactly representable in float16 (the residual tier is 16-bit)."""
    return mx.random.normal(shape, key=key).astype(mx.float16).astype(mx.float32)


def fake_quant_channels(block: mx.array, bits: int, group_size: int, mode: str = "affine") -> mx.array:
    """Per-channel reference: one group of ``group_size`` tokens, quantized along tokens."""
    return fake_quant(block.swapaxes(-1, -2), bits, group_size, mode).swapaxes(-1, -2)


def run_against_reference(cache, cfg, chunks, n_q_heads, n_kv_heads, head_dim, visible_fn, residual, sinks=0):
    """Feed ``chunks`` (sizes) through ``cache``; compare every step with the reference.

    A window's ``sinks`` stay exact (16-bit); groups along tokens count from the first
    token after them."""
    key = mx.random.key(0)
    all_k, all_v = [], []
    offset = flushed = 0
    per_channel = cfg.per_channel_keys
    unit = cfg.precision.group if per_channel else 1
    for step, n in enumerate(chunks):
        k1, k2, k3, key = mx.random.split(key, 4)
        k = f16_exact((1, n_kv_heads, n, head_dim), k1)
        v = f16_exact((1, n_kv_heads, n, head_dim), k2)
        q = mx.random.normal((1, n_q_heads, n, head_dim), key=k3)
        view, _ = cache.update_and_fetch(k, v)
        out = attend(q, view, scale=head_dim**-0.5)
        if cfg.rotate:  # the reference works in the rotated space the cache stores
            k, v, q = mx.hadamard_transform(k), mx.hadamard_transform(v), mx.hadamard_transform(q)

        # What the cache should hold: tokens flushed before this step are packed, the rest
        # (16-bit tier and the chunk) exact. Flushes leave at most `residual` tokens behind,
        # rounded to whole groups when keys are grouped along tokens.
        all_k += [k[..., i : i + 1, :] for i in range(n)]
        all_v += [v[..., i : i + 1, :] for i in range(n)]
        keys = mx.concatenate(all_k, axis=2)
        values = mx.concatenate(all_v, axis=2)
        if cfg.quantized and flushed > sinks:
            if per_channel:
                packed_k = mx.concatenate(
                    [fake_quant_channels(keys[..., g : g + unit, :], cfg.key_bits, unit, cfg.mode) for g in range(sinks, flushed, unit)],
                    axis=2,
                )
            else:
                packed_k = fake_quant(keys[..., sinks:flushed, :], cfg.key_bits, cfg.precision.group, cfg.mode)
            packed_v = fake_quant(values[..., sinks:flushed, :], cfg.value_bits, cfg.precision.group, cfg.mode)
            keys = mx.concatenate([keys[..., :sinks, :], packed_k, keys[..., flushed:, :]], axis=2)
            values = mx.concatenate([values[..., :sinks, :], packed_v, values[..., flushed:, :]], axis=2)
        k_pos = mx.arange(offset + n)
        q_pos = mx.arange(offset, offset + n)
        ref = reference_attention(q, keys, values, q_pos, k_pos, visible_fn, head_dim**-0.5)
        if cfg.rotate:
            ref = mx.hadamard_transform(ref)
        err = mx.abs(out - ref).max().item()
        assert err < 3e-4, f"step {step} (chunk {n}, offset {offset}): max error {err}"
        offset += n
        target = max(flushed, offset - residual)
        flushed = target if target <= sinks else target - (target - sinks) % unit
        assert cache.offset == offset and cache.flushed == flushed


def causal(q, k):
    return k <= q


def exact_sinks(cfg):
    """Quantized caches keep the first ``sinks`` tokens (attention sinks) in 16-bit."""
    return cfg.sinks if cfg.quantized else 0


BITS = [None, 2, 3, 4, 5, 6, 8]
GROUPS = [32, 64, 128]
GQA = [(4, 4), (6, 2)]


@pytest.mark.parametrize("bits,group_size,heads", list(itertools.product(BITS, GROUPS, GQA)))
def test_unbounded_cache_matches_reference(bits, group_size, heads):
    n_q, n_kv = heads
    head_dim = 128 if group_size == 128 else 64
    cfg = KVConfig(bits=bits, group_size=group_size, residual=8)
    cache = QuantizedCache(cfg)
    # a prefill chunk, decode steps, a chunk longer than the residual, more decode
    chunks = [13, 1, 1, 1, 20, 1, 1, 5, 1]
    run_against_reference(cache, cfg, chunks, n_q, n_kv, head_dim, causal, cache.residual, exact_sinks(cfg))


@pytest.mark.parametrize("k_bits,v_bits", [(8, 4), (4, 2), (16, 4), (4, 16)])
def test_keys_and_values_with_their_own_bits(k_bits, v_bits):
    cfg = KVConfig(k_bits=k_bits, v_bits=v_bits, residual=4)
    cache = QuantizedCache(cfg)
    run_against_reference(cache, cfg, [9, 1, 1, 7, 1, 1], 4, 2, 64, causal, cache.residual, exact_sinks(cfg))


@pytest.mark.parametrize("residual", [0, 1, 16])
@pytest.mark.parametrize("sinks", [0, 4, 20])
def test_residual_and_sink_sizes(residual, sinks):
    cfg = KVConfig(bits=4, residual=residual, sinks=sinks)
    cache = QuantizedCache(cfg)
    run_against_reference(cache, cfg, [17, 1, 1, 1, 3, 1], 4, 2, 64, causal, cache.residual, sinks)


def sink_window(sinks, window):
    def visible(q, k):
        return (k <= q) & ((k < sinks) | (q - k < window))

    return visible


@pytest.mark.parametrize("bits,per_channel", [(None, False), (8, False), (4, False), (2, False), (4, True)])
@pytest.mark.parametrize("residual", [0, 4])
def test_sink_window_matches_explicit_reference_across_many_wraps(bits, per_channel, residual):
    sinks, max_kv = 4, 24 if not per_channel else 100
    cfg = KVConfig(bits=bits, max_kv=max_kv, sinks=sinks, residual=residual, per_channel_keys=per_channel, group_size=32)
    cache = SinkWindowCache(cfg)
    # decode past several wraps, chunks that wrap, and a chunk longer than the window
    chunks = [10] + [1] * 30 + [7, 1, 1, 33] + [1] * 25 + [5, 1] + ([1] * 100 + [70, 1] if per_channel else [])
    run_against_reference(
        cache, cfg, chunks, 6, 2, 64, sink_window(sinks, max_kv - sinks), cache.residual, sinks
    )
    assert cache.size() == max_kv


def test_prompt_longer_than_window_in_one_chunk():
    cfg = KVConfig(bits=4, max_kv=16, sinks=2, residual=2)
    cache = SinkWindowCache(cfg)
    run_against_reference(cache, cfg, [50, 1, 1, 40, 1], 4, 2, 64, sink_window(2, 14), cache.residual, 2)


def test_sliding_window_without_sinks():
    cfg = KVConfig(bits=8, residual=2)
    cache = SinkWindowCache(cfg, window=9, sinks=0)
    run_against_reference(cache, cfg, [5, 1, 1, 12, 1, 1, 1, 1, 1, 1, 4], 4, 4, 64, sink_window(0, 9), cache.residual)


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


def test_quantized_kv_start_converts_mid_stream():
    cfg = KVConfig(bits=4, quantized_kv_start=12, residual=4)
    cache = QuantizedCache(cfg)
    mx.random.seed(0)
    cache.update_and_fetch(mx.random.normal((1, 2, 8, 64)), mx.random.normal((1, 2, 8, 64)))
    assert not cache.key_store.lossy  # still full precision
    for _ in range(4):
        cache.update_and_fetch(mx.random.normal((1, 2, 1, 64)), mx.random.normal((1, 2, 1, 64)))
    assert cache.offset == 12 and not cache.key_store.lossy
    stored = cache.flushed - cfg.sinks  # the first tokens wait in the 16-bit sink tier
    dense = cache.key_store.decode(cache.key_store.read(stored))
    cache.update_and_fetch(mx.random.normal((1, 2, 1, 64)), mx.random.normal((1, 2, 1, 64)))
    assert cache.key_store.lossy
    converted = cache.key_store.decode(cache.key_store.read(stored))
    assert mx.allclose(converted, fake_quant(dense, 4, 64), atol=1e-6)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (2, 64), (8, 128), (3, 64)])
@pytest.mark.parametrize("residual", [0, 5])
def test_per_channel_keys_match_reference_at_group_boundaries(bits, group_size, residual):
    cfg = KVConfig(bits=bits, group_size=group_size, per_channel_keys=True, residual=residual)
    cache = QuantizedCache(cfg)
    head_dim = 128 if group_size == 128 else 64
    # chunks that end before, exactly at, and across group boundaries
    chunks = [group_size - 3, 1, 1, 1, 1, group_size + 7, 1, 2 * group_size, 1, 1]
    run_against_reference(cache, cfg, chunks, 6, 2, head_dim, causal, cache.residual, exact_sinks(cfg))
    assert (cache.flushed - exact_sinks(cfg)) % group_size == 0  # groups count from the first non-sink
    assert cache.offset - cache.flushed < residual + group_size  # the 16-bit tier stays bounded


def test_per_channel_trim_pulls_the_cut_group_back_to_the_exact_tier():
    cfg = KVConfig(bits=4, group_size=32, per_channel_keys=True, residual=0, sinks=0)  # groups from token 0
    cache = QuantizedCache(cfg)
    x = mx.random.normal((1, 2, 70, 64))
    cache.update_and_fetch(x, x)
    assert cache.flushed == 64
    cache.trim(10)  # 60 tokens: group [32, 64) is cut
    assert (cache.offset, cache.flushed, cache.recent_keys.shape[2]) == (60, 32, 28)
    expected = fake_quant_channels(x[..., 32:64, :], 4, 32)[..., :28, :]
    assert mx.allclose(cache.recent_keys.astype(mx.float32), expected, atol=1e-2)
    cache.update_and_fetch(x[..., :40, :], x[..., :40, :])  # flushing resumes on a boundary
    assert cache.flushed == 96


def test_per_channel_keys_convert_at_quantized_kv_start():
    cfg = KVConfig(bits=4, group_size=32, per_channel_keys=True, quantized_kv_start=40, residual=4, sinks=0)
    cache = QuantizedCache(cfg)
    x = mx.random.normal((1, 2, 45, 64))
    cache.update_and_fetch(x[..., :41, :], x[..., :41, :])
    assert not cache.key_store.lossy and cache.flushed == 37
    cache.update_and_fetch(x[..., 41:, :], x[..., 41:, :])
    assert cache.key_store.lossy and cache.flushed == 32 and cache.offset == 45


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
    cache = QuantizedCache(cfg)
    run_against_reference(cache, cfg, [40, 1, 1, 1, 33, 1, 1], 6, 2, 64, causal, cache.residual, exact_sinks(cfg))


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

"""Blockwise attention (online softmax over key blocks) against an independent reference.

The reference dequantizes each segment of a cache's view itself (``mx.dequantize`` on the
packed parts, per-channel keys transposed back), builds the whole mask from the segments'
masks, repeats KV heads for GQA and runs plain float32 softmax attention over everything at
once, with gpt-oss sink logits as an extra column and the Hadamard rotation applied to
queries and undone on the output. Views come from real caches (every store x policy), fed
in chunks around the block boundaries."""

from __future__ import annotations

import gc
import itertools

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

import mlxkv
from mlxkv.attention import attend, blocks
from mlxkv.attention.online import online_attention
from mlxkv.attention.view import KVView, Segment
from mlxkv.caches import HeavyHitterCache, QuantizedCache, SinkWindowCache
from mlxkv.caches.storage import ChannelQuantizedStore, DenseStore
from mlxkv.config import KVConfig
from mlxkv.loading.tiny import tiny_model

N_Q, N_KV, HEAD_DIM = 6, 2, 64
SCALE = HEAD_DIM**-0.5
CHUNKS = (70, 1, 63, 64, 65, 1, 130, 2)  # crosses block and group boundaries, evicts at max_kv 192


def _dequantized(store, parts) -> mx.array:
    """The tokens a store's packed parts hold, [B, H, T, D] float32, without the store's code."""
    if isinstance(store, DenseStore):
        return parts[0].astype(mx.float32)
    fmt = {"group_size": store.group_size, "bits": store.bits, "mode": store.mode}
    if store.mode == "affine":
        w, scales, biases = parts
        x = mx.dequantize(w, scales.astype(mx.float32), biases.astype(mx.float32), **fmt)
    else:
        x = mx.dequantize(*parts, **fmt).astype(mx.float32)
    return x.swapaxes(-1, -2) if isinstance(store, ChannelQuantizedStore) else x


def _visible(seg: Segment, n_queries: int) -> mx.array:
    """[L, T] bool: which of the segment's keys each query sees."""
    T = seg.length
    if seg.mask is None:
        return mx.ones((n_queries, T), dtype=mx.bool_)
    if isinstance(seg.mask, str):
        return mx.arange(T)[None, :] <= mx.arange(T - n_queries, T)[:, None]
    return mx.broadcast_to(seg.mask, (n_queries, T))


def reference(queries: mx.array, view: KVView, sink_logits: mx.array | None = None):
    """(output [B, Hq, L, D], per-segment weights summed over batch, heads and queries)."""
    q = queries.astype(mx.float32)
    if view.rotated:
        q = mx.hadamard_transform(q)
    L = q.shape[2]
    keys = mx.concatenate([_dequantized(s.key_store, s.keys) for s in view.segments], axis=2)
    values = mx.concatenate([_dequantized(s.value_store, s.values) for s in view.segments], axis=2)
    visible = mx.concatenate([_visible(s, L) for s in view.segments], axis=1)
    n_rep = q.shape[1] // keys.shape[1]
    keys, values = mx.repeat(keys, n_rep, axis=1), mx.repeat(values, n_rep, axis=1)
    scores = mx.where(visible, (q * SCALE) @ keys.swapaxes(-1, -2), -mx.inf)
    if sink_logits is not None:
        column = mx.broadcast_to(sink_logits.reshape(1, -1, 1, 1), scores.shape[:-1] + (1,))
        weights = mx.softmax(mx.concatenate([column, scores], axis=-1), axis=-1)[..., 1:]
    else:
        weights = mx.softmax(scores, axis=-1)
    out = weights @ values
    if view.rotated:
        out = mx.hadamard_transform(out)
    totals = weights.sum(axis=(1, 2))  # per batch row, over heads and queries
    bounds = list(itertools.accumulate([0] + [s.length for s in view.segments]))
    return out, [totals[:, a:b] for a, b in zip(bounds, bounds[1:])]


STORES = ["fp16", "q4", "q4-rot", "q4-kivi", "q4-kivi-rot", "mxfp4", "nvfp4", "mxfp8"]
POLICIES = {"keep-all": {}, "window": {"max_kv": 192}, "h2o": {"max_kv": 192, "evict": "h2o"}}


def make_cache(store: str, policy: str):
    config = KVConfig.from_name(store, **POLICIES[policy])
    if policy == "h2o":
        return HeavyHitterCache(config)
    return SinkWindowCache(config) if policy == "window" else QuantizedCache(config)


def _f16_exact(shape, key):
    return mx.random.normal(shape, key=key).astype(mx.float16).astype(mx.float32)


@pytest.mark.parametrize("store,policy,block", [
    (store, policy, block) for store, policy in itertools.product(STORES, POLICIES) for block in (16, 64, 100)
    if not ("kivi" in store and policy == "h2o")  # H2O places single tokens, per-channel keys whole groups
])
def test_blockwise_equals_reference(store, policy, block):
    """Every step of a cache fed in chunks: blockwise output (and H2O's observed weights)
    equal the one-shot reference; odd steps add gpt-oss sink logits."""
    cache = make_cache(store, policy)
    key = mx.random.key(7)
    for step, n in enumerate(CHUNKS):
        key, k1, k2, k3, k4 = mx.random.split(key, 5)
        k = _f16_exact((1, N_KV, n, HEAD_DIM), k1)
        v = _f16_exact((1, N_KV, n, HEAD_DIM), k2)
        queries = mx.random.normal((1, N_Q, n, HEAD_DIM), key=k3)
        sink_logits = mx.random.normal((N_Q,), key=k4) if step % 2 else None
        view, _ = cache.update_and_fetch(k, v)
        expected, expected_weights = reference(queries, view, sink_logits)

        observed = []
        if view.observer is not None:
            forward = view.observer
            view.observer = lambda weights: (observed.append(weights), forward(weights))
        q = mx.hadamard_transform(queries) if view.rotated else queries
        q = (q * SCALE).reshape(1, N_KV, N_Q // N_KV * n, HEAD_DIM)
        out = online_attention(q, view.segments, N_Q // N_KV, sink_logits, view.observer, block=block)
        out = out.reshape(1, N_Q, n, HEAD_DIM)
        if view.rotated:
            out = mx.hadamard_transform(out)
        mx.eval(out, cache.state)
        err = mx.abs(out - expected).max().item()
        assert err < 2e-4, f"step {step} (chunk {n}): max error {err}"
        if policy == "h2o":
            assert len(observed) == 1 and len(observed[0]) == len(expected_weights)
            for got, want in zip(observed[0], expected_weights):
                assert got.shape == want.shape and mx.allclose(got, want, atol=1e-4).item()
        else:
            assert observed == []


def test_blocks_of_per_channel_keys_are_whole_groups(monkeypatch):
    """A per-channel store's blocks start on its 64-token groups whatever the block asked."""
    cache = make_cache("q4-kivi", "keep-all")
    for n in (300, 5):
        view, _ = cache.update_and_fetch(mx.ones((1, N_KV, n, HEAD_DIM)), mx.ones((1, N_KV, n, HEAD_DIM)))
    seen = []
    history = view.segments[0]
    matmul = type(history.key_store).matmul_block
    monkeypatch.setattr(type(history.key_store), "matmul_block",
                        lambda self, x, parts, transpose: (seen.append(parts[1].shape[-1]), matmul(self, x, parts, transpose))[1])
    q = mx.ones((1, N_KV, 3 * 5, HEAD_DIM))
    mx.eval(online_attention(q, view.segments, 3, block=100))
    assert history.length == 256 and seen == [1, 1, 1, 1]  # 64 tokens = one group of scales each


@pytest.mark.parametrize("policy", list(POLICIES))
def test_attend_goes_blockwise_past_the_score_budget(policy, monkeypatch):
    """Through ``attend`` with a tiny budget, blocks of a few keys; the same answer."""
    monkeypatch.setattr(blocks, "SCORE_BLOCK_BYTES", 4 * N_Q * 64 * 24)  # 24 keys for 64 queries
    cache = make_cache("q4-rot" if policy == "h2o" else "q4-kivi-rot", policy)
    key = mx.random.key(3)
    for n in (64, 100, 64):
        key, k1, k2, k3 = mx.random.split(key, 4)
        k, v = _f16_exact((1, N_KV, n, HEAD_DIM), k1), _f16_exact((1, N_KV, n, HEAD_DIM), k2)
        queries = mx.random.normal((1, N_Q, n, HEAD_DIM), key=k3)
        view, _ = cache.update_and_fetch(k, v)
        expected, _ = reference(queries, view)
        assert mx.abs(attend(queries, view, SCALE) - expected).max().item() < 2e-4


def _attention_peak(context: int, queries: int) -> int:
    """Peak bytes above what was held before, attending ``queries`` over a ``context``-token
    keep-all 4-bit cache (history packed, the chunk exact)."""
    cache = QuantizedCache(KVConfig.from_name("q4-kivi"))
    key = mx.random.key(0)
    for start in range(0, context, 512):
        n = min(512, context - start)
        key, k1, k2 = mx.random.split(key, 3)
        view, _ = cache.update_and_fetch(mx.random.normal((1, N_KV, n, HEAD_DIM), key=k1),
                                         mx.random.normal((1, N_KV, n, HEAD_DIM), key=k2))
        mx.eval(cache.state)
    q = mx.random.normal((1, N_Q, queries, HEAD_DIM), key=key)
    mx.eval(q)
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(attend(q, view, SCALE))
    return mx.get_peak_memory() - before


def test_attention_transient_does_not_grow_with_the_context(monkeypatch):
    """With blocks, a chunk's transient is bounded by the block, not by chunk x context: at
    4x the context it stays put (one-shot scores would grow 4x; how far MLX's encoder runs
    ahead of the kernels moves the peak by up to ~10% from run to run), and far below the
    one-shot scores."""
    monkeypatch.setattr(blocks, "SCORE_BLOCK_BYTES", 2**19)
    queries = 256
    short, long = _attention_peak(1024, queries), _attention_peak(4096, queries)
    one_shot_scores = N_Q * queries * 4096 * 4
    assert long < 1.3 * short, (short, long)
    assert long < one_shot_scores / 3, (long, one_shot_scores)


def test_gpt_oss_blockwise_matches_mlx_lm(monkeypatch):
    """A tiny gpt-oss (learned sink logits, sliding and full layers) with our full-precision
    caches, attention forced blockwise, gives mlx-lm's own caches' logits."""
    monkeypatch.setattr(blocks, "SCORE_BLOCK_BYTES", 4 * 4 * 16 * 8)  # 8 keys for 16 queries x 4 heads
    model = tiny_model("gpt_oss", head_dim=64)
    toks = mx.random.randint(0, 256, (60,), key=mx.random.key(1))
    ref_cache, our_cache = make_prompt_cache(model), mlxkv.make_kv_cache(model, "fp16")
    for start, size in ((0, 16), (16, 16), (32, 27), (59, 1)):
        piece = toks[None, start : start + size]
        ref, ours = model(piece, cache=ref_cache), model(piece, cache=our_cache)
        assert mx.abs(ours - ref).max().item() < 1e-4

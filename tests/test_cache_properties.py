"""Property tests: random programs of prefill chunks, decode steps, trims and save/load round
trips on every store x policy, each step's attention compared with the documented model in
kv_reference.py (which is not built from the caches' code).

Only the public behaviour is driven: KVConfig, the three cache classes, update_and_fetch,
mlxkv.attention.attend, offset, size(), trim(), is_trimmable(), and mlx-lm's
save_prompt_cache with mlxkv.load_prompt_cache. Keys and values lie on a grid of eighths in
[-2, 2], so they, and their Hadamard rotations, are exact in float16: the reference then
needs no rounding rule for the 16-bit tiers. The examples are derandomized (see conftest.py):
every run, and scripts/mutation_check.py, checks the same programs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import pytest
from hypothesis import event, example, given, note, settings
from hypothesis import strategies as st

import mlxkv
from conftest import KVData, check_counts, check_step, grid, round_trip
from kv_reference import Layout, NearTie, ReferenceCache
from mlxkv.caches import HeavyHitterCache, QuantizedCache, SinkWindowCache

HEAD_DIM = 64
MAX_TOKENS = 560
SCALE_EXAMPLES = float(os.environ.get("MLXKV_PROPERTY_SCALE", "1"))
"""Raise (e.g. 20) for a long exploratory run; the suite's default keeps the file near 40 s."""

STORES = {
    "dense": {},
    "q2": {"bits": 2},
    "q3-g32": {"bits": 3, "group_size": 32},
    "q4": {"bits": 4},
    "q8": {"bits": 8},
    "k8v4": {"k_bits": 8, "v_bits": 4},
    "k4v2-g32": {"k_bits": 4, "v_bits": 2, "group_size": 32},
    "k-full-v3": {"k_bits": 16, "v_bits": 3},
    "k3-v-full": {"k_bits": 3, "v_bits": 16},
    "q4-rot": {"bits": 4, "rotate": True},
    "k4v3-rot": {"k_bits": 4, "v_bits": 3, "rotate": True},
    "mxfp4": {"mode": "mxfp4"},
    "mxfp4-rot": {"mode": "mxfp4", "rotate": True},
    "nvfp4": {"mode": "nvfp4"},
    "mxfp8": {"mode": "mxfp8"},
}
PER_CHANNEL = {
    "q4-kivi": {"bits": 4, "per_channel_keys": True},
    "k2v4-kivi-g32": {"k_bits": 2, "v_bits": 4, "per_channel_keys": True, "group_size": 32},
    "k3v2-kivi-rot": {"k_bits": 3, "v_bits": 2, "per_channel_keys": True, "rotate": True},
    "mxfp4-kivi": {"mode": "mxfp4", "per_channel_keys": True},
}
ALL_STORES = {**STORES, **PER_CHANNEL}  # H2O places single tokens: no per-channel keys


def examples(n: int) -> int:
    return max(1, round(n * SCALE_EXAMPLES))


# -- programs --------------------------------------------------------------------------
@dataclass(frozen=True)
class Op:
    kind: str  # "chunk" (n tokens at once), "decode" (n steps of one token), "trim" (n), "save"
    n: int = 0


@st.composite
def programs(draw, longest_chunk: int = 150, decode_budget: int = 120) -> list[Op]:
    """Chunks, decode runs, trims (sometimes of everything) and save/load round trips."""
    ops, tokens, decoded = [], 0, 0
    for _ in range(draw(st.integers(2, 10))):
        kind = draw(st.sampled_from(["chunk", "chunk", "decode", "decode", "trim", "save"]))
        if kind == "chunk" and tokens < MAX_TOKENS - 2:
            n = draw(st.integers(2, min(longest_chunk, MAX_TOKENS - tokens)))
        elif kind == "decode" and decoded < decode_budget and tokens < MAX_TOKENS:
            n = draw(st.integers(1, min(40, decode_budget - decoded, MAX_TOKENS - tokens)))
            decoded += n
        elif kind == "trim":
            n = draw(st.one_of(st.integers(1, 40), st.just(MAX_TOKENS)))
        else:
            kind, n = "save", 0
        if kind in ("chunk", "decode"):
            tokens += n
        ops.append(Op(kind, n))
    return ops


def run_program(cache, ref: ReferenceCache, data: KVData, program: list[Op]) -> None:
    note(f"{ref.cfg.describe()}; {ref.layout}; {program}")
    try:
        for i, op in enumerate(program):
            where = f"op {i} {op} at offset {cache.offset}"
            if op.kind == "chunk":
                check_step(cache, ref, data.next(op.n), where)
            elif op.kind == "decode":
                for j in range(op.n):
                    check_step(cache, ref, data.next(1), f"{where}, step {j}")
            elif op.kind == "trim" and cache.is_trimmable():  # as mlx-lm asks before it trims
                event("trimmed" + (" below the sinks" if cache.offset - op.n < ref.layout.sinks else ""))
                assert cache.trim(op.n) == ref.trim(op.n), where
                check_counts(cache, ref, where)
            elif op.kind == "save":
                cache = round_trip(cache)
                check_counts(cache, ref, where)
        check_step(cache, ref, data.next(1), "after the program")  # what the last op left must attend right
    except NearTie as tie:
        event("stopped at an H2O near tie")
        note(str(tie))


def kv_config(store: dict, **fields) -> mlxkv.KVConfig:
    return mlxkv.KVConfig(**store, **fields)


HEADS = st.sampled_from([(2, 1), (4, 2), (2, 2)])
SEEDS = st.integers(0, 2**16)


# -- keep-all --------------------------------------------------------------------------
@settings(max_examples=examples(60))
@given(
    store=st.sampled_from(sorted(ALL_STORES)), sinks=st.sampled_from([0, 1, 4, 5]),
    residual=st.sampled_from([0, 1, 3, 16, 40]), program=programs(), seed=SEEDS, heads=HEADS,
    batch=st.sampled_from([1, 1, 2]),
)
@example(store="q4", sinks=4, residual=0, program=[Op("chunk", 10), Op("trim", 8), Op("chunk", 6)],
         seed=0, heads=(2, 1), batch=1)  # trimming into the exact sinks
@example(store="q4-kivi", sinks=4, residual=3, program=[Op("chunk", 150), Op("trim", 20), Op("save"), Op("decode", 30)],
         seed=1, heads=(4, 2), batch=1)  # a per-channel group cut by a trim, then refilled
def test_keep_all_caches_attend_like_the_reference(store, sinks, residual, program, seed, heads, batch):
    cfg = kv_config(ALL_STORES[store], sinks=sinks, residual=residual)
    ref = ReferenceCache(cfg, Layout("all", sinks, residual))
    run_program(QuantizedCache(cfg), ref, KVData(seed, batch, heads), program)


# -- sink window -----------------------------------------------------------------------
@st.composite
def windows(draw):
    """(store, sinks, window, residual, explicit): explicit windows are built as a model's
    own sliding window is (SinkWindowCache(config, window=, sinks=)), others from max_kv."""
    store = draw(st.sampled_from(sorted(ALL_STORES)))
    sinks = draw(st.sampled_from([0, 1, 4]))
    smallest = 66 if store in PER_CHANNEL else 3  # a per-channel ring holds at least one group
    window = draw(st.integers(smallest, 200 if store in PER_CHANNEL else 120))
    residual = draw(st.integers(0, min(window // 2, 40)))  # the docs bound it by half the window
    return store, sinks, window, residual, draw(st.booleans())


@settings(max_examples=examples(80))
@given(window=windows(), program=programs(), seed=SEEDS, heads=HEADS, batch=st.sampled_from([1, 1, 2]))
@example(window=("q4", 4, 12, 3, False), program=[Op("chunk", 10), Op("decode", 8), Op("trim", 5), Op("decode", 2)],
         seed=2, heads=(2, 1), batch=1)  # trimmable right up to max_kv tokens, not one past
@example(window=("q8", 4, 12, 3, False), program=[Op("chunk", 15), Op("trim", 1), Op("trim", 6), Op("chunk", 5)],
         seed=3, heads=(2, 1), batch=1)  # full at max_kv: still trimmable
@example(window=("q4", 2, 9, 2, True), program=[Op("chunk", 30), Op("chunk", 20), Op("decode", 12), Op("chunk", 7)],
         seed=4, heads=(4, 2), batch=1)  # chunks longer than the window, after it filled
def test_sink_windows_attend_like_the_reference(window, program, seed, heads, batch):
    store, sinks, size, residual, explicit = window
    if explicit:
        cfg = kv_config(ALL_STORES[store], residual=residual)
        cache = SinkWindowCache(cfg, window=size, sinks=sinks)
    else:
        cfg = kv_config(ALL_STORES[store], sinks=sinks, residual=residual, max_kv=sinks + size)
        cache = SinkWindowCache(cfg)
    ref = ReferenceCache(cfg, Layout("window", sinks, residual, window=size))
    run_program(cache, ref, KVData(seed, batch, heads), program)


# -- heavy hitters ---------------------------------------------------------------------
@st.composite
def budgets(draw):
    """(sinks, residual, max_kv): room for at least one heavy hitter."""
    sinks = draw(st.sampled_from([0, 1, 4]))
    residual = draw(st.integers(1, 20))
    return sinks, residual, sinks + residual + draw(st.integers(1, 30))


@settings(max_examples=examples(80))
@given(store=st.sampled_from(sorted(STORES)), budget=budgets(), program=programs(longest_chunk=60),
       seed=SEEDS, heads=HEADS, batch=st.sampled_from([1, 1, 2]))
@example(store="q8", budget=(1, 2, 8), program=[Op("decode", 8), Op("trim", 2), Op("decode", 40)],
         seed=5, heads=(2, 1), batch=1)  # trimmable exactly until the first eviction
@example(store="dense", budget=(0, 2, 6), program=[Op("decode", 60)], seed=8, heads=(2, 1), batch=1)
@example(store="dense", budget=(0, 2, 6), program=[Op("chunk", 12), Op("chunk", 12), Op("chunk", 12),
                                                    Op("chunk", 12), Op("decode", 20)],
         seed=7, heads=(2, 1), batch=1)  # several tokens compete at once
def test_heavy_hitters_attend_like_the_reference(store, budget, program, seed, heads, batch):
    sinks, residual, max_kv = budget
    cfg = kv_config(STORES[store], sinks=sinks, residual=residual, max_kv=max_kv, evict="h2o")
    ref = ReferenceCache(cfg, Layout("h2o", sinks, residual, max_kv=max_kv))
    run_program(HeavyHitterCache(cfg), ref, KVData(seed, batch, heads, h2o=True), program)


@pytest.mark.parametrize("chunked", [False, True], ids=["one-at-a-time", "several-at-once"])
@pytest.mark.parametrize("store", ["dense", "q4"])
def test_h2o_ties_evict_the_oldest(store, chunked):
    """Ties made on purpose. Token 0 (a sink) is live, so the dead tokens 1-5 score exactly 0:
    1-4 fill the four heavy slots, 5 ties with them and is dropped. Live tokens 6, 7, 8 then
    each evict the oldest dead one (decode steps place one token at a time; with ``chunked``
    they arrive together and are placed together). A query along -d at last attends almost
    only to the dead tokens still kept: 4 and the newest, 9."""
    sinks, residual, max_kv = 1, 1, 6
    cfg = kv_config(STORES[store], sinks=sinks, residual=residual, max_kv=max_kv, evict="h2o")
    cache, ref = HeavyHitterCache(cfg), ReferenceCache(cfg, Layout("h2o", sinks, residual, max_kv=max_kv))
    d = KVData(9, h2o=True).direction
    live = [grid((1, 1, 1, HEAD_DIM), mx.random.key(i), std=0.25) for i in range(4)]
    dead = mx.broadcast_to(-2 * d, (1, 1, 1, HEAD_DIM))
    keys = [live[0]] + [dead] * 5 + live[1:] + [dead]
    chunks = [[i] for i in range(6)] + ([[6, 7, 8]] if chunked else [[6], [7], [8]]) + [[9]]
    for chunk in chunks:
        k = mx.concatenate([keys[i] for i in chunk], axis=2)
        v = mx.concatenate([grid((1, 1, 1, HEAD_DIM), mx.random.key(100 + i)) for i in chunk], axis=2)
        q = mx.broadcast_to((-10 if chunk == [9] else 10) * d, (1, 2, len(chunk), HEAD_DIM))
        check_step(cache, ref, (k, v, q), f"tokens {chunk}")
    assert sorted(ref.heavy) == [4, 6, 7, 8], "the reference itself must keep the newest dead token"

"""Heavy-hitter eviction (H2O, ``evict="h2o"``) against an independent reference.

The reference keeps explicit per-token lists: the sinks, the newest ``residual`` tokens and,
up to the budget, the older tokens with the highest attention accumulated by fp32 reference
attention over exactly the tokens it keeps (fake-quantized when packed). The cache must keep
the same positions at every step and attend like the reference over them."""

from __future__ import annotations

import argparse

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import save_prompt_cache

import mlxkv
from mlxkv.attention import attend
from mlxkv.caches import HeavyHitterCache
from mlxkv.config import KVConfig, parse_spec
from mlxkv.loading.tiny import tiny_model
from test_cache_attention import causal, f16_exact, fake_quant, reference_attention
from test_mlx_lm_integration import run_logits, tokens


class ReferenceH2O:
    """Which positions an H2O cache keeps, decided on per-token lists.

    Before a chunk attends, tokens older than the newest ``residual`` that earlier steps
    scored leave the recent window: the first ``sinks`` stay, the others take a free slot or
    replace the lowest-scored heavy hitter (the oldest among equals) if that scored less."""

    def __init__(self, sinks: int, residual: int, max_kv: int) -> None:
        self.sinks, self.residual = sinks, residual
        self.capacity = max_kv - sinks - residual
        self.heavy: list[int] = []
        self.score: dict[int, float] = {}
        self.flushed = 0

    def admit(self, first: int, n: int) -> list[int]:
        """The positions a chunk ``first .. first+n`` attends to, in ascending order."""
        end = first + n
        target = min(max(self.flushed, end - self.residual), first)
        for pos in range(max(self.flushed, self.sinks), target):
            if len(self.heavy) < self.capacity:
                self.heavy.append(pos)
                continue
            low = min(self.heavy, key=lambda h: (self.score[h], h))
            others = [self.score[h] for h in self.heavy if h != low]
            assert_clear(self.score[low], self.score[pos], *others)
            if self.score[low] < self.score[pos]:
                self.heavy[self.heavy.index(low)] = pos
        self.flushed = target
        return list(range(min(target, self.sinks))) + sorted(self.heavy) + list(range(target, end))

    def observe(self, kept: list[int], weights: mx.array) -> None:
        for pos, w in zip(kept, weights.tolist()):
            self.score[pos] = self.score.get(pos, 0.0) + w


def assert_clear(low: float, incoming: float, *others: float) -> None:
    """The reference scores in float64, the cache in float32 on packed data: a near tie would
    be decided by rounding. Fail loudly rather than compare noise (then change the seed)."""
    for other in (incoming, *others):
        assert abs(other - low) > 1e-4 * max(abs(other), abs(low)), "near tie in the reference; change the seed"


def cache_positions(cache) -> list[int]:
    """Positions the cache holds: sinks, heavy hitters (slots), recent tier."""
    stored = cache.policy.slot_positions(cache.flushed).tolist()
    sinks = list(range(min(cache.flushed, cache.policy.sinks)))
    return sinks + sorted(stored) + list(range(cache.flushed, cache.offset))


def visible_to_last_query(view) -> int:
    """Keys the newest query of a step attends to, counted from the view's masks."""
    count = 0
    for seg in view.segments:
        count += seg.length if not isinstance(seg.mask, mx.array) else int(seg.mask[-1].sum().item())
    return count


def run_h2o_against_reference(cfg, chunks, n_q_heads, n_kv_heads, head_dim=64, seed=0):
    """Feed random chunks; at every step compare kept positions and attention with the
    reference. Tokens of earlier steps come from the 16-bit tier (rounded when the inputs,
    rotated or boosted, are not float16-exact), packed ones quantized from there. A fixed direction in every query and a boost along it in some keys make a few
    later tokens heavy hitters, so eviction is not just 'oldest first'."""
    cache = HeavyHitterCache(cfg)
    ref = ReferenceH2O(cfg.sinks, cfg.residual, cfg.max_kv)
    key = mx.random.key(seed)
    k1, k2, key = mx.random.split(key, 3)
    direction = f16_exact((head_dim,), k1)
    all_k, all_v, offset = [], [], 0
    scale = head_dim**-0.5

    def tier(x):
        return x.astype(mx.float16).astype(mx.float32) if cfg.quantized else x
    for step, n in enumerate(chunks):
        k1, k2, k3, k4, key = mx.random.split(key, 5)
        boost = (mx.random.uniform(shape=(1, 1, n, 1), key=k4) < 0.2) * 2.0
        k = f16_exact((1, n_kv_heads, n, head_dim), k1) + boost * direction
        v = f16_exact((1, n_kv_heads, n, head_dim), k2)
        q = mx.random.normal((1, n_q_heads, n, head_dim), key=k3) + direction
        view, _ = cache.update_and_fetch(k, v)
        out = attend(q, view, scale=scale)
        if cfg.rotate:  # the reference works in the rotated space the cache stores
            k, v, q = mx.hadamard_transform(k), mx.hadamard_transform(v), mx.hadamard_transform(q)
        chunk_k = [k[..., i : i + 1, :] for i in range(n)]
        chunk_v = [v[..., i : i + 1, :] for i in range(n)]

        kept = ref.admit(offset, n)
        assert cache_positions(cache) == kept, f"step {step}: kept positions differ"
        heavy = set(ref.heavy)

        def version(tokens, pos, bits):  # packed heavy hitters, exact sinks and recent tokens
            return fake_quant(tokens[pos], bits, cfg.group_size, cfg.mode) if pos in heavy else tokens[pos]

        keys = mx.concatenate([version(all_k + chunk_k, p, cfg.key_bits) for p in kept], axis=2)
        values = mx.concatenate([version(all_v + chunk_v, p, cfg.value_bits) for p in kept], axis=2)
        q_pos, k_pos = mx.arange(offset, offset + n), mx.array(kept)
        expected = reference_attention(q, keys, values, q_pos, k_pos, causal, scale)
        # the same attention with identity values gives its weights
        eye = mx.broadcast_to(mx.eye(len(kept)), (1, n_kv_heads, len(kept), len(kept)))
        weights = reference_attention(q, keys, eye, q_pos, k_pos, causal, scale)
        ref.observe(kept, weights.sum(axis=(0, 1, 2)))
        if cfg.rotate:
            expected = mx.hadamard_transform(expected)
        err = mx.abs(out - expected).max().item()
        assert err < 3e-4, f"step {step} (chunk {n}, offset {offset}): max error {err}"
        # after its step a token waits in the recent tier: 16-bit beside a packed store
        all_k += [tier(x) for x in chunk_k]
        all_v += [tier(x) for x in chunk_v]
        offset += n
    return cache, ref


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
def test_h2o_keeps_what_the_reference_keeps_and_attends_like_it(cfg):
    cache, ref = run_h2o_against_reference(cfg, CHUNKS, 6, 2)
    assert set(ref.heavy) - set(range(4, 14)), "no later token became a heavy hitter: the data tests nothing"


def test_h2o_keeps_exactly_the_budget_and_never_evicts_sinks_or_recent():
    cfg = KVConfig(bits=4, max_kv=40, sinks=4, residual=8, evict="h2o")
    cache = HeavyHitterCache(cfg)
    mx.random.seed(3)
    direction = mx.random.normal((64,))
    view, _ = cache.update_and_fetch(*(mx.random.normal((1, 2, 12, 64)),) * 2)
    for step in range(200):
        k = mx.random.normal((1, 2, 1, 64)) + (step % 7 == 0) * 3 * direction
        view, _ = cache.update_and_fetch(k, mx.random.normal((1, 2, 1, 64)))
        attend(mx.random.normal((1, 4, 1, 64)) + direction, view, scale=0.125)
        held = cache_positions(cache)
        if cache.offset >= cfg.max_kv:
            assert visible_to_last_query(view) == len(held) == cfg.max_kv
        assert held[:4] == [0, 1, 2, 3]  # the sinks
        assert held[-8:] == list(range(cache.offset - 8, cache.offset))  # the recent window
    assert cache.size() == cfg.max_kv
    assert not cache.is_trimmable()


def test_h2o_is_trimmable_until_something_is_evicted():
    cache = HeavyHitterCache(KVConfig(bits=8, max_kv=20, sinks=2, residual=4, evict="h2o"))
    x = mx.random.normal((1, 2, 1, 64))
    for _ in range(12):
        attend(x, cache.update_and_fetch(x, x)[0], scale=0.125)
    assert cache.is_trimmable() and cache.trim(3) == 3
    assert cache_positions(cache) == list(range(9))
    for _ in range(30):
        attend(x, cache.update_and_fetch(x, x)[0], scale=0.125)
    assert not cache.is_trimmable()


# -- through unmodified mlx-lm -------------------------------------------------------------
def test_h2o_in_mlx_lm_generate_has_constant_kv_bytes_and_flat_memory():
    model = tiny_model("llama", head_dim=64)
    config = KVConfig(bits=4, max_kv=64, sinks=4, residual=8, evict="h2o")
    cache = mlxkv.make_kv_cache(model, config)
    assert all(type(c) is HeavyHitterCache for c in cache)
    kv_bytes, active = {}, {}
    for step, _ in zip(range(1, 401), generate_step(tokens(8), model, max_tokens=400, prompt_cache=cache)):
        if step in (100, 400):
            mx.eval([c.state for c in cache])
            kv_bytes[step] = sum(c.nbytes for c in cache)
            active[step] = mx.get_active_memory()
    assert kv_bytes[100] == kv_bytes[400] > 0
    assert all(c.size() == 64 and len(cache_positions(c)) == 64 for c in cache)
    # scores are summed step by step: no graph (and no attention weights) piles up
    assert active[400] - active[100] < 100_000, active


def test_h2o_prompt_cache_round_trip_continues_identically(tmp_path):
    model = tiny_model("llama", head_dim=64)
    toks = tokens(90)
    config = KVConfig(bits=8, max_kv=40, sinks=4, residual=6, evict="h2o")
    cache = mlxkv.make_kv_cache(model, config)
    run_logits(model, cache, toks[:60], chunks=(16, 16, 16) + (1,) * 12)
    assert not cache[0].is_trimmable()  # tokens were evicted: the state matters
    path = tmp_path / "h2o.safetensors"
    save_prompt_cache(str(path), cache)
    restored = mlxkv.load_prompt_cache(path)
    assert [type(c) for c in restored] == [HeavyHitterCache] * len(cache)
    for a, b in zip(cache, restored):
        assert a.meta_state == b.meta_state and cache_positions(a) == cache_positions(b)
    cont_a = run_logits(model, cache, toks[60:], chunks=(1,) * 30)
    cont_b = run_logits(model, restored, toks[60:], chunks=(1,) * 30)
    assert mx.array_equal(cont_a, cont_b)
    assert all(cache_positions(a) == cache_positions(b) for a, b in zip(cache, restored))


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

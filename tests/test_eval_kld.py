"""mlxkv eval kld: the metrics against a numpy reference, the full-precision cache against
mlx-lm's, a deliberately broken cache, and bits per element against counts made from the
storage formats."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import KVCache

from mlxkv.eval import CacheSpec, evaluate_kld
from mlxkv.eval.kld import Tally, log_probs


@pytest.fixture(scope="module")
def tokens():
    return mx.random.randint(0, 256, (80,), key=mx.random.key(3)).tolist()


class NoisyCache(KVCache):
    """mlx-lm's KVCache with Gaussian noise added to every key and value it stores."""

    def __init__(self, scale: float, seed: int = 1) -> None:
        super().__init__()
        self.scale = scale
        self.key = mx.random.key(seed)

    def update_and_fetch(self, keys, values):
        self.key, k1, k2 = mx.random.split(self.key, 3)
        keys = keys + self.scale * mx.random.normal(keys.shape, key=k1)
        values = values + self.scale * mx.random.normal(values.shape, key=k2)
        return super().update_and_fetch(keys, values)


def noisy(scale: float) -> CacheSpec:
    return CacheSpec(f"noise{scale}", lambda m: [NoisyCache(scale) for _ in m.layers])


def by_config(rows):
    return {r["config"]: r for r in rows}


def test_tally_matches_numpy_reference():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(7, 50)).astype(np.float32) * 3
    cfg = ref + rng.normal(size=ref.shape).astype(np.float32)
    targets = rng.integers(0, 50, size=7)

    tally = Tally()
    tally.add(log_probs(mx.array(ref[:4])), log_probs(mx.array(cfg[:4])), mx.array(targets[:4]))
    tally.add(log_probs(mx.array(ref[4:])), log_probs(mx.array(cfg[4:])), mx.array(targets[4:]))
    got = tally.summary()

    def logsoftmax(x):
        x = x.astype(np.float64)
        return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)

    lp, lq = logsoftmax(ref), logsoftmax(cfg)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    rows = np.arange(7)
    assert got["kld"] == pytest.approx(kl.mean(), rel=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(-lq[rows, targets].mean()), rel=1e-5)
    assert got["ppl_ref"] == pytest.approx(math.exp(-lp[rows, targets].mean()), rel=1e-5)
    assert got["top1"] == pytest.approx((lp.argmax(-1) == lq.argmax(-1)).mean())
    assert tally.positions == 7


def test_ours_full_precision_matches_mlx_lm_cache(model, tokens):
    (row,) = evaluate_kld(model, tokens, ["fp16"], chunk=16, reference="mlxlm-fp16")
    assert row["kld"] < 1e-6
    assert row["top1"] == 1.0


def test_broken_cache_scores_worse(model, tokens):
    rows = by_config(evaluate_kld(model, tokens, [noisy(0.5), noisy(2.0), "q8", "q2"], chunk=8))
    assert rows["q8"]["kld"] < rows["q2"]["kld"]
    assert rows["noise0.5"]["kld"] > rows["q8"]["kld"]
    assert rows["noise2.0"]["kld"] > rows["noise0.5"]["kld"]
    assert rows["noise2.0"]["top1"] < 1.0


@pytest.mark.parametrize("n, chunk", [(33, 16), (37, 16), (20, 1)])
def test_every_position_with_a_next_token_is_scored(model, tokens, n, chunk):
    (row,) = evaluate_kld(model, tokens[:n], ["q4"], chunk=chunk)
    assert row["positions"] == n - 1


def test_bits_per_element_counts_filled_bytes(model, tokens):
    n = len(tokens)
    configs = ["fp16", "q4:residual=0:sinks=0", "q4:residual=16", "mlxlm-q4", "k8v4:residual=0:sinks=0"]
    rows = by_config(evaluate_kld(model, tokens, configs, chunk=16))
    assert rows["fp16"]["bits_per_element"] == 32  # float32 on a CPU device, no growth slack
    assert rows["q4:residual=0:sinks=0"]["bits_per_element"] == pytest.approx(4 + 2 * 16 / 64)
    # 16 newest tokens and the 4 sinks in float16, the rest packed at 4.5 bits
    assert rows["q4:residual=16"]["bits_per_element"] == pytest.approx(((n - 20) * 4.5 + 20 * 16) / n)
    assert rows["mlxlm-q4"]["bits_per_element"] == pytest.approx(4 + 2 * 32 / 64)  # scales in float32
    assert rows["k8v4:residual=0:sinks=0"]["bits_per_element"] == pytest.approx((8.5 + 4.5) / 2)


def test_chunk_size_matters_for_our_cache(model, tokens):
    """A chunk attends to itself exactly in our caches: one chunk for the whole text leaves
    nothing quantized to attend to."""
    (whole,) = evaluate_kld(model, tokens, ["q4:residual=0"], chunk=len(tokens))
    (small,) = evaluate_kld(model, tokens, ["q4:residual=0"], chunk=4)
    assert whole["kld"] == pytest.approx(0.0, abs=1e-9)
    assert small["kld"] > 1e-6


def test_pareto_front_keeps_only_unbeaten_configs():
    from mlxkv.eval.plot import pareto_front

    rows = [{"config": c, "bits_per_element": b, "kld": k} for c, b, k in
            [("a", 3.0, 0.1), ("b", 3.9, 0.2), ("c", 4.4, 0.006), ("d", 4.9, 0.009), ("e", 8.8, 3e-5)]]
    assert [r["config"] for r in pareto_front(rows)] == ["a", "c", "e"]  # b and d are beaten by a and c

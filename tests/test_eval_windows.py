"""Streaming KLD over scored windows (mlxkv.eval.windows) against the whole-text evaluation
and against the model run without any cache."""

from __future__ import annotations

import math

import mlx.core as mx
import pytest

from mlxkv.errors import UserError
from mlxkv.eval import evaluate_kld
from mlxkv.eval.kld import log_probs
from mlxkv.eval.windows import evaluate_windows, schedule
from mlxkv.loading.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("gemma3_text", head_dim=64, query_pre_attn_scalar=64)


@pytest.fixture(scope="module")
def tokens():
    return mx.random.randint(0, 256, (97,), key=mx.random.key(5)).tolist()


METRICS = ("kld", "kld_p99", "ppl", "ppl_ref", "top1")


def test_one_window_over_every_position_equals_whole_text_kld(model, tokens):
    """A window over every prediction, fed in the same chunks, is exactly eval kld's run
    (that keeps every position's reference log-probabilities). 97 tokens: both runs feed the
    same 12 chunks of 8 (the last token, fed alone by eval kld, predicts nothing)."""
    configs = ["q4:residual=0:window_bits=same", "q4:residual=0", "q8"]
    whole = evaluate_kld(model, tokens, configs, chunk=8)
    windowed = evaluate_windows(model, tokens, configs, ends=[len(tokens)], window=len(tokens) - 1, chunk=8)
    assert [r["config"] for r in windowed] == [r["config"] for r in whole]
    for w, r in zip(windowed, whole):
        assert w["positions"] == r["positions"] == len(tokens) - 1
        for metric in METRICS:
            assert w[metric] == pytest.approx(r[metric], rel=1e-4, abs=1e-7), (w["config"], metric)
        assert w["bits_per_element"] == pytest.approx(r["bits_per_element"], rel=0.01)  # one token fewer held
    assert whole[1]["kld"] < whole[0]["kld"]  # 8-bit window layers (the default) lose less than 4-bit ones


def test_windows_score_the_last_predictions_before_each_length(model, tokens):
    """The reference's perplexity in each window equals the model's own, run on the whole
    prefix without a cache (an independent path), though the prefix was prefilled in chunks
    of another size; a full-precision config agrees with the reference."""
    ends, window = [40, 90], 12
    rows = evaluate_windows(model, tokens, ["fp16"], ends=ends, window=window, chunk=4, prefill_chunk=7)
    assert [r["context"] for r in rows] == ends
    for row, end in zip(rows, ends):
        lp = log_probs(model(mx.array(tokens[: end - 1])[None])[0])[end - window - 1:]
        targets = mx.array(tokens[end - window: end])
        nll = -mx.take_along_axis(lp, targets[:, None], axis=-1).mean().item()
        assert row["positions"] == window
        assert row["ppl_ref"] == pytest.approx(math.exp(nll), rel=1e-4)
        assert row["kld"] == pytest.approx(0.0, abs=1e-5)
        assert row["top1"] == 1.0


def test_schedule_feeds_every_token_once_and_rejects_overlapping_windows():
    feeds = schedule([100, 40], window=8)
    assert feeds == [(0, 31, None), (31, 39, 0), (39, 91, None), (91, 99, 1)]
    with pytest.raises(UserError):
        schedule([40, 45], window=8)
    with pytest.raises(UserError):
        schedule([8], window=8)

"""What a cache costs in quality: next-token distributions against a full-precision cache.

The text is fed in small chunks, as generation feeds tokens, so every chunk attends to a
history the cache has already stored (and quantized). At each position that has a next
token, in float32 over the whole vocabulary:

- KL divergence KL(P_ref || P_cfg) from the reference cache's distribution (mean);
- perplexity exp(mean negative log-likelihood of the actual next token), both caches;
- top-1 agreement: the share of positions where both caches' argmax tokens agree.

The reference run is computed once; its log-probabilities are kept (tokens x vocab x 4
bytes: 200 MB for 1,024 tokens of a 49k vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.config import KVConfig
from mlxkv.errors import UserError, at_least
from mlxkv.eval.configs import DEFAULT_REFERENCE, CacheSpec, as_spec, parse_specs
from mlxkv.memory.held import bits_per_element
from mlxkv.stepping import forward_chunks

DEFAULT_TOKENS = 1024
DEFAULT_CHUNK = 16
"""Tokens per forward pass. Small, so quantized history shapes attention as in decoding; 16
keeps the run affordable on a CPU. A chunk attends to itself exactly in mlxkv's caches, so
configs without a residual window look better than one token at a time (QUALITY.md)."""

Progress = Callable[[str], None]
"""Called once per processed chunk with the config's label; the CLI advances its bar."""


def log_probs(logits: mx.array) -> mx.array:
    """Log-softmax over the vocabulary, in float32."""
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


class Tally:
    """Running sums of the metrics over positions, fed chunk by chunk. Shared with
    ``scripts/llamacpp_kld.py`` so llama.cpp's rows use the very same definitions."""

    def __init__(self) -> None:
        self.kl: list[mx.array] = []
        self.kl_sum = self.nll = self.nll_ref = self.agree = 0.0
        self.positions = 0

    def add(self, lp_ref: mx.array, lp: mx.array, targets: mx.array) -> None:
        """Log-probs ([n, vocab]) of the reference and of the config at n positions, and the
        n actual next tokens."""
        kl = (mx.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1)
        nll = -mx.take_along_axis(lp, targets[:, None], axis=-1).sum()
        nll_ref = -mx.take_along_axis(lp_ref, targets[:, None], axis=-1).sum()
        agree = (mx.argmax(lp, axis=-1) == mx.argmax(lp_ref, axis=-1)).sum()
        mx.eval(kl, nll, nll_ref, agree)
        self.kl.append(kl)
        self.kl_sum += kl.sum().item()
        self.nll += nll.item()
        self.nll_ref += nll_ref.item()
        self.agree += agree.item()
        self.positions += targets.size

    def summary(self) -> dict[str, float]:
        """``kld`` (mean, nats), ``kld_p99``, ``ppl``, ``ppl_ref``, ``ppl_change``, ``top1``."""
        if not self.positions:
            raise ValueError("no positions scored")
        ppl = math.exp(self.nll / self.positions)
        ppl_ref = math.exp(self.nll_ref / self.positions)
        return {
            "kld": self.kl_sum / self.positions,
            "kld_p99": _quantile(mx.concatenate(self.kl), 0.99),
            "ppl": ppl,
            "ppl_ref": ppl_ref,
            "ppl_change": ppl / ppl_ref - 1.0,
            "top1": self.agree / self.positions,
        }


def _chunks(model: nn.Module, tokens: mx.array, spec: CacheSpec, chunk: int, progress: Progress | None):
    """(log-probs of the positions that have a next token, those next tokens, the cache)
    per chunk."""
    cache = spec.make(model)
    n = tokens.size
    start = 0
    for logits in forward_chunks(model, tokens, cache, chunk):
        end = min(start + logits.shape[0], n - 1)  # the last token predicts nothing we know
        if end > start:
            yield log_probs(logits[: end - start]), tokens[start + 1 : end + 1], cache
        start += logits.shape[0]
        if progress is not None:
            progress(spec.label)


def evaluate_kld(
    model: nn.Module,
    tokens: Sequence[int] | mx.array,
    configs: str | Sequence[str | KVConfig | CacheSpec],
    chunk: int = DEFAULT_CHUNK,
    reference: str | KVConfig | CacheSpec = DEFAULT_REFERENCE,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One row per config: ``config``, ``description``, ``kld`` (mean KL(P_ref || P_cfg),
    nats), ``kld_p99``, ``ppl``, ``ppl_ref``, ``ppl_change`` (relative), ``top1``,
    ``bits_per_element`` (filled cache bytes at the end, see ``bits_per_element``),
    ``tokens``, ``positions``, ``chunk``, ``reference``."""
    specs = parse_specs(configs)
    ref = as_spec(reference)
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    if tokens.size < 2:
        raise UserError("need at least 2 tokens to score a next-token prediction")
    at_least(chunk, 1, "chunk")

    ref_lp = []
    for lp, _, _ in _chunks(model, tokens, ref, chunk, progress):
        mx.eval(lp)
        ref_lp.append(lp)

    rows = []
    for spec in specs:
        tally, cache = Tally(), None
        for (lp, targets, cache), lp_ref in zip(_chunks(model, tokens, spec, chunk, progress), ref_lp):
            tally.add(lp_ref, lp, targets)
        rows.append({
            "config": spec.label,
            "description": spec.description,
            **tally.summary(),
            "bits_per_element": bits_per_element(model, cache),
            "tokens": int(tokens.size),
            "positions": tally.positions,
            "chunk": chunk,
            "reference": ref.label,
        })
    return rows


def _quantile(values: mx.array, q: float) -> float:
    ordered = mx.sort(values)
    return ordered[min(int(q * values.size), values.size - 1)].item()


def chunks_per_run(n_tokens: int, chunk: int) -> int:
    """Forward passes one config takes (for a progress bar's total)."""
    return -(-n_tokens // chunk)

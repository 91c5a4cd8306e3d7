"""A plain model of what one layer's KV cache is documented to do, for property tests.

Written from the documentation (README "KV schemes", the docstrings of KVConfig and of the
cache classes), never from the caches' code: it keeps every position's key and value in
numpy arrays and decides, position by position,

* what a query sees: causal; a window also hides keys ``window`` or more positions back,
  except the first ``sinks``; H2O shows the sinks, its heavy hitters and the recent tier;
* how each key and value reads: exact (what arrived, rounded to 16 bits) or quantized
  (``mx.quantize``/``mx.dequantize`` of exactly that token, or for per-channel keys of its
  group of ``group_size`` consecutive tokens counted from the first token after the sinks).
  Exact are the first ``sinks`` tokens, the newest ``residual`` tokens and, for per-channel
  keys, the incomplete group; a step's chunk sees itself and the tokens flushed by the step
  exactly, only what earlier steps flushed is quantized;
* which tokens H2O keeps: the sinks, the newest ``residual`` (the chunk included), and up to
  ``max_kv - sinks - residual`` older tokens. Before a chunk attends, each token older than the
  newest ``residual`` that earlier steps scored leaves the recent tier: it takes a free slot,
  or evicts the kept token with the lowest accumulated attention (the oldest among equals)
  if that scored strictly less, or is dropped;
* ``quantized_kv_start``: until the cache holds that many tokens nothing is quantized; then
  every token that left the 16-bit tier is quantized in place;
* whether ``trim`` may be used: only while nothing was evicted (a window that never held more
  than ``max_kv`` tokens; H2O before its first eviction or drop).

Attention is float32 with a plain softmax; with rotation the model works in the rotated space
(``mx.hadamard_transform`` of keys, values and queries) and rotates the output back.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from mlxkv.config import KVConfig


class NearTie(Exception):
    """An H2O decision between scores equal to rounding: the cache (float32, on packed data)
    may decide it either way, so a run stops there rather than compare noise. Scores of
    exactly 0 (tokens no query could see past the softmax's underflow) are real ties in any
    arithmetic; equal non-zero scores may differ in the cache, which adds them otherwise."""


def to_f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def quantize_tokens(x: np.ndarray, bits: int | None, cfg: KVConfig) -> np.ndarray:
    """Each token (last axis) quantized on its own, read back as float32. Affine scales and
    biases are 16-bit (QuantizedStore's docstring); microscaling formats fix their own."""
    if bits is None:
        return x
    w, *rest = mx.quantize(mx.array(x), group_size=cfg.precision.group, bits=bits, mode=cfg.mode)
    if cfg.mode == "affine":
        rest = [r.astype(mx.float16).astype(mx.float32) for r in rest]
    return np.array(mx.dequantize(w, *rest, group_size=cfg.precision.group, bits=bits, mode=cfg.mode).astype(mx.float32))


def quantize_channels(block: np.ndarray, bits: int, cfg: KVConfig) -> np.ndarray:
    """A block of whole token groups [B, H, tokens, D], quantized per channel along tokens."""
    return quantize_tokens(block.swapaxes(-1, -2), bits, cfg).swapaxes(-1, -2)


def rotate(x: np.ndarray) -> np.ndarray:
    return np.array(mx.hadamard_transform(mx.array(x)))


def attention(q: np.ndarray, keys: np.ndarray, values: np.ndarray, visible: np.ndarray, scale: float):
    """softmax(q k^T) v in float32, query heads sharing KV heads (GQA); also the weights."""
    n_rep = q.shape[1] // keys.shape[1]
    keys, values = np.repeat(keys, n_rep, axis=1), np.repeat(values, n_rep, axis=1)
    scores = (q * np.float32(scale)) @ keys.swapaxes(-1, -2)
    scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    weights = (weights / weights.sum(axis=-1, keepdims=True)).astype(np.float32)
    return weights @ values, weights


@dataclass(frozen=True)
class Layout:
    """The documented parameters of one cache: ``kind`` is "all", "window" or "h2o"."""

    kind: str
    sinks: int
    residual: int
    window: int | None = None  # tokens besides the sinks a window keeps
    max_kv: int | None = None  # h2o's budget
    quantize_from: int = 0  # KVConfig.quantized_kv_start


class ReferenceCache:
    def __init__(self, cfg: KVConfig, layout: Layout) -> None:
        self.cfg, self.layout = cfg, layout
        self.unit = cfg.precision.group if cfg.per_channel_keys else 1  # tokens flushed together
        self.keys = self.values = None  # [B, H, N, D]: exact (16-bit) value of each position
        self.qkeys = self.qvalues = None  # the quantized reading of positions in `packed`
        self.packed = np.zeros(0, dtype=bool)
        self.quantizing = layout.quantize_from == 0
        self.flushed = 0  # positions < flushed have left the 16-bit recent tier
        self.evicted = False
        self.heavy: list[int] = []  # h2o: kept positions outside the sinks and the recent tier
        self.score = np.zeros(0, dtype=np.float32)  # h2o: attention accumulated per position

    @property
    def offset(self) -> int:
        return self.packed.shape[0]

    def size(self) -> int:
        """Tokens a full cache lets attention see."""
        if self.layout.kind == "window":
            return min(self.offset, self.layout.sinks + self.layout.window)
        if self.layout.kind == "h2o":
            return min(self.offset, self.layout.max_kv)
        return self.offset

    def trimmable(self) -> bool:
        return not self.evicted

    # -- a step ----------------------------------------------------------------------
    def step(self, keys: np.ndarray, values: np.ndarray, queries: np.ndarray, scale: float) -> np.ndarray:
        """Store a chunk and return the attention of its queries (one per token)."""
        rotated = self.cfg.rotate
        if rotated:
            keys, values, queries = rotate(keys), rotate(values), rotate(queries)
        first, n = self.offset, keys.shape[2]
        end = first + n
        if not self.quantizing and first >= self.layout.quantize_from:  # converted in place
            self.quantizing = True
            self._pack(self.layout.sinks, self.flushed)
        self._append(keys, values)
        if self.layout.kind == "h2o":
            self._h2o_flush(first, end)
            kept = list(range(min(self.flushed, self.layout.sinks))) + sorted(self.heavy) + list(range(self.flushed, end))
        else:
            kept = list(range(end))
        pos = np.array(kept)
        q_pos = np.arange(first, end)
        visible = pos[None, :] <= q_pos[:, None]
        if self.layout.kind == "window":
            visible &= (pos[None, :] < self.layout.sinks) | (q_pos[:, None] - pos[None, :] < self.layout.window)
        packed = self.packed[pos][None, None, :, None]
        k = np.where(packed, self.qkeys[:, :, pos], self.keys[:, :, pos])
        v = np.where(packed, self.qvalues[:, :, pos], self.values[:, :, pos])
        out, weights = attention(queries, k, v, visible, scale)
        if self.layout.kind == "h2o":
            self.score[pos] += weights.sum(axis=(0, 1, 2), dtype=np.float32)
        else:
            self._flush_to(max(self.flushed, end - self.layout.residual))
            if self.layout.kind == "window" and end > self.layout.sinks + self.layout.window:
                self.evicted = True
        return rotate(out) if rotated else out

    def _append(self, keys: np.ndarray, values: np.ndarray) -> None:
        n = keys.shape[2]
        if self.keys is None:
            self.keys, self.values = keys[:, :, :0], values[:, :, :0]
            self.qkeys, self.qvalues = self.keys, self.values
        self.keys = np.concatenate([self.keys, keys], axis=2)
        self.values = np.concatenate([self.values, values], axis=2)
        self.qkeys = np.concatenate([self.qkeys, np.zeros_like(keys)], axis=2)
        self.qvalues = np.concatenate([self.qvalues, np.zeros_like(values)], axis=2)
        self.packed = np.concatenate([self.packed, np.zeros(n, dtype=bool)])
        self.score = np.concatenate([self.score, np.zeros(n, dtype=np.float32)])

    def _pack(self, start: int, end: int) -> None:
        """Positions start..end (past the sinks; whole groups for per-channel keys) go packed."""
        if end <= start:
            return
        cfg = self.cfg
        if cfg.per_channel_keys:
            for g in range(start, end, self.unit):
                self.qkeys[:, :, g : g + self.unit] = quantize_channels(self.keys[:, :, g : g + self.unit], cfg.key_bits, cfg)
        else:
            self.qkeys[:, :, start:end] = quantize_tokens(self.keys[:, :, start:end], cfg.key_bits, cfg)
        self.qvalues[:, :, start:end] = quantize_tokens(self.values[:, :, start:end], cfg.value_bits, cfg)
        self.packed[start:end] = True

    def _group_start(self, pos: int) -> int:
        """The start of the token group holding ``pos`` (groups count from the first non-sink)."""
        sinks = self.layout.sinks
        return pos if pos <= sinks else pos - (pos - sinks) % self.unit

    def _flush_to(self, target: int) -> None:
        """Everything before ``target`` leaves the recent tier, in whole groups."""
        target = self._group_start(target)
        if self.quantizing:
            self._pack(max(self.flushed, self.layout.sinks), target)
        self.flushed = max(self.flushed, target)

    def _h2o_flush(self, first: int, end: int) -> None:
        layout = self.layout
        capacity = layout.max_kv - layout.sinks - layout.residual
        target = min(max(self.flushed, end - layout.residual), first)
        for pos in range(max(self.flushed, layout.sinks), target):
            self._pack(pos, pos + 1)
            if len(self.heavy) < capacity:
                self.heavy.append(pos)
                continue
            self.evicted = True
            ranked = sorted(self.heavy, key=lambda h: (self.score[h], h))  # the oldest among equals first
            low = ranked[0]
            self._check_clear(low, pos)  # whether it is evicted
            if self.score[low] < self.score[pos]:
                if len(ranked) > 1:
                    self._check_clear(low, ranked[1])  # whether it is the one evicted
                self.heavy[self.heavy.index(low)] = pos
        self.flushed = max(self.flushed, target)

    def _check_clear(self, low: int, other: int) -> None:
        a, b = float(self.score[other]), float(self.score[low])
        if (a or b) and abs(a - b) <= 1e-4 * max(abs(a), abs(b)):
            raise NearTie(f"scores {a} and {b}")

    # -- trim ------------------------------------------------------------------------
    def trim(self, n: int) -> int:
        """Forget the newest n tokens. A per-channel group cut short returns to the 16-bit
        tier as the store read it (KIVI's incomplete group is 16-bit)."""
        n = min(n, self.offset)
        if n == 0:
            return 0
        keep = self.offset - n
        for name in ("keys", "values", "qkeys", "qvalues"):
            setattr(self, name, getattr(self, name)[:, :, :keep])
        self.packed, self.score = self.packed[:keep], self.score[:keep]
        self.heavy = [h for h in self.heavy if h < keep]
        self.flushed = min(self.flushed, keep)
        cut = self._group_start(self.flushed)
        if cut < self.flushed:
            cut_short = slice(cut, self.flushed)
            packed = self.packed[cut_short][None, None, :, None]
            self.keys[:, :, cut_short] = np.where(packed, to_f16(self.qkeys[:, :, cut_short]), self.keys[:, :, cut_short])
            self.values[:, :, cut_short] = np.where(packed, to_f16(self.qvalues[:, :, cut_short]), self.values[:, :, cut_short])
            self.packed[cut_short] = False
            self.flushed = cut
        return n

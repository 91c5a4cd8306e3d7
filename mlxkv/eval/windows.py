"""KLD at long context: every cache in lockstep, only the positions before each context length scored.

At 32K tokens a full-vocabulary model cannot keep the reference's log-probabilities for every
position (Gemma 3: 262,144 tokens, 1 MB per position in float32, 32 GB at 32K), and the
output projection over every position costs more than the rest of the model. So:

- the reference and every config run in lockstep through one token stream: each chunk's
  log-probabilities are scored against the reference's at once and dropped (nothing of size
  [tokens, vocab] is ever held, and the reference runs once for all configs);
- only the last ``window`` next-token predictions before each length in ``ends`` are scored
  (say 8K and 32K in one pass: the 8K score comes free with the 32K prefill). There the
  history is long, the residual window and the sinks weigh nothing, and the bits per element
  are the real ones. Between windows the caches fill ``prefill_chunk`` tokens at a time
  without computing logits, as a long prompt is prefilled; inside a window ``chunk`` tokens
  at a time, as generation feeds them, so the scored positions attend to the stored
  (quantized) history.

The metrics are ``kld.Tally``'s, per window: the same definitions as ``eval kld``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.config import KVConfig
from mlxkv.errors import UserError, at_least
from mlxkv.eval.configs import DEFAULT_REFERENCE, CacheSpec, as_spec, parse_specs
from mlxkv.eval.kld import DEFAULT_CHUNK, Tally, log_probs
from mlxkv.memory.held import bits_per_element
from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE, fill_cache, forward_chunks

DEFAULT_WINDOW = 512
"""Scored predictions before each length: at 16 per chunk, 32 chunks with logits per config."""

Progress = Callable[[str, int], None]
"""Called with a config's label and the tokens it just processed; the CLI advances its bar."""

Feed = tuple[int, int, int | None]
"""(start, stop, window index or None): tokens[start:stop] go in next; scored when in a window."""


def schedule(ends: Sequence[int], window: int) -> list[Feed]:
    """The feeds that score the predictions of the last ``window`` tokens of each
    ``tokens[:end]``: positions end-window-1 .. end-2 predict tokens end-window .. end-1.
    The last token of the longest end is never fed (it predicts nothing scored)."""
    at_least(window, 1, "window")
    ordered = sorted(set(int(e) for e in ends))
    if not ordered:
        raise UserError("give at least one context length")
    feeds: list[Feed] = []
    position = 0
    for index, end in enumerate(ordered):
        first = end - window - 1
        if first < position:
            raise UserError(f"the scored window of {window} tokens before {end} starts before token {position} "
                            f"(a shorter length's window, or the text's first token); lower --window or space the "
                            f"lengths more than {window + 1} tokens apart")
        if first > position:
            feeds.append((position, first, None))
        feeds.append((first, end - 1, index))
        position = end - 1
    return feeds


def evaluate_windows(
    model: nn.Module,
    tokens: Sequence[int] | mx.array,
    configs: str | Sequence[str | KVConfig | CacheSpec],
    ends: Sequence[int],
    window: int = DEFAULT_WINDOW,
    chunk: int = DEFAULT_CHUNK,
    prefill_chunk: int = DEFAULT_PREFILL_STEP_SIZE,
    reference: str | KVConfig | CacheSpec = DEFAULT_REFERENCE,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One row per config and length in ``ends``: ``config``, ``description``, ``context``
    (the length), ``kld`` (mean KL(P_ref || P_cfg) over the window, nats), ``kld_p99``,
    ``ppl``, ``ppl_ref``, ``ppl_change``, ``top1``, ``bits_per_element`` (the cache's filled
    bytes at that length), ``positions``, ``window``, ``chunk``, ``prefill_chunk``,
    ``reference``. Rows are ordered by length, then config."""
    specs = parse_specs(configs)
    ref = as_spec(reference)
    tokens = mx.array(tokens) if not isinstance(tokens, mx.array) else tokens
    at_least(chunk, 1, "chunk")
    at_least(prefill_chunk, 1, "prefill_chunk")
    feeds = schedule(ends, window)
    ordered = sorted(set(int(e) for e in ends))
    if ordered[-1] > tokens.size:
        raise UserError(f"the text has {tokens.size} tokens, fewer than the length {ordered[-1]}; "
                        "lower the lengths or pass a longer text")

    runs = [ref, *specs]
    caches = [spec.make(model) for spec in runs]
    tallies = [[Tally() for _ in ordered] for _ in specs]
    bits: list[list[float | None]] = [[None] * len(ordered) for _ in specs]
    for start, stop, index in feeds:
        segment = tokens[start:stop]
        if index is None:
            for spec, cache in zip(runs, caches):
                fill_cache(model, segment, cache, prefill_chunk,
                           None if progress is None else _tokens_done(progress, spec.label))
            continue
        offset = start
        streams = [forward_chunks(model, segment, cache, chunk) for cache in caches]
        for ref_logits, *logits in zip(*streams):
            n = ref_logits.shape[0]
            targets = tokens[offset + 1 : offset + n + 1]
            lp_ref = log_probs(ref_logits)
            mx.eval(lp_ref)
            for tally, cfg_logits in zip((t[index] for t in tallies), logits):
                tally.add(lp_ref, log_probs(cfg_logits), targets)
            offset += n
            if progress is not None:
                for spec in runs:
                    progress(spec.label, n)
        for i, cache in enumerate(caches[1:]):
            bits[i][index] = bits_per_element(model, cache)

    rows = []
    for index, end in enumerate(ordered):
        for i, spec in enumerate(specs):
            rows.append({
                "config": spec.label,
                "description": spec.description,
                "context": end,
                **tallies[i][index].summary(),
                "bits_per_element": bits[i][index],
                "positions": tallies[i][index].positions,
                "window": window,
                "chunk": chunk,
                "prefill_chunk": prefill_chunk,
                "reference": ref.label,
            })
    return rows


def _tokens_done(progress: Progress, label: str) -> Callable[[int, int], None]:
    """fill_cache's (done, total) callback as a count of new tokens."""
    last = [0]

    def advance(done: int, _total: int) -> None:
        progress(label, done - last[0])
        last[0] = done

    return advance


def tokens_per_run(ends: Sequence[int]) -> int:
    """Tokens one cache takes in an evaluation (a progress bar's total, per config)."""
    return max(int(e) for e in ends) - 1

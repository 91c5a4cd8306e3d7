"""Session: one conversation with a model, its KV cache, and the generation loop.

The cache outlives a call: a later prompt that starts with the tokens the cache holds
(a chat's next turn, a saved system prompt) reuses the longest common prefix, trimmed back
as mlx-lm's and llama.cpp's prompt caches do, and only the rest is prefilled. The CLI's
``generate`` and ``chat``, the benches and the server's single-sequence path run this loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from mlxkv.config import KVConfig
from mlxkv.engine.sampling import RowSampler, SamplingParams, StopMatcher
from mlxkv.engine.stats import GenerationStats
from mlxkv.memory.held import kv_held
from mlxkv.stepping import prefill


@dataclass(frozen=True)
class Token:
    """One generated token and the text it completed (may be empty while a character or a
    possible stop string is pending)."""

    id: int
    text: str
    finish_reason: str | None = None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Session:
    """A model, its tokenizer and one KV cache that persists across ``generate`` calls.

    ``tokens``: exactly the tokens the cache holds (prompt and fed answers), so the next
    prompt's reusable prefix is known without looking inside the cache.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, config: KVConfig, *,
                 prefill_step_size: int | None = None, cache: list[Any] | None = None,
                 tokens: Sequence[int] = ()) -> None:
        from mlxkv.caches.factory import make_kv_cache
        from mlxkv.stepping import DEFAULT_PREFILL_STEP_SIZE

        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.prefill_step_size = prefill_step_size or DEFAULT_PREFILL_STEP_SIZE
        self.cache = cache if cache is not None else make_kv_cache(model, config)
        self.tokens: list[int] = list(tokens)
        self.stats = GenerationStats()

    # -- the cache ----------------------------------------------------------------------------
    def reset(self) -> None:
        from mlxkv.caches.factory import make_kv_cache

        self.cache, self.tokens = make_kv_cache(self.model, self.config), []

    def reuse(self, prompt: Sequence[int]) -> int:
        """Keep the longest prefix of ``prompt`` the cache holds (trimming what follows it) and
        return its length; at least one prompt token is left to feed, since generation starts
        from the last prompt token's logits. A cache that cannot trim (a window that evicted
        tokens) starts over."""
        if any(getattr(c, "offset", len(self.tokens)) != len(self.tokens) for c in self.cache):
            self.reset()  # an interrupted step left the cache ahead of what we know it holds
            return 0
        keep = min(common_prefix(self.tokens, prompt), len(prompt) - 1)
        cut = len(self.tokens) - keep
        if cut and not all(c.is_trimmable() for c in self.cache):
            self.reset()
            return 0
        for c in self.cache:
            if cut:
                c.trim(cut)
        self.tokens = self.tokens[:keep]
        return keep

    # -- generation -----------------------------------------------------------------------------
    def prefill(self, prompt: Sequence[int], on_prefill: Callable[[int, int], None] | None = None) -> mx.array:
        """Reuse what the cache holds of ``prompt``, feed the rest, and return the last token's
        logits. Starts ``self.stats`` for this answer."""
        if not prompt:
            raise ValueError("empty prompt")
        stats = self.stats = GenerationStats(prompt_tokens=len(prompt))
        stats.reused_tokens = self.reuse(prompt)
        start = time.perf_counter()
        rest = list(prompt[stats.reused_tokens:])
        logits = prefill(self.model, rest, self.cache, self.prefill_step_size, on_prefill)
        self.tokens += rest
        stats.prefill_s = time.perf_counter() - start
        return logits

    def generate(self, prompt: Sequence[int], params: SamplingParams = SamplingParams(),
                 on_prefill: Callable[[int, int], None] | None = None) -> Iterator[Token]:
        """Stream the answer to ``prompt`` (token ids) token by token; ``self.stats`` is filled in
        as it goes. ``on_prefill(done, total)`` reports prompt progress."""
        logits = self.prefill(prompt, on_prefill)
        return self.decode(logits, params)

    def decode(self, logits: mx.array, params: SamplingParams = SamplingParams()) -> Iterator[Token]:
        """Sample from ``logits`` (the last fed token's), then feed each token back, up to
        ``params.max_tokens``, an end-of-sequence token or a stop string."""
        stats = self.stats
        sampler = RowSampler(params)
        eos = set(getattr(self.tokenizer, "eos_token_ids", None) or [self.tokenizer.eos_token_id])
        detokenizer = self.tokenizer.detokenizer
        detokenizer.reset()
        stops = StopMatcher(params.stop)
        try:
            start = time.perf_counter()
            token = sampler(_log_probs(logits))
            for step in range(params.max_tokens):
                last = step + 1 == params.max_tokens
                if not last:  # the next step runs while this token is handed out
                    next_logits = self.model(token.reshape(1, 1), cache=self.cache)[0, -1]
                    next_token = sampler(_log_probs(next_logits))
                    mx.async_eval(next_token)
                token_id = int(token.item())
                if not last:
                    self.tokens.append(token_id)
                stats.generated_tokens += 1
                stats.decode_s = time.perf_counter() - start
                if token_id in eos:
                    stats.finish_reason = "stop"
                    yield Token(token_id, stops.feed(_finish(detokenizer)) + stops.flush(), "stop")
                    return
                detokenizer.add_token(token_id)
                text = stops.feed(detokenizer.last_segment)
                if stops.stopped:
                    stats.finish_reason = "stop"
                    yield Token(token_id, text, "stop")
                    return
                if last:
                    stats.finish_reason = "length"
                    yield Token(token_id, text + stops.feed(_finish(detokenizer)) + stops.flush(), "length")
                    return
                yield Token(token_id, text)
                token = next_token
        except (KeyboardInterrupt, GeneratorExit):
            stats.finish_reason = stats.finish_reason or "interrupted"
            raise
        finally:
            stats.peak_bytes = mx.get_peak_memory()
            stats.kv = kv_held(self.model, self.cache)


def _log_probs(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _finish(detokenizer: Any) -> str:
    detokenizer.finalize()
    return detokenizer.last_segment

"""Pass-key retrieval: can the model still find one fact in a long prompt with this cache?

A five-digit key hides at a chosen depth of filler text (the repeated sentences of the
pass-key literature: Mohtashami & Jaggi, "Landmark Attention", 2023); the question comes
last and the model answers greedily. Small models fail long prompts even at full
precision, so every row carries the full-precision reference's accuracy on the very same
prompts: the difference is what the cache costs.

The prompt is prefilled in chunks (``chunk`` tokens): with a chunk as long as the prompt,
the prompt would attend to itself exactly and only the answer's later tokens would see the
stored history; smaller chunks make the key a stored (quantized) token, as in a long chat.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.nn as nn

from mlxkv.config import KVConfig
from mlxkv.errors import UserError, at_least
from mlxkv.engine import SamplingParams, Session
from mlxkv.eval.configs import DEFAULT_REFERENCE, CacheSpec, as_spec, parse_specs

DEFAULT_LENGTHS = (512, 1024, 2048)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_TRIALS = 2
DEFAULT_CHUNK = 128
ANSWER_TOKENS = 8
"""Greedy tokens decoded: enough for a five-digit key (one token per digit in SmolLM2) and
whatever the model says first."""

INSTRUCTION = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
ANSWER_PREFIX = "The pass key is"

Progress = Callable[[str], None]
"""Called once per answered prompt with the config's label."""


@dataclass(frozen=True)
class PasskeyPrompt:
    tokens: list[int]
    key: str
    length: int  # the requested length; ``len(tokens)`` is within one filler sentence of it
    depth: float


def _encode(tokenizer: Any, text: str) -> list[int]:
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def _render(tokenizer: Any, n_before: int, n_after: int, key: str) -> str:
    haystack = " ".join([FILLER] * n_before + [NEEDLE.format(key=key)] + [FILLER] * n_after)
    question = f"{INSTRUCTION}\n\n{haystack}\n\n{QUESTION}"
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return chat + ANSWER_PREFIX
    return f"{question}\n{ANSWER_PREFIX}"


def make_prompt(tokenizer: Any, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of about ``length`` tokens with ``key`` after ``depth`` of the filler
    (0: right after the instruction; 1: just before the question)."""
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"depth {depth} is outside 0..1; use fractions such as 0,0.5,1")
    base = len(_encode(tokenizer, _render(tokenizer, 0, 0, key)))
    unit = len(_encode(tokenizer, _render(tokenizer, 1, 0, key))) - base
    n_fill = (length - base) // max(unit, 1)
    if n_fill < 1:
        raise UserError(
            f"length {length} is too short for a pass-key prompt (the question alone takes "
            f"{base} tokens); use lengths of at least {base + unit}"
        )
    n_before = round(depth * n_fill)
    tokens = _encode(tokenizer, _render(tokenizer, n_before, n_fill - n_before, key))
    return PasskeyPrompt(tokens, key, length, depth)


def pass_key(seed: int, length: int, depth: float, trial: int) -> str:
    """A five-digit key, the same for every config (and every run) of one prompt."""
    return str(random.Random(f"{seed}:{length}:{depth}:{trial}").randint(10000, 99999))


def answer(model: nn.Module, tokenizer: Any, prompt: Sequence[int], cache: list[Any],
           chunk: int = DEFAULT_CHUNK, max_tokens: int = ANSWER_TOKENS) -> str:
    """Greedy continuation of ``prompt`` (``max_tokens`` tokens, stopping at end of turn), run
    by the same engine as ``mlxkv generate``."""
    session = Session(model, tokenizer, KVConfig(), prefill_step_size=chunk, cache=cache)
    return "".join(token.text for token in session.generate(prompt, SamplingParams(max_tokens=max_tokens)))


def found(reply: str, key: str) -> bool:
    """Retrieved: the first number in the reply is the key."""
    first = re.search(r"\d+", reply)
    return first is not None and first.group() == key


def evaluate_passkey(
    model: nn.Module,
    tokenizer: Any,
    configs: str | Sequence[str | KVConfig | CacheSpec],
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    depths: Sequence[float] = DEFAULT_DEPTHS,
    trials: int = DEFAULT_TRIALS,
    chunk: int = DEFAULT_CHUNK,
    reference: str | KVConfig | CacheSpec = DEFAULT_REFERENCE,
    seed: int = 0,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """One row per config, length and depth: ``accuracy`` over ``trials`` keys and
    ``accuracy_ref``, the full-precision reference's accuracy on the same prompts."""
    specs = parse_specs(configs)
    ref = as_spec(reference)
    at_least(trials, 1, "trials")
    at_least(chunk, 1, "chunk")
    if not lengths or not depths:
        raise UserError("give at least one length and one depth")
    rows = []
    for length in lengths:
        for depth in depths:
            hits = {spec.label: 0 for spec in specs}
            ref_hits = 0
            prompt_tokens = 0
            for trial in range(trials):
                prompt = make_prompt(tokenizer, length, depth, pass_key(seed, length, depth, trial))
                prompt_tokens = len(prompt.tokens)
                for spec in [ref, *specs]:
                    reply = answer(model, tokenizer, prompt.tokens, spec.make(model), chunk)
                    hit = found(reply, prompt.key)
                    if spec is ref:
                        ref_hits += hit
                    else:
                        hits[spec.label] += hit
                    if progress is not None:
                        progress(spec.label)
            for spec in specs:
                rows.append({
                    "config": spec.label,
                    "description": spec.description,
                    "length": length,
                    "depth": depth,
                    "accuracy": hits[spec.label] / trials,
                    "accuracy_ref": ref_hits / trials,
                    "trials": trials,
                    "prompt_tokens": prompt_tokens,
                    "chunk": chunk,
                    "reference": ref.label,
                })
    return rows


def answers_count(n_configs: int, n_lengths: int, n_depths: int, trials: int) -> int:
    """Prompts answered in one evaluation, the reference included (a progress bar's total)."""
    return (n_configs + 1) * n_lengths * n_depths * trials

"""OpenAI response objects: whole answers, streamed chunks and ``usage``, as plain dicts.

One ``Reply`` per request knows its id, kind and model, so a stream's chunks and a whole
answer carry the same fields; ``sse`` frames a payload as a server-sent event.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from mlxkv.engine import Usage

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


@dataclass
class Reply:
    """``kind``: "chat" or "completion"; ``id`` is also the engine's request id (the log line's)."""

    kind: str
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def chat(self) -> bool:
        return self.kind == "chat"

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str | None, usage: Usage) -> dict[str, Any]:
        """The non-streaming answer."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(False), "choices": [choice], "usage": usage_json(usage)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, *, first: bool = False) -> dict[str, Any]:
        """A streamed piece: the chat stream opens with the assistant role, as OpenAI's does."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """``stream_options.include_usage``: a last chunk with no choices and the usage."""
        return {**self._head(True), "choices": [], "usage": usage_json(usage)}

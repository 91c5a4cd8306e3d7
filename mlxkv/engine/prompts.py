"""Prompts as token ids: a conversation through the model's chat template (raw text when it has none).

One rendering for `generate`, `chat`, the server and `generate_batch`, so the same messages
give the same tokens everywhere (and a cached prefix of them is found again).
"""

from __future__ import annotations

from typing import Any


def encode_chat(tokenizer: Any, messages: list[dict[str, str]], chat_template: bool = True) -> list[int]:
    """Token ids for a conversation, ready for the assistant's answer."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)
    return list(tokenizer.encode("\n\n".join(m["content"] for m in messages)))


def messages_for(prompt: str, system: str | None = None) -> list[dict[str, str]]:
    """A one-turn conversation: the optional system message, then the user's prompt."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]

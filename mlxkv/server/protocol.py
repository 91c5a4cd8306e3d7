"""OpenAI request bodies read into what the engine needs: prompt tokens and SamplingParams.

Shapes and types are checked here, each failure an ``APIError`` naming its field; the values
of the sampling fields go through ``SamplingParams``, the one rule the CLI and the Python API
use too. Fields a local server cannot honour (``n`` > 1, ``logprobs``) are refused rather
than silently ignored; fields that change nothing here (``user``, ``presence_penalty`` 0, ...)
are accepted as OpenAI clients send them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mlxkv.engine import SamplingParams
from mlxkv.errors import UserError
from mlxkv.server.errors import APIError

ROLES = ("system", "developer", "user", "assistant", "tool")
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "stop")


@dataclass(frozen=True)
class Defaults:
    """What a request gets for a field it leaves out (``mlxkv serve --max-tokens/--temp/--top-p``)."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass(frozen=True)
class Generation:
    """One request, read: ``kind`` "chat" or "completion"; ``prompt_field`` names the field a
    too-long prompt is blamed on."""

    kind: str
    model: str
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool

    @property
    def prompt_field(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"


@dataclass(frozen=True)
class ServedModel:
    """The model the server answers for: ``name`` as /v1/models lists it, ``aliases`` also
    accepted in ``model``; ``context``: the model's context in tokens (caps default max_tokens)."""

    name: str
    aliases: tuple[str, ...] = ()
    context: int | None = None

    def check(self, asked: Any) -> str:
        if asked is None:
            return self.name  # as mlx-lm's and vLLM's servers: an omitted model is the served one
        if not isinstance(asked, str):
            raise APIError("model must be a string", param="model")
        if asked not in (self.name, *self.aliases):
            raise APIError(f"the model '{asked}' does not exist; this server serves '{self.name}' (GET /v1/models)",
                           404, param="model", code="model_not_found")
        return self.name


def read_chat(body: Any, tokenizer: Any, served: ServedModel, defaults: Defaults) -> Generation:
    """A /v1/chat/completions body: ``messages`` through the tokenizer's chat template."""
    body = _object(body)
    model = served.check(body.get("model"))
    messages = _messages(body.get("messages"))
    _refuse_unsupported(body, logprobs_type=bool)
    prompt = _chat_tokens(tokenizer, messages)
    limit = body.get("max_completion_tokens")
    field = "max_completion_tokens" if limit is not None else "max_tokens"
    return _generation("chat", body, model, prompt, served, defaults, field)


def read_completion(body: Any, tokenizer: Any, served: ServedModel, defaults: Defaults) -> Generation:
    """A /v1/completions body: ``prompt`` as text (no template) or as token ids."""
    body = _object(body)
    model = served.check(body.get("model"))
    _refuse_unsupported(body, logprobs_type=int)
    if body.get("echo") or body.get("suffix") or (body.get("best_of") or 1) != 1:
        raise APIError("echo, suffix and best_of are not supported by this server", param="echo")
    prompt = _prompt_tokens(body.get("prompt"), tokenizer, getattr(tokenizer, "vocab_size", None))
    return _generation("completion", body, model, prompt, served, defaults, "max_tokens")


# -- the parts -----------------------------------------------------------------------------------
def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    return body


def _messages(messages: Any) -> list[dict[str, str]]:
    if messages is None:
        raise APIError("messages is required: a list of {role, content} objects", param="messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("messages must be a non-empty list of {role, content} objects", param="messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise APIError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        out.append({"role": role, "content": _content(message.get("content"), f"{where}.content")})
    return out


def _content(content: Any, where: str) -> str:
    """A string, or OpenAI's list of parts of which only text parts are understood here."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(f"{where}: only text parts ({{'type': 'text', 'text': ...}}) are supported",
                               param=where)
            texts.append(part["text"])
        return "\n".join(texts)
    raise APIError(f"{where} must be a string or a list of text parts", param=where)


def _chat_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    from mlxkv.engine.prompts import encode_chat

    try:
        return encode_chat(tokenizer, messages)
    except Exception as e:  # the template's own complaint (roles out of order, ...)
        raise APIError(f"the chat template cannot render these messages: {e}", param="messages") from None


def _prompt_tokens(prompt: Any, tokenizer: Any, vocab: int | None) -> list[int]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return list(tokenizer.encode(prompt))
    if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if vocab and any(not 0 <= t < vocab for t in prompt):
            raise APIError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)
    if prompt is None:
        raise APIError("prompt is required: a string or a list of token ids", param="prompt")
    if isinstance(prompt, list):
        raise APIError("one prompt per request: a string or a list of token ids", param="prompt")
    raise APIError("prompt must be a string or a list of token ids", param="prompt")


def _refuse_unsupported(body: dict[str, Any], logprobs_type: type) -> None:
    n = body.get("n", 1)
    if n is not None and n != 1:
        raise APIError("n must be 1: this server returns one choice per request", param="n")
    if body.get("logprobs") not in (None, False) and not (logprobs_type is int and body.get("logprobs") == 0):
        raise APIError("logprobs are not supported by this server", param="logprobs")
    if body.get("tools"):
        raise APIError("tools are not supported by this server", param="tools")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise APIError("response_format must be {'type': 'text'}: structured output is not supported",
                       param="response_format")


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(f"{name} must be true or false", param=name)
    return value


def _generation(kind: str, body: dict[str, Any], model: str, prompt: list[int], served: ServedModel,
                defaults: Defaults, limit_field: str) -> Generation:
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise APIError("stream_options must be an object such as {'include_usage': true}", param="stream_options")
    include_usage = stream and _flag(options or {}, "include_usage")
    params = _sampling(body, limit_field, _default_max_tokens(len(prompt), served, defaults), defaults)
    return Generation(kind, model, prompt, params, stream, include_usage)


def _default_max_tokens(prompt_tokens: int, served: ServedModel, defaults: Defaults) -> int:
    """An omitted max_tokens: the server's default, cut to the context the prompt leaves (as vLLM)."""
    if served.context and prompt_tokens < served.context:
        return min(defaults.max_tokens, served.context - prompt_tokens)
    return defaults.max_tokens


def _sampling(body: dict[str, Any], limit_field: str, max_tokens: int, defaults: Defaults) -> SamplingParams:
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, (str, list)):
        raise APIError("stop must be a string or a list of strings", param="stop")
    fields: dict[str, Any] = {
        "max_tokens": _given(body.get(limit_field), max_tokens),
        "temperature": _given(body.get("temperature"), defaults.temperature),
        "top_p": _given(body.get("top_p"), defaults.top_p),
        "seed": _seed(body.get("seed")),
        "stop": () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop),
    }
    try:
        return SamplingParams(**fields)
    except UserError as e:
        field = _field_of(str(e), SAMPLING_FIELDS)
        param = limit_field if field == "max_tokens" else field
        message = str(e) if param == field or field is None else param + str(e)[len(field):]
        raise APIError(message, param=param) from None


def _seed(seed: Any) -> Any:
    """OpenAI's seed is a signed 64-bit integer, MLX's random key an unsigned one: map the
    first onto the second (same seed, same answer). Other types go to SamplingParams' check."""
    if isinstance(seed, int) and not isinstance(seed, bool):
        if not -(2**63) <= seed < 2**64:
            raise APIError(f"seed must be a 64-bit integer, got {seed}", param="seed")
        return seed % 2**64
    return seed


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _field_of(message: str, fields: Sequence[str]) -> str | None:
    """SamplingParams' messages start with the field they are about."""
    first = message.split(" ", 1)[0]
    return first if first in fields else None


Reader = Callable[[Any, Any, ServedModel, Defaults], Generation]

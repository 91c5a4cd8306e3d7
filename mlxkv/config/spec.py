"""The one KV-config dialect: names, spec strings and typed field values.

Every command and the Python API read KV configs through here:

- a name from the registry: ``q4-kivi-rot`` (``mlxkv.schemes``);
- a spec string, a name with field overrides: ``q4:residual=64:group_size=32``, or fields
  alone from full precision: ``bits=4:max_kv=4k``. Colons separate overrides so a
  comma-separated list of specs stays readable on a command line;
- flags (``--kv-bits 4 --max-kv 4096``), which ``mlxkv.cli.kv_args`` turns into the same
  field overrides with the same value parsers.

Values are strict: bits are 2-8 or 16 (full precision), booleans 1/0/true/false/yes/no,
token counts take ``4k``, pairs take ``0:8,-1:8`` (or ``0@8/-1@8`` inside a spec string,
where ``:`` and ``,`` are taken), ``none`` only resets fields that may be unset.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from mlxkv.config.kvconfig import BACKENDS, KVConfig
from mlxkv.config.precision import FULL_PRECISION, MODES, SAME_BITS, SUPPORTED_BITS
from mlxkv.config.retention import EVICTIONS
from mlxkv.errors import UserError
from mlxkv.units import parse_tokens

_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_PAIR = re.compile(r"^\s*(-?\d+[kK]?)\s*[:@]\s*(\d+)\s*$")


def parse_bool(text: str, what: str) -> bool:
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise UserError(f"{what} takes 1 or 0 (true/false), got {text!r}")


def parse_bits(text: str | int, what: str) -> int:
    """Bits as a user writes them: 2-8, or 16 for full precision (checked by KVConfig)."""
    try:
        return int(str(text).strip())
    except ValueError:
        raise UserError(f"{what} takes a number of bits ({', '.join(map(str, SUPPORTED_BITS))}, "
                        f"or {FULL_PRECISION} for full precision), got {text!r}") from None


def parse_pairs(text: str, what: str, example: str) -> tuple[tuple[int, int], ...]:
    """'0:8,-1:8' or '0@8/-1@8' -> ((0, 8), (-1, 8)); the left side may be a token count ('4k:4')."""
    pairs = []
    for item in filter(None, (part.strip() for part in re.split(r"[,/]", text))):
        match = _PAIR.match(item)
        if not match:
            inner = example.replace(":", "@").replace(",", "/")
            raise UserError(f"bad {what} entry {item!r}: use pairs such as '{example}' (in a spec string: {inner})")
        left = match.group(1)
        first = parse_tokens(left, what, minimum=0) if left[-1] in "kK" else int(left)
        pairs.append((first, int(match.group(2))))
    if not pairs:
        raise UserError(f"{what} is empty: use pairs such as '{example}'")
    return tuple(pairs)


def parse_layer_bits(text: str) -> tuple[tuple[int, int], ...]:
    """LAYER:BITS pairs, e.g. '0:8,-1:8' (16 bits = full precision)."""
    return parse_pairs(text, "per-layer bits (LAYER:BITS)", "0:8,-1:8")


def parse_adaptive(text: str) -> tuple[tuple[int, int], ...]:
    """TOKENS:BITS steps, e.g. '1024:8,4096:4' or '1k:8,4k:4'."""
    return parse_pairs(text, "adaptive steps (TOKENS:BITS)", "1024:8,4096:4")


def _optional_tokens(what: str, minimum: int) -> Callable[[str], int | None]:
    def parse(text: str) -> int | None:
        return None if text.strip().lower() == "none" else parse_tokens(text, what, minimum)

    return parse


def _choice(what: str, choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.strip().lower()
        if value not in choices:
            raise UserError(f"unknown {what} {text!r}; use one of {', '.join(choices)}")
        return value

    return parse


FIELD_PARSERS: dict[str, Callable[[str], Any]] = {
    "bits": lambda t: None if parse_bits(t, "bits") == FULL_PRECISION else parse_bits(t, "bits"),
    "k_bits": lambda t: parse_bits(t, "k_bits"),
    "v_bits": lambda t: parse_bits(t, "v_bits"),
    "group_size": lambda t: parse_tokens(t, "group_size"),
    "mode": _choice("quantization mode", MODES),
    "rotate": lambda t: parse_bool(t, "rotate"),
    "per_channel_keys": lambda t: parse_bool(t, "per_channel_keys"),
    "layer_bits": parse_layer_bits,
    "adaptive": parse_adaptive,
    "quantized_kv_start": lambda t: parse_tokens(t, "quantized_kv_start", minimum=0),
    "window_bits": lambda t: SAME_BITS if str(t).strip().lower() in (SAME_BITS, "none") else parse_bits(t, "window_bits"),
    "max_kv": _optional_tokens("max_kv", 1),
    "sinks": lambda t: parse_tokens(t, "sinks", minimum=0),
    "residual": _optional_tokens("residual", 0),
    "evict": _choice("eviction", EVICTIONS),
    "backend": _choice("KV backend", BACKENDS),
}
"""Field -> parser of its text value: the one place a field's text form is defined."""


def parse_field(name: str, text: str, context: str = "") -> tuple[str, Any]:
    """('q4:' context) 'residual', '64' -> ('residual', 64)."""
    key = name.strip().replace("-", "_")
    if key not in FIELD_PARSERS:
        where = f" in {context!r}" if context else ""
        raise UserError(f"unknown KV config field {key!r}{where}; fields: {', '.join(FIELD_PARSERS)}")
    return key, FIELD_PARSERS[key](text)


def spec_fields(spec: str) -> tuple[str | None, dict[str, Any]]:
    """'q4:residual=64' -> ('q4', {'residual': 64}); 'bits=4' -> (None, {'bits': 4})."""
    parts = [part.strip() for part in spec.strip().split(":")]
    name = None if "=" in parts[0] or not parts[0] else parts[0]
    fields: dict[str, Any] = {}
    for assignment in parts[1:] if name is not None or not parts[0] else parts:
        key, sep, raw = assignment.partition("=")
        if not sep or not raw.strip():
            raise UserError(f"cannot read {assignment!r} in KV config {spec!r}; write FIELD=VALUE, e.g. q4:residual=64")
        key, value = parse_field(key, raw, spec)
        fields[key] = value
    return name, fields


def parse_spec(spec: str, **overrides: Any) -> KVConfig:
    """A KVConfig from a name or spec string, then ``overrides`` (typed values, e.g. from flags)."""
    from mlxkv.schemes import scheme

    name, fields = spec_fields(spec)
    base = dict(scheme(name).fields) if name is not None else {}
    return KVConfig(**{**base, **fields, **overrides})


def split_specs(text: str) -> list[str]:
    """'q4,q8:residual=0' -> ['q4', 'q8:residual=0'] (commas separate specs)."""
    return [part.strip() for part in text.split(",") if part.strip()]

"""KV-cache configuration: precision (how tokens are encoded), retention (which stay), the
user-facing ``KVConfig`` that holds both, and the one parser of names, spec strings and flags."""

from mlxkv.config.kvconfig import BACKENDS, KVConfig
from mlxkv.config.precision import (
    FULL_PRECISION, HADAMARD_BASES, MICROSCALING, MODES, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, Precision,
    Stage, hadamard_size,
)
from mlxkv.config.retention import DEFAULT_RESIDUAL, DEFAULT_SINKS, EVICTIONS, Retention
from mlxkv.config.spec import parse_adaptive, parse_layer_bits, parse_spec, split_specs

__all__ = [
    "BACKENDS", "DEFAULT_RESIDUAL", "DEFAULT_SINKS", "EVICTIONS", "FULL_PRECISION", "HADAMARD_BASES", "KVConfig",
    "MICROSCALING", "MODES", "Precision", "Retention", "SUPPORTED_BITS", "SUPPORTED_GROUP_SIZES", "Stage",
    "hadamard_size", "parse_adaptive", "parse_layer_bits", "parse_spec", "split_specs",
]

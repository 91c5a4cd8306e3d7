"""Generation on mlxkv caches, shared by the CLI, the Python API, the benches and the server."""

from mlxkv.engine.sampling import SamplingParams
from mlxkv.engine.session import Session, Token
from mlxkv.engine.stats import GenerationStats

__all__ = ["GenerationStats", "SamplingParams", "Session", "Token"]

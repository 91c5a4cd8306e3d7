"""Generation on mlxkv caches, shared by the CLI, the Python API, the benches and the server.

``Session``: one conversation (generate, chat). ``Engine``: many at once, decoded together
(continuous batching; the server). ``generate_batch``: several prompts from a notebook.
"""

from mlxkv.engine.engine import Engine, EngineMetrics, generate_batch
from mlxkv.engine.requests import Request, RequestError, Usage
from mlxkv.engine.sampling import SamplingParams
from mlxkv.engine.session import Session, Token
from mlxkv.engine.stats import GenerationStats

__all__ = [
    "Engine", "EngineMetrics", "GenerationStats", "Request", "RequestError", "SamplingParams", "Session", "Token",
    "Usage", "generate_batch",
]

"""``mlxkv serve``: an OpenAI-compatible HTTP server on the batching engine.

``create_app(engine, served)`` builds the ASGI app (Starlette); ``Server(app, bind(host, port))``
runs it with uvicorn. Needs the ``serve`` extra: ``pip install 'mlxkv[serve]'``.
"""

from mlxkv.server.app import ServerState, create_app
from mlxkv.server.errors import APIError
from mlxkv.server.protocol import Defaults, ServedModel
from mlxkv.server.run import Server, bind

__all__ = ["APIError", "Defaults", "ServedModel", "Server", "ServerState", "bind", "create_app"]

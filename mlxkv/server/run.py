"""Running the app with uvicorn: a socket bound before the model loads, and a clean exit.

On Ctrl-C or SIGTERM the server stops accepting connections, ends the requests in flight
at once (their streams close with an error event and ``[DONE]``), waits for the responses to
go out and exits 0, instead of uvicorn's default of re-raising the signal after shutdown.
"""

from __future__ import annotations

import socket
from types import FrameType

import uvicorn
from starlette.applications import Starlette

from mlxkv.errors import UserError

GRACEFUL_SHUTDOWN_S = 10
"""Responses still open this long after a shutdown signal are cut."""


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port), or a one-line UserError."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = "pass another --port" if e.errno in (98, 48) else "check --host and --port"
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Server(uvicorn.Server):
    """uvicorn's server with a shutdown that ends the app's requests in flight and exits 0."""

    def __init__(self, app: Starlette, sock: socket.socket | None = None, log_level: str = "warning") -> None:
        super().__init__(uvicorn.Config(app, log_level=log_level, access_log=False,
                                        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S, lifespan="on"))
        self.app, self.sock = app, sock

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()  # a requested shutdown that went well exits 0, not by the signal
        self.app.state.mlxkv.drain()

    def stop(self) -> None:
        """The same shutdown from another thread (tests, notebooks)."""
        self.app.state.mlxkv.drain()
        self.should_exit = True

    def serve_forever(self) -> None:
        self.run(sockets=[self.sock] if self.sock is not None else None)

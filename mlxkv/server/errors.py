"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every refusal the server makes goes through ``APIError``, so a client (the official ``openai``
package included) gets the same shape whatever went wrong: a malformed body, a bad field, an
unknown model, a prompt the engine can never hold (400) or a full queue (429).
"""

from __future__ import annotations

from typing import Any

from mlxkv.engine import RequestError

ERROR_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",  # OpenAI's type for an unknown model, with code "model_not_found"
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """A refusal with its HTTP status; ``param`` names the request field at fault, when one is."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code

    @classmethod
    def from_engine(cls, error: RequestError, param: str | None = None) -> "APIError":
        """The engine's 400 (can never fit: context, KV budget) or 429 (queue full)."""
        return cls(str(error), error.status, param if error.status == 400 else None, error.code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}


def shutting_down() -> APIError:
    return APIError("the server is shutting down; retry on another server or later", 503, code="server_shutting_down")

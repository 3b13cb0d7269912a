"""Errors in OpenAI's JSON shape: ``{"error": {"message", "type", "param", "code"}}`` with the matching status."""

from __future__ import annotations

from typing import Optional

from starlette.responses import JSONResponse

from chatglm.errors import BackendUnavailableError, ChatGLMError, ContextOverflowError, InputError

#: status -> OpenAI error type
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    421: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answered to the client; ``status`` is the HTTP status."""

    def __init__(self, status: int, message: str, *, code: Optional[str] = None, param: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def invalid(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def from_library(exc: ChatGLMError) -> APIError:
    """The API error for one of the package's errors raised while serving a request."""
    if isinstance(exc, ContextOverflowError):
        return APIError(400, exc.problem, code="context_length_exceeded", param="messages")
    if isinstance(exc, InputError):
        return APIError(400, exc.problem, param="messages")
    if isinstance(exc, BackendUnavailableError):  # an RPC server down or gone: the next request reconnects
        return APIError(503, str(exc), code="backend_unavailable", headers={"Retry-After": "1"})
    return APIError(500, str(exc), code="generation_failed")


def internal() -> APIError:
    """The answer to a bug: generic (details stay in the server's log, never in a response)."""
    return APIError(500, "internal server error; the server's log has the details", code="internal_error")


def context_overflow(n_prompt: int, n_ctx: int) -> APIError:
    return APIError(400, f"This model's maximum context length is {n_ctx} tokens; the prompt has {n_prompt} tokens, "
                         "which leaves no room for a reply. Shorten the messages or restart the server with a "
                         "larger --n-ctx.", code="context_length_exceeded", param="messages")

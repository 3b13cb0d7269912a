"""Request bodies from raw bytes to validated requests, with every size bounded and no socket involved.

:func:`parse_request` is the one gate a POST body passes: the ``Content-Type`` (JSON only, so no cross-site form or
``text/plain`` POST can drive the server), the size, bounded JSON (:mod:`chatglm.server.strictjson`: UTF-8, depth,
number length, no NaN, no lone surrogates), then the schema and the message mapping. Every refusal is an
:class:`APIError` (400, 413 or 415) in OpenAI's shape; nothing else escapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from chatglm.limits import MAX_BODY_MIB
from chatglm.runtime.messages import Message
from chatglm.server import ollama
from chatglm.server.errors import APIError
from chatglm.server.mapping import to_messages
from chatglm.server.schema import ChatRequest, CompletionRequest, parse_chat, parse_completion
from chatglm.server.strictjson import loads

MAX_BODY_BYTES = MAX_BODY_MIB << 20


@dataclass(frozen=True)
class ParsedRequest:
    """A request that passed every check: the schema model, and for chat the GLM messages it maps to."""

    route: str
    request: Union[ChatRequest, CompletionRequest]
    messages: Optional[list[Message]] = None


def check_content_type(value: str) -> None:
    """415 unless ``value`` is ``application/json`` (parameters allowed; a charset, if given, must be UTF-8)."""
    mime, _, params = (value or "").partition(";")
    if mime.strip().lower() != "application/json":
        shown = f"is {value!r}" if value else "is missing"
        raise APIError(415, f"the request's Content-Type {shown}; send the body as application/json",
                       code="unsupported_media_type")
    for param in params.split(";"):
        name, _, setting = param.partition("=")
        charset = setting.strip().strip('"').lower()
        if name.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
            raise APIError(415, f"the request's charset is {charset!r}; send the body as UTF-8",
                           code="unsupported_media_type")


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes",
                    code="request_too_large")


def _chat(body: Any) -> ParsedRequest:
    req = parse_chat(body)
    return ParsedRequest("/v1/chat/completions", req, to_messages(req))


def _completion(body: Any) -> ParsedRequest:
    req = parse_completion(body)
    req.prompt_text()  # a list of several prompts is refused here, not later
    return ParsedRequest("/v1/completions", req)


def _ollama_chat(body: Any) -> ParsedRequest:
    return _chat(ollama.chat_body(body))


def _ollama_generate(body: Any) -> ParsedRequest:
    translated, as_chat = ollama.generate_body(body)
    return _chat(translated) if as_chat else _completion(translated)


ROUTES: dict[str, Callable[[Any], ParsedRequest]] = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/api/chat": _ollama_chat,  # Ollama's bodies, checked as the OpenAI ones they map to
    "/api/generate": _ollama_generate,
}


def parse_request(body: bytes, content_type: str, route: str, limit: int = MAX_BODY_BYTES) -> ParsedRequest:
    """Everything the server checks in a POST body, without a socket: the validated request or an APIError.

    ``route`` is the path (``/v1/chat/completions`` or ``/v1/completions``). Raises only :class:`APIError`
    (400 bad body, 413 over ``limit`` bytes, 415 not JSON); a ValueError for an unknown route is a caller's bug."""
    handler = ROUTES.get(route)
    if handler is None:
        raise ValueError(f"no request parser for the route {route!r}; known: {', '.join(ROUTES)}")
    check_content_type(content_type)
    if len(body) > limit:
        raise too_large(limit)
    return handler(loads(body))

"""Two ASGI wrappers around the app: the Host check against DNS rebinding, and the last net for bugs.

- :class:`HostGuard`: a keyless server on loopback answers only requests whose ``Host`` header names one of the
  allowed hosts (any port). A page on ``evil.example`` that rebinds its name to 127.0.0.1 still sends
  ``Host: evil.example``, so it gets a 403 and never reaches the model.
- :class:`CatchAll`: an exception that escapes a handler becomes a 500 in OpenAI's shape (or, once a response has
  started, a logged and cleanly ended response) and one log line; the server goes on serving.
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

from chatglm.server.errors import APIError, internal

log = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def host_name(header: str) -> Optional[str]:
    """The name in a ``Host`` header without its port, lower-cased (``[::1]`` keeps its brackets); None if malformed."""
    value = header.strip().lower()
    if value.startswith("["):
        name, closed, rest = value.partition("]")
        if not closed or (rest and not rest.startswith(":")):
            return None
        name, port = name + "]", rest[1:]
    else:
        name, _, port = value.partition(":")
    if not name or (port and not port.isdigit()):
        return None
    return name.rstrip(".")


class HostGuard:
    """Answer 403 to any request whose Host is not one of ``allowed`` (names, compared without port)."""

    def __init__(self, app, allowed: Iterable[str]):
        self.app = app
        self.allowed = frozenset(n.strip().lower().rstrip(".") for n in allowed)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"host"), "")
        if host_name(header) in self.allowed:
            return await self.app(scope, receive, send)
        log.warning("refused a request for Host %r (DNS rebinding?)", header[:100])
        if scope["type"] == "websocket":
            return await send({"type": "websocket.close", "code": 1008})
        shown = ", ".join(sorted(self.allowed))
        await APIError(403, f"the Host header {header[:100]!r} is not allowed: this server answers only {shown}; "
                            "start it with --allow-host NAME to allow another name",
                       code="host_not_allowed", param="Host").response()(scope, receive, send)


class CatchAll:
    """The outermost net: any exception from the app is logged in one line and answered with a generic 500."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        sent = {"start": False, "end": False}

        async def tracking_send(message):
            if message["type"] == "http.response.start":
                sent["start"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                sent["end"] = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # a bug: the client gets JSON, the log one line (the traceback with CHATGLM_DEBUG)
            log.error("%s %s failed: %s: %s", scope.get("method", ""), scope.get("path", ""), type(exc).__name__,
                      exc, exc_info=exc if os.environ.get("CHATGLM_DEBUG") else None)
            if scope["type"] != "http" or sent["end"]:
                return
            if sent["start"]:  # the status is out already: end the body so the connection stays usable
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            else:
                await internal().response()(scope, receive, send)

"""The loaded model instances and the fair, bounded queue of requests waiting for one.

Each instance serves one request at a time. A request takes a free instance at once when nobody is waiting; otherwise
it joins a FIFO queue of at most ``max_queue`` waiters (more gets a 429). A finished request hands its instance to
the oldest waiter still there, so nobody is overtaken. A waiter that goes away (client disconnected) leaves the queue;
one that is handed an instance in the same moment passes it straight on. Everything here runs on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Any, Generic, Optional, TypeVar

from chatglm.server.errors import APIError

log = logging.getLogger(__name__)
M = TypeVar("M")

LOADING, READY, FAILED, CLOSED = "loading", "ready", "failed", "closed"


class ModelPool(Generic[M]):
    def __init__(self, max_queue: int):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.max_queue = max_queue
        self.state = LOADING
        self.error = ""
        self.models: list[M] = []
        self._free: deque[M] = deque()
        self._waiters: deque[asyncio.Future] = deque()

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def set_ready(self, models: list[M]) -> None:
        self.models = list(models)
        self._free.extend(self.models)
        self.state = READY
        self._hand_over()

    def set_failed(self, error: str) -> None:
        self.state, self.error = FAILED, error
        self._fail_waiters()

    def close(self) -> None:
        self.state = CLOSED
        self._fail_waiters()

    def _fail_waiters(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(self.unavailable())

    def unavailable(self) -> APIError:
        if self.state == LOADING:
            return APIError(503, "the model is still loading; retry shortly", code="model_loading",
                            headers={"Retry-After": "1"})
        if self.state == FAILED:
            return APIError(503, f"the model failed to load: {self.error}", code="model_load_failed")
        return APIError(503, "the server is shutting down", code="shutting_down")

    # -- requests -----------------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    @property
    def busy(self) -> int:
        return len(self.models) - len(self._free)

    async def acquire(self) -> M:
        if self.state != READY:
            raise self.unavailable()
        if self._free and not self._waiters:
            return self._free.popleft()
        if self.queued >= self.max_queue:
            raise APIError(429, f"the server is busy: {self.busy} request(s) running and {self.queued} waiting "
                                f"(queue limit {self.max_queue}); retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(fut.result())  # handed an instance just as we left: pass it on
            else:
                self._discard(fut)
            raise

    def release(self, model: M) -> None:
        self._free.append(model)
        self._hand_over()

    def _hand_over(self) -> None:
        while self._free and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(self._free.popleft())

    def _discard(self, fut: asyncio.Future) -> None:
        try:
            self._waiters.remove(fut)
        except ValueError:
            pass

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "ok" if self.state == READY else self.state,
                               "instances": len(self.models), "busy": self.busy, "queued": self.queued,
                               "max_queue": self.max_queue}
        if self.error:
            out["error"] = self.error
        return out

    def first(self) -> Optional[M]:
        return self.models[0] if self.models else None

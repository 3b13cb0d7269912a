"""Serving the store: models loaded on the first request that names them, unloaded after their ``keep_alive``.

At most ``max_models`` are resident; a request for another evicts the least recently used idle one (none idle: 503).
Each model has its own :class:`ModelPool` of one instance. The loader (``open_model``, given by the CLI) resolves a
name in the store and loads it; it raises :class:`InputError` for a name the store does not hold.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from chatglm.errors import InputError
from chatglm.server.errors import APIError, invalid
from chatglm.server.pool import ModelPool

log = logging.getLogger(__name__)
DEFAULT_KEEP_ALIVE = 300.0  # Ollama's default: five minutes
_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def keep_alive_seconds(value: Any, default: float = DEFAULT_KEEP_ALIVE) -> float:
    """Ollama's ``keep_alive``: seconds as a number, or a duration ("5m", "1h", "30s"); negative: forever."""
    if value is None:
        return default
    if isinstance(value, bool):
        raise invalid("keep_alive must be a number of seconds or a duration such as '5m'", "keep_alive")
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.fullmatch(value.strip()) if isinstance(value, str) else None
    if not m:
        raise invalid("keep_alive must be a number of seconds or a duration such as '5m'", "keep_alive")
    return float(m.group(1)) * _UNIT[m.group(2)]


@dataclass
class Resident:
    name: str
    model: Any
    pool: ModelPool
    used: float = field(default_factory=time.monotonic)
    timer: Optional[asyncio.TimerHandle] = None


class ModelSet:
    def __init__(self, open_model: Callable[[str], tuple[str, Any]], max_models: int = 1, max_queue: int = 64):
        self.open_model, self.max_models, self.max_queue = open_model, max_models, max_queue
        self.resident: dict[str, Resident] = {}
        self._lock = asyncio.Lock()

    async def pool(self, name: str, keep_alive: float) -> tuple[str, ModelPool]:
        """The pool serving ``name`` (loaded now if need be), its unload timer reset to ``keep_alive``."""
        async with self._lock:
            found = next((r for r in self.resident.values() if name in (r.name, f"{r.name}:latest")), None)
            if found is None:
                self._make_room()
                try:
                    canonical, model = await asyncio.to_thread(self.open_model, name)
                except InputError as exc:
                    raise APIError(404, exc.problem if exc.path == name else str(exc), code="model_not_found",
                                   param="model") from None
                if canonical in self.resident:  # the same model under another spelling
                    model.close()
                    found = self.resident[canonical]
                else:
                    pool = ModelPool(self.max_queue)
                    pool.set_ready([model])
                    found = self.resident[canonical] = Resident(canonical, model, pool)
                    log.info("loaded %s", canonical)
            self._touch(found, keep_alive)
            return found.name, found.pool

    def _make_room(self) -> None:
        while len(self.resident) >= self.max_models:
            idle = [r for r in self.resident.values() if r.pool.busy == 0 and r.pool.queued == 0]
            if not idle:
                raise APIError(503, f"all {self.max_models} model slots are busy; retry shortly (--max-models)",
                               code="model_slots_busy", headers={"Retry-After": "1"})
            self.unload(min(idle, key=lambda r: r.used).name)

    def _touch(self, r: Resident, keep_alive: float) -> None:
        r.used = time.monotonic()
        if r.timer is not None:
            r.timer.cancel()
            r.timer = None
        if keep_alive >= 0:
            r.timer = asyncio.get_running_loop().call_later(keep_alive, self._expire, r.name, keep_alive)

    def _expire(self, name: str, keep_alive: float) -> None:
        r = self.resident.get(name)
        if r is None:
            return
        if r.pool.busy or r.pool.queued:  # still working: look again later
            r.timer = asyncio.get_running_loop().call_later(max(keep_alive, 0.5), self._expire, name, keep_alive)
            return
        self.unload(name)

    def unload(self, name: str) -> None:
        r = self.resident.pop(name)
        if r.timer is not None:
            r.timer.cancel()
        r.pool.close()
        r.model.close()
        log.info("unloaded %s", name)

    def close(self) -> None:
        for name in list(self.resident):
            self.unload(name)

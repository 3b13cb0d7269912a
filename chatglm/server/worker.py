"""Generations run on worker threads and report back to the event loop as a stream of events.

A :class:`Generation` takes a model instance from the pool, runs a blocking job on the executor (one thread per
instance) and turns what the job reports into events on an ``asyncio.Queue``: ``ready`` once the prompt has been
checked (so a too-long prompt is still answered with a 400 before a stream starts), ``delta`` for each piece of text,
then ``done`` with an :class:`Outcome` or ``error`` with an :class:`APIError`. ``close()`` sets the cancel event the
model checks before every token; the instance goes back to the pool only when the thread has finished with it.

Stop strings are applied here (the model API has none): text that might be the start of a stop string is held back
until it is known not to be, and a match cancels the generation before its next token.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Executor
from typing import Any, AsyncIterator, Callable, Iterable, Optional, Sequence

from chatglm.errors import ChatGLMError
from chatglm.runtime.messages import Message
from chatglm.server.content import check_media
from chatglm.server.errors import APIError, context_overflow, from_library, internal, invalid
from chatglm.server.mapping import Outcome, tools_for_format
from chatglm.server.pool import ModelPool

log = logging.getLogger(__name__)

Job = Callable[[Any, "Generation"], Outcome]  # (model, generation) -> outcome; runs on a worker thread


class StopScanner:
    """Cuts streamed text at the first stop string, holding back a tail that could still become one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hit = False
        self.text = ""  # everything released so far
        self._held = ""

    def feed(self, piece: str) -> str:
        if self.hit:
            return ""
        buf = self._held + piece
        found = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self._held = True, ""
            return self._release(buf[:min(found)])
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(buf)), 0, -1)
                    if s.startswith(buf[len(buf) - k:])), default=0)
        self._held = buf[len(buf) - keep:] if keep else ""
        return self._release(buf[:len(buf) - keep])

    def flush(self) -> str:
        held, self._held = self._held, ""
        return self._release(held) if not self.hit else ""

    def _release(self, text: str) -> str:
        self.text += text
        return text


class Generation:
    """One request's generation: acquire an instance, run ``job`` on a thread, relay its events."""

    def __init__(self, pool: ModelPool, executor: Executor, job: Job):
        self.pool, self.executor, self.job = pool, executor, job
        self.cancel = threading.Event()
        self.prompt_tokens = 0
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    # -- event-loop side ----------------------------------------------------------------------------------------
    async def start(self) -> int:
        """Wait for an instance and for the prompt check; returns the prompt's token count or raises APIError."""
        self._loop = asyncio.get_running_loop()
        model = await self.pool.acquire()
        try:
            future = self._loop.run_in_executor(self.executor, self._run, model)
        except BaseException:
            self.pool.release(model)
            raise
        future.add_done_callback(lambda _f: self.pool.release(model))
        kind, value = await self._queue.get()
        if kind == "error":
            raise value
        self.prompt_tokens = value
        return value

    async def events(self) -> AsyncIterator[tuple[str, Any]]:
        """``("delta", text)`` events, then one ``("done", Outcome)``; an error event is raised as APIError."""
        while True:
            kind, value = await self._queue.get()
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    async def outcome(self) -> Outcome:
        async for kind, value in self.events():
            if kind == "done":
                return value
        raise APIError(500, "the generation ended without a result")

    def close(self) -> None:
        """Stop the generation before its next token (a no-op once it has finished)."""
        self.cancel.set()

    # -- worker-thread side -------------------------------------------------------------------------------------
    def _emit(self, kind: str, value: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening any more
            self.cancel.set()

    def ready(self, prompt_tokens: int) -> None:
        self._emit("ready", prompt_tokens)

    def delta(self, text: str) -> None:
        self._emit("delta", text)

    def reasoning(self, text: str) -> None:
        self._emit("reasoning", text)

    def _run(self, model: Any) -> None:
        try:
            self._emit("done", self.job(model, self))
        except APIError as exc:
            self._emit("error", exc)
        except ChatGLMError as exc:
            self._emit("error", from_library(exc))
        except Exception:  # a bug: keep serving, tell the client (generically), keep the traceback in the log
            log.exception("generation failed")
            self._emit("error", internal())


# -- jobs ------------------------------------------------------------------------------------------------------
def _check_prompt(n_prompt: int, n_ctx: int) -> None:
    if n_prompt >= n_ctx:
        raise context_overflow(n_prompt, n_ctx)


def _relay(pieces: Iterable[str], scan: StopScanner, gen: Generation) -> None:
    for piece in pieces:
        text = scan.feed(piece)
        if text:
            gen.delta(text)
        if scan.hit:
            gen.cancel.set()  # the model stops before its next token; the rest of its output is dropped
    tail = scan.flush()
    if tail:
        gen.delta(tail)


def _finish(scan: StopScanner, model_reason: str) -> str:
    return "stop" if scan.hit or model_reason != "length" else "length"


def chat_job(conversation: list[Message], sampling: dict, stops: Sequence[str],
             template_kwargs: Optional[dict] = None) -> Job:
    options = {"template_kwargs": template_kwargs or {}}

    def job(model: Any, gen: Generation) -> Outcome:
        check_media(model, conversation)
        messages = tools_for_format(conversation, model.format)
        n_prompt = len(model.prompt_ids(messages, **options))
        _check_prompt(n_prompt, model.info.n_ctx)
        gen.ready(n_prompt)
        scan = StopScanner(stops)
        _relay(model.stream_chat(messages, cancel=gen.cancel, on_thinking=gen.reasoning, **options, **sampling),
               scan, gen)
        reply, stats = model.last_reply, model.last_stats
        content = scan.text if scan.hit or reply.tool_calls else reply.content
        reason = "tool_calls" if reply.tool_calls else _finish(scan, stats.finish_reason)
        return Outcome(content, list(reply.tool_calls), reason, stats.prompt_tokens, stats.generated_tokens,
                       reply.thinking)

    return job


def completion_job(prompt: str, sampling: dict, stops: Sequence[str]) -> Job:
    def job(model: Any, gen: Generation) -> Outcome:
        n_prompt = len(model.tokenize(prompt))
        if not n_prompt:
            raise invalid("the prompt is empty", "prompt")
        _check_prompt(n_prompt, model.info.n_ctx)
        gen.ready(n_prompt)
        scan = StopScanner(stops)
        _relay(model.stream_generate(prompt, cancel=gen.cancel, **sampling), scan, gen)
        stats = model.last_stats
        return Outcome(scan.text, [], _finish(scan, stats.finish_reason), stats.prompt_tokens,
                       stats.generated_tokens)

    return job

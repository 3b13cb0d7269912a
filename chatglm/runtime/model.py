"""The Python API: ``chatglm.load(path)`` gives a :class:`Model` that chats, streams and generates.

Every family looks the same from here; the engine behind the model (llama.cpp or our GLM-1 graph) is chosen from the
GGUF's architecture.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from chatglm.errors import InputError, ModelRuntimeError
from chatglm.runtime.engine import Engine, ModelInfo
from chatglm.runtime.loader import open_engine
from chatglm.runtime.messages import Message, as_messages
from chatglm.runtime.prompts import ChatFormat, get_format
from chatglm.runtime.sampling import Sampler, SamplingParams

log = logging.getLogger(__name__)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    evaluated_tokens: int = 0  # prompt tokens actually run (the rest came from the KV cache)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop", "length" or "cancelled"

    @property
    def prefill_tps(self) -> float:
        return self.evaluated_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0


class Model:
    """A loaded model. Calls are serialised on the engine's lock; ``cancel`` events stop a reply within a token."""

    def __init__(self, engine: Engine, chat_format: Optional[str] = None, sampling: Optional[SamplingParams] = None):
        self.engine = engine
        self.format: ChatFormat = get_format(chat_format or engine.info.chat_format, engine.info.special)
        self.stop_ids = set(engine.info.eog) | self.format.stop_ids()
        self.sampling = sampling or SamplingParams()
        self.last_stats = GenerationStats()

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    def tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.engine.detokenize(ids)

    def prompt_ids(self, messages: Iterable[Message | dict]) -> list[int]:
        return self.format.prompt_ids(as_messages(messages), self.engine)

    # -- chat -------------------------------------------------------------------------------------------------
    def chat(self, messages: Iterable[Message | dict], *, cancel: Optional[threading.Event] = None,
             **sampling) -> Message:
        """The assistant's reply to a conversation."""
        text = "".join(self._generate(self.prompt_ids(messages), self._params(sampling), cancel))
        return self.format.parse_reply(text)

    def stream_chat(self, messages: Iterable[Message | dict], *, cancel: Optional[threading.Event] = None,
                    **sampling) -> Iterator[str]:
        """Yield the reply's visible text as it is generated; the parsed reply is ``last_reply`` afterwards."""
        ids = self.prompt_ids(messages)
        text, shown = "", ""
        for piece in self._generate(ids, self._params(sampling), cancel):
            text += piece
            visible = self.format.visible(text).rstrip()  # trailing space may be stripped at the end: hold it
            if visible.startswith(shown) and len(visible) > len(shown):
                yield visible[len(shown):]
                shown = visible
        self.last_reply = self.format.parse_reply(text)
        if self.last_reply.content.startswith(shown) and len(self.last_reply.content) > len(shown) \
                and not self.last_reply.tool_calls:
            yield self.last_reply.content[len(shown):]

    def generate(self, prompt: str, *, cancel: Optional[threading.Event] = None, **sampling) -> str:
        """Plain completion of ``prompt`` (no chat format, no special tokens added)."""
        ids = self.engine.tokenize(prompt)
        if not ids:
            raise InputError("empty prompt")
        return "".join(self._generate(ids, self._params(sampling), cancel))

    def _params(self, overrides: dict) -> SamplingParams:
        return self.sampling.updated(**overrides) if overrides else self.sampling

    # -- the decode loop --------------------------------------------------------------------------------------
    def _generate(self, ids: list[int], params: SamplingParams, cancel: Optional[threading.Event]) -> Iterator[str]:
        engine = self.engine
        if not engine.lock.acquire(blocking=False):
            raise ModelRuntimeError("the model is busy with another generation (calls on one model are serialised: "
                                    "wait for it or cancel it)")
        try:
            yield from self._decode_loop(ids, params, cancel)
        finally:
            engine.lock.release()

    def _decode_loop(self, ids: list[int], params: SamplingParams, cancel) -> Iterator[str]:
        engine, stats = self.engine, GenerationStats(prompt_tokens=len(ids))
        self.last_stats = stats
        start = time.perf_counter()
        stats.evaluated_tokens = engine.prefill(ids, cancel=cancel)
        stats.prefill_seconds = time.perf_counter() - start
        sampler = Sampler(params)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        limit = engine.info.n_ctx - len(ids)
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        start = time.perf_counter()
        stats.finish_reason = "length"
        generated: list[int] = []
        while len(generated) < limit:
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                break
            token = sampler(engine.logits(), engine.tokens)
            if token in self.stop_ids:
                stats.finish_reason = "stop"
                break
            generated.append(token)
            text = decoder.decode(engine.token_bytes(token))
            if len(generated) < limit:
                engine.step(token)
            stats.generated_tokens = len(generated)
            stats.decode_seconds = time.perf_counter() - start
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load(path: Optional[os.PathLike | str] = None, *, n_ctx: Optional[int] = None, n_threads: Optional[int] = None,
         n_gpu_layers: int = 0, flash_attn: Optional[bool] = None, kv_type: str = "f16",
         chat_format: Optional[str] = None, on_progress=None) -> Model:
    """Load a GGUF (or, with no path, the bundled demo model) and return a :class:`Model`."""
    if path is None:
        from chatglm.demo import demo_gguf

        path = demo_gguf()
    engine = open_engine(Path(path), n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                         flash_attn=flash_attn, kv_type=kv_type, on_progress=on_progress)
    try:
        return Model(engine, chat_format=chat_format)
    except BaseException:
        engine.close()
        raise

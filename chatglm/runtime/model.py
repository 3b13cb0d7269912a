"""The Python API: ``chatglm.load(path)`` gives a :class:`Model` that chats, streams and generates.

Every family looks the same from here; the engine behind the model (llama.cpp or our GLM-1 graph) is chosen from the
GGUF's architecture. One model holds one KV cache, so it runs one generation at a time: a second call while one is
running is refused with :class:`ModelBusyError` (never queued behind it, never interleaved with it). A reply stops
within one token when its ``cancel`` event is set or :meth:`Model.stop` is called, from any thread.
"""

from __future__ import annotations

import codecs
import logging
import os
import threading
import time
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Generator, Iterator, Optional, Sequence

from chatglm.errors import Cancelled, InputError, ModelRuntimeError, UnsupportedModelError
from chatglm.runtime.engine import Engine, ModelInfo
from chatglm.runtime.generation import (Generation, GenerationStats, MessagesLike, ModelBusyError, as_conversation,
                                        drain)
from chatglm.runtime.loader import open_engine
from chatglm.runtime.messages import Message, ToolCall, declared_tools
from chatglm.runtime.jinja_chat import chat_format as make_format
from chatglm.runtime.jinja_chat import media_format
from chatglm.runtime.prompts import ChatFormat, split_options, template_options
from chatglm.runtime.sampling import SamplingParams
from chatglm.runtime.speculative import (DEFAULT_DRAFT, SpeculativeConfig, check_speculation, memory_estimate,
                                         open_drafter, plain_tokens, same_vocabulary, speculative_tokens)

if TYPE_CHECKING:  # pragma: no cover
    from chatglm.runtime.media import Media
    from chatglm.runtime.mtmd import MediaContext
    from chatglm.runtime.session import ChatSession
    from chatglm.runtime.speculative import Drafter

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


class Model:
    """A loaded model: ``chat`` / ``stream_chat`` for conversations, ``generate`` for plain text, ``session()``."""

    def __init__(self, engine: Engine, chat_format: Optional[str] = None, sampling: Optional[SamplingParams] = None,
                 load_seconds: float = 0.0):
        self.engine = engine
        info = engine.info
        self.format: ChatFormat = make_format(chat_format or info.chat_format, info.special, info.chat_template,
                                              info.added)
        self.stop_ids = frozenset(engine.info.eog) | frozenset(self.format.stop_ids())
        self.prefill_progress: Optional[Callable[[int, int], None]] = None  # (done, total) while a prompt runs
        # Special tokens whose text a format must see in the reply (GLM-4.5's tool-call markers), by id.
        self.kept_special = {engine.info.special[t]: t.encode() for t in getattr(self.format, "keep_special_text", ())
                             if t in engine.info.special}
        self.sampling = sampling or SamplingParams()
        self.load_seconds = load_seconds
        self.last_stats = GenerationStats()
        self.last_reply = Message("assistant", "")
        self._active: Optional[threading.Event] = None  # the cancel event of the running generation
        self._closed = False
        self.media: Optional["MediaContext"] = None  # libmtmd over this engine, when a projector was loaded
        self.drafter: Optional["Drafter"] = None  # speculative decoding (runtime/speculative.py), up to n_draft
        self.n_draft = 0

    def __repr__(self) -> str:
        i = self.info
        return f"<Model {i.description!r} family={i.family} format={self.format.name} n_ctx={i.n_ctx} path={i.path}>"

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    @property
    def busy(self) -> bool:
        """True while a generation holds the model."""
        return self.engine.lock.locked()

    def stop(self) -> None:
        """Stop the running generation (if any) within one token; safe to call from any thread."""
        event = self._active
        if event is not None:
            event.set()

    # -- tokens -----------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS, special-token texts are not parsed)."""
        self._check_open()
        return self.engine.tokenize(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        self._check_open()
        return self.engine.detokenize(ids)

    def prompt_ids(self, messages: MessagesLike, **options) -> list[int]:
        """The conversation as the model sees it, ending with the prompt for the assistant's reply. ``options``: the
        template options (``enable_thinking``, ``clear_thinking``, ``reasoning_effort``, ``template_kwargs={...}``)."""
        self._check_open()
        conversation = as_conversation(messages)
        fmt = self.format_for(conversation)
        with fmt.using(template_options(options)):
            return fmt.prompt_ids(conversation, self.engine)

    @cached_property
    def media_format(self) -> Optional[ChatFormat]:
        """What renders a conversation holding media: the format itself, or the template a builder stands for
        (made on first use: a text-only chat never compiles it)."""
        info = self.engine.info
        return media_format(self.format, info.special, info.chat_template, info.added)

    def format_for(self, messages: Sequence[Message]) -> ChatFormat:
        """The chat format that writes ``messages``: :attr:`media_format` when one of them holds an image or audio
        (and there is one), else :attr:`format`."""
        if any(m.media for m in messages) and self.media_format is not None:
            return self.media_format
        return self.format

    @property
    def media_kinds(self) -> frozenset[str]:
        """What the server may hand this model besides text: its projector's modality (none without one)."""
        return frozenset({self.media.info.kind.modality}) if self.media is not None else frozenset()

    def media_of(self, messages: Sequence[Message]) -> tuple["Media", ...]:
        """Every medium of the conversation, in prompt order; refused when this model cannot take them."""
        media = tuple(x for m in messages for x in m.media)
        if not media:
            return media
        if self.media is None:
            raise InputError(f"{media[0].name}: this model takes text only ({self.info.path.name} was loaded "
                             "without a projector: put mmproj-<model>.gguf beside it or name one with --mmproj)")
        modality = self.media.info.kind.modality
        for x in media:
            if x.kind != modality:
                raise InputError(f"this model's projector takes {modality}s, not {x.kind}s", x.name)
        return media

    # -- chat -------------------------------------------------------------------------------------------------
    def chat(self, messages: MessagesLike, *, cancel: Optional[threading.Event] = None, **kwargs) -> Message:
        """The assistant's reply to a conversation (a list of messages or dicts, or one user string). ``kwargs``:
        sampling settings and template options (see :meth:`prompt_ids`); the reply's thinking is in
        ``Message.thinking``, apart from its ``content``."""
        options, sampling = split_options(kwargs)
        conversation = as_conversation(messages)
        media = self.media_of(conversation)
        gen = drain(self.run(self.prompt_ids(conversation, **options), self._params(sampling), cancel, chat=True,
                             media=media, tools=declared_tools(conversation)))
        assert gen.reply is not None  # run(chat=True) always parses the reply
        return gen.reply

    def stream_chat(self, messages: MessagesLike, *, cancel: Optional[threading.Event] = None,
                    on_thinking: Optional[Callable[[str], None]] = None, **kwargs) -> Generator[str, None, Message]:
        """Yield the reply's visible text as it is generated; the parsed reply is ``last_reply`` afterwards.
        ``on_thinking(text)`` gets the reasoning as it grows (each call a new piece), apart from the answer.

        The conversation is checked now (errors are raised by this call, not by the first ``next``); the model is
        taken when iteration starts. The generator returns the reply (``chatglm.runtime.model.drain`` gives it)."""
        options, sampling = split_options(kwargs)
        conversation = as_conversation(messages)
        media = self.media_of(conversation)
        ids = self.prompt_ids(conversation, **options)
        return self._reply_of(self.stream_reply(ids, self._params(sampling), cancel, on_thinking, media,
                                                declared_tools(conversation)))

    @staticmethod
    def _reply_of(stream: Generator[str, None, Generation]) -> Generator[str, None, Message]:
        gen = yield from stream
        return gen.reply if gen.reply is not None else Message("assistant", gen.text)

    def generate(self, prompt: str | Sequence[int], *, cancel: Optional[threading.Event] = None, **sampling) -> str:
        """Plain completion of ``prompt``: text with no chat roles, framed by the special tokens the published tokenizer
        adds to any text (``[gMASK] sop`` before it for ChatGLM2/3/GLM-4, ``[gMASK] <sop>`` after it for ChatGLM-6B),
        or token ids taken as they are."""
        return "".join(self.stream_generate(prompt, cancel=cancel, **sampling))

    def stream_generate(self, prompt: str | Sequence[int], *, cancel: Optional[threading.Event] = None,
                        **sampling) -> Iterator[str]:
        """Yield the completion of ``prompt`` piece by piece (UTF-8 safe)."""
        ids = self.format.completion_ids(prompt, self.engine) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise InputError("empty prompt")
        return self.run(ids, self._params(sampling), cancel)

    def session(self, system: Optional[str] = None, *, tools: Optional[list[dict]] = None,
                **kwargs) -> "ChatSession":
        """A conversation that keeps its history and reuses the KV cache from turn to turn (``kwargs``: sampling
        settings and template options, as for :meth:`chat`)."""
        from chatglm.runtime.session import ChatSession

        options, sampling = split_options(kwargs)
        return ChatSession(self, system=system, tools=tools, sampling=self._params(sampling),
                           template_kwargs=template_options(options))

    def _params(self, overrides: dict) -> SamplingParams:
        return self.sampling.updated(**overrides) if overrides else self.sampling

    def _check_open(self) -> None:
        if self._closed:
            raise ModelRuntimeError("the model is closed")

    # -- generation -------------------------------------------------------------------------------------------
    def stream_reply(self, ids: list[int], params: SamplingParams, cancel: Optional[threading.Event],
                     on_thinking: Optional[Callable[[str], None]] = None,
                     media: Sequence["Media"] = (), tools: Sequence[dict] = ()) -> Generator[str, None, Generation]:
        """Generate a chat reply after ``ids`` (whose placeholders stand for ``media``): yield its visible text,
        return the :class:`Generation`; the thinking goes to ``on_thinking`` piece by piece (markers never
        half-written); ``tools`` are the conversation's, which type the reply's call arguments."""
        raw = self.run(ids, params, cancel, chat=True, media=media, tools=tools)
        text = shown = thought = ""
        thinking_of = getattr(self.format, "visible_thinking", None) if on_thinking is not None else None
        try:
            while True:
                text += next(raw)
                if thinking_of is not None:
                    thought = _relay_growth(thinking_of(text), thought, on_thinking)
                visible = self.format.visible(text).rstrip()  # trailing space may be stripped at the end: hold it
                if len(visible) > len(shown) and visible.startswith(shown):
                    yield visible[len(shown):]
                    shown = visible
        except StopIteration as done:
            gen: Generation = done.value
        finally:
            raw.close()
        reply = gen.reply
        if thinking_of is not None and reply is not None:
            _relay_growth(reply.thinking, thought, on_thinking)
        if reply is not None and not reply.tool_calls and reply.content.startswith(shown) \
                and len(reply.content) > len(shown):
            yield reply.content[len(shown):]
        return gen

    def run(self, ids: list[int], params: SamplingParams, cancel: Optional[threading.Event] = None, *,
            chat: bool = False, media: Sequence["Media"] = (),
            tools: Sequence[dict] = ()) -> Generator[str, None, Generation]:
        """The generation behind every method: yield raw text pieces after ``ids``, return the :class:`Generation`.

        The model is taken when the generator starts and given back when it ends or is closed."""
        self._check_open()
        engine = self.engine
        if not engine.lock.acquire(blocking=False):
            raise ModelBusyError("the model is busy with another generation (one model runs one generation at a "
                                 "time: wait for it, stop it, or load a second model)")
        event = cancel if cancel is not None else threading.Event()
        self._active = event
        try:
            gen = yield from self._decode(ids, params, event, media)
            if chat:
                gen.reply = self.last_reply = self.format.parse_reply(gen.text, tools)
            return gen
        finally:
            self._active = None
            engine.lock.release()

    def _decode(self, ids: list[int], params: SamplingParams, cancel: threading.Event,
                media: Sequence["Media"] = ()) -> Generator[str, None, Generation]:
        engine, stop_ids = self.engine, self.stop_ids
        stats = GenerationStats(prompt_tokens=len(ids))
        gen = Generation(list(ids), stats=stats)
        self.last_stats = stats
        start = time.perf_counter()
        try:
            if media:
                assert self.media is not None  # media_of refused them otherwise
                stats.evaluated_tokens = self.media.prefill(ids, media, cancel=cancel, progress=self.prefill_progress)
            else:
                stats.evaluated_tokens = engine.prefill(ids, cancel=cancel, progress=self.prefill_progress)
        except Cancelled:
            stats.finish_reason, stats.prefill_seconds = "cancelled", time.perf_counter() - start
            return gen
        started = time.perf_counter()
        stats.prefill_seconds = started - start
        limit = engine.info.n_ctx - len(engine.tokens) - engine.extra_cells  # a medium takes more entries than ids
        if params.max_tokens is not None:
            limit = min(limit, params.max_tokens)
        sample, token_bytes, kept = engine.sampler(params), engine.token_bytes, self.kept_special
        decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        out, pieces, reason = gen.tokens, [], "length"
        tokens = self._tokens(sample, limit, stats)
        try:
            while len(out) < limit:
                if cancel.is_set():
                    reason = "cancelled"
                    break
                try:
                    token = next(tokens)  # evaluates the token before (its logits sampled this one)
                except Cancelled:
                    reason = "cancelled"
                    break
                if token in stop_ids:
                    reason = "stop"
                    break
                out.append(token)
                text = decode(kept.get(token) or token_bytes(token))
                if text:
                    pieces.append(text)
                    yield text
            tail = decode(b"", final=True)
            if tail:
                pieces.append(tail)
                yield tail
        except (GeneratorExit, KeyboardInterrupt):  # the consumer stopped iterating, or Ctrl-C
            reason = "cancelled"
            raise
        finally:
            tokens.close()
            sample.close()
            stats.finish_reason, stats.generated_tokens = reason, len(out)
            stats.decode_seconds = time.perf_counter() - started
            gen.text = "".join(pieces)
        return gen

    def _tokens(self, sample, limit: int, stats: GenerationStats) -> Iterator[int]:
        """The generated tokens, one evaluation each, or several when drafts are verified (runtime/speculative.py)."""
        if self.drafter is None or not self.n_draft:
            return plain_tokens(self.engine, sample)
        return speculative_tokens(self.engine, sample, self.drafter, self.n_draft, limit, self.stop_ids, stats)

    # -- lifetime ---------------------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> None:
        """Stop any running generation, wait for it to end, and free the model."""
        if self._closed:
            return
        self.stop()
        if not self.engine.lock.acquire(timeout=timeout):
            raise ModelBusyError("cannot close the model: a generation is still holding it (close or exhaust its "
                                 "stream first)")
        try:
            self._closed = True
            if self.media is not None:
                self.media.close()
            if self.drafter is not None:
                self.drafter.close()
            self.engine.close()
        finally:
            self.engine.lock.release()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_media(engine: Engine, projector, n_threads: Optional[int]) -> "MediaContext":
    from chatglm.runtime.llama_engine import LlamaEngine
    from chatglm.runtime.llama_native import physical_cores
    from chatglm.runtime.mtmd import MediaContext

    if not isinstance(engine, LlamaEngine):
        raise InputError(f"{engine.info.arch} models run on their own engine, which takes no projector",
                         projector.path)
    from chatglm.families.glm_asr import ROPE_PROJECTOR

    if projector.projector_type == ROPE_PROJECTOR:  # GLM-ASR's rotary encoders: our own graph, not libmtmd
        from chatglm.runtime.glmasr.context import AudioContext

        return AudioContext(engine, projector, n_threads=n_threads or physical_cores())
    return MediaContext(engine, projector, n_threads=n_threads or physical_cores())


def check_draft_model(path: Path, spec: SpeculativeConfig) -> None:
    """A draft model's file must be one this tool runs, with the model's vocabulary; MTP drafting needs an MTP
    layer llama.cpp's graph can run (both checked before anything loads)."""
    from chatglm.gguf_file import read_header
    from chatglm.runtime.loader import validate

    if spec.mtp:
        from chatglm.runtime.speculative_mtp import check_mtp

        check_mtp(read_header(path))
    if spec.draft is not None:
        draft = read_header(Path(spec.draft))
        validate(draft)
        same_vocabulary(read_header(path), draft)


def speculation_memory(path: Path, spec: SpeculativeConfig, n_ctx: Optional[int], kv_type: str,
                       flash_attn: Optional[bool]) -> int:
    """The memory a draft model or the MTP context holds beside the model (not its mapped weights), so that the
    fit check before loading counts it."""
    from chatglm.gguf_file import read_header
    from chatglm.runtime.memory import default_context

    header = read_header(path)
    ctx = n_ctx or default_context(header, kv_type)
    return memory_estimate(header, spec, ctx, kv_type, flash_attn is not False).resident


def _relay_growth(now: str, before: str, sink: Callable[[str], None]) -> str:
    """Send what ``now`` adds to ``before`` (when it only grows); returns what has been sent."""
    if len(now) > len(before) and now.startswith(before):
        sink(now[len(before):])
        return now
    return before


def load(path: os.PathLike | str, *, n_ctx: Optional[int] = None, n_threads: Optional[int] = None,
         n_gpu_layers: int = 0, flash_attn: Optional[bool] = None, kv_type: str = "f16",
         chat_format: Optional[str] = None, sampling: Optional[SamplingParams] = None,
         on_progress: Optional[ProgressCallback] = None,
         lora: Sequence[tuple[os.PathLike | str, float]] = (),
         mmproj: Optional[os.PathLike | str] = None, rpc: Sequence[str] = (),
         tensor_split: Sequence[float] | str = (), lookup: int = 0, draft: Optional[os.PathLike | str] = None,
         draft_max: int = DEFAULT_DRAFT, mtp: bool = False, adaptive: bool = True) -> Model:
    """Load a GGUF and return a :class:`Model` (``chatglm.load``, :mod:`chatglm.api`, adds the demo model).

    ``n_ctx`` defaults to the model's training context capped at 4096; ``n_threads`` to the physical cores;
    ``n_gpu_layers`` layers are offloaded (-1: all); ``on_progress(done, total)`` is called while loading;
    ``lora`` lists (adapter GGUF, scale) pairs applied at run time (llama.cpp engine); the projector of a
    multimodal model (``mmproj``, by default ``mmproj-<stem>.gguf`` beside it) is checked against the model before
    the engine loads and then opened with libmtmd; ``rpc`` (``host:port`` of ``chatglm rpc-server`` processes)
    splits the model over those servers by ``tensor_split``, the engine in a worker process (text only). Speculative decoding (docs/speculative.md): ``lookup=N`` drafts up
    to N tokens by prompt lookup, ``draft`` is a small GGUF with the same vocabulary drafting up to ``draft_max``,
    ``mtp=True`` lets the model's own MTP layer draft one token a step; ``adaptive`` drafts only as many as pay.
    """
    from chatglm.runtime.mtmd import check_projector, find_projector, projector_estimate

    start = time.perf_counter()
    projector_path = find_projector(Path(path), Path(mmproj) if mmproj is not None else None)
    projector = None
    if projector_path is not None and rpc:  # libmtmd needs the model in this process
        if mmproj is not None:
            raise InputError("a model split over RPC servers takes text only: run it without --rpc to use its "
                             "projector", projector_path)
        log.warning("%s: not used: a model split over RPC servers takes text only", projector_path)
        projector_path = None
    if projector_path is not None:
        from chatglm.gguf_file import read_header

        projector = check_projector(projector_path, read_header(Path(path)))
    extra = projector_estimate(Path(path), projector.path).total if projector is not None else 0
    spec: Optional[SpeculativeConfig] = SpeculativeConfig(
        lookup=lookup, draft=Path(draft) if draft is not None else None, draft_max=draft_max, mtp=mtp,
        adaptive=adaptive)
    spec = spec if spec.enabled else None
    if spec is not None and rpc:
        raise UnsupportedModelError("speculative decoding does not run over RPC yet: give --rpc or "
                                    "--lookup/--draft/--mtp, not both", Path(path))
    if spec is not None:
        check_draft_model(Path(path), spec)
        extra += speculation_memory(Path(path), spec, n_ctx, kv_type, flash_attn)
    engine = open_engine(Path(path), n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                         flash_attn=flash_attn, kv_type=kv_type, on_progress=on_progress, extra_memory=extra,
                         rpc=rpc, tensor_split=tensor_split, n_rollback=spec.n_max if spec is not None else 0,
                         load_mtp=spec is not None and spec.mtp)
    model = None
    try:
        engine.apply_lora([(Path(p), float(scale)) for p, scale in lora])
        model = Model(engine, chat_format=chat_format, sampling=sampling,
                      load_seconds=time.perf_counter() - start)
        if projector is not None:
            model.media = open_media(engine, projector, n_threads)
        if spec is not None:
            check_speculation(engine, spec)
            model.drafter, model.n_draft = open_drafter(engine, spec, lambda draft: open_engine(
                draft, n_ctx=engine.info.n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                kv_type=kv_type, n_rollback=spec.draft_max)), spec.n_max
    except BaseException:
        if model is not None and model.media is not None:
            model.media.close()
        engine.close()
        raise
    log.info("loaded %s (%s, %s format, n_ctx %d) in %.2f s", path, model.info.family, model.format.name,
             model.info.n_ctx, model.load_seconds)
    return model


__all__ = ["Generation", "GenerationStats", "Message", "Model", "ModelBusyError", "SamplingParams", "ToolCall",
           "as_conversation", "load"]

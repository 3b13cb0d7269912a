"""A conversation that keeps its history and the KV cache: each turn evaluates only the tokens it adds.

After a reply, the cache holds the prompt plus the reply's tokens exactly as they were generated. The next turn's prompt
is those tokens plus the ids the chat format puts after a reply (the end of the assistant turn, the new user message,
the prompt for the next reply), so nothing already evaluated is evaluated again. Those ids are found generically, by
comparing the format's prompt for the history with the prompt for the same history with the reply emptied. Where a
format does not split that cleanly (ChatGLM2's single-string rounds can merge a reply's last character with what
follows; ChatGLM-6B puts the conversation before ``[gMASK]``) or writes a past reply differently from how it was
generated (GLM-4.5 drops old thinking), the turn uses the format's own prompt and the engine keeps the common prefix.

When the conversation outgrows the context, the oldest whole rounds are dropped (system messages stay) and
``on_truncate`` is called with the number of messages dropped.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable, Generator, Optional, Sequence

from chatglm.errors import ContextOverflowError, InputError
from chatglm.fsutil import atomic_output
from chatglm.runtime.chatfiles import conversation_bytes, read_conversation
from chatglm.runtime.generation import (Generation, GenerationStats, MessagesLike, ModelBusyError, as_conversation,
                                        drain)
from chatglm.runtime.messages import TOOLS_SYSTEM, Message, declared_tools
from chatglm.runtime.sampling import SamplingParams

if TYPE_CHECKING:  # pragma: no cover
    from chatglm.runtime.model import Model
    from chatglm.runtime.prompts import ChatFormat

log = logging.getLogger(__name__)


def common_suffix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(1, n + 1):
        if a[-i] != b[-i]:
            return i - 1
    return n


def system_message(text: Optional[str], tools: Optional[list[dict]]) -> Optional[Message]:
    """The system message for ``text`` and ``tools`` (ChatGLM3's tool preamble when only tools are given)."""
    if tools is not None and not isinstance(tools, list):
        raise InputError(f"tools must be a list of tool descriptions, got {type(tools).__name__}")
    if tools:
        return Message("system", text if text else TOOLS_SYSTEM, tools=list(tools))
    return Message("system", text) if text else None


@dataclass
class _Cached:
    """The tokens of the conversation through its last reply, as the model saw and generated them."""

    tokens: list[int]
    n_messages: int  # the history length those tokens stand for (the last message is the reply)
    n_reply: int  # how many of the tokens the model generated (the reply, at the end)
    fmt: Optional["ChatFormat"] = None  # the format that wrote them (a conversation with media may take another)


class ChatSession:
    """A chat with history. ``chat`` / ``stream_chat`` take the next user text (or messages) and return the reply."""

    def __init__(self, model: "Model", *, system: Optional[str] = None, tools: Optional[list[dict]] = None,
                 messages: Sequence[Message] = (), sampling: Optional[SamplingParams] = None,
                 on_truncate: Optional[Callable[[int], None]] = None, template_kwargs: Optional[dict] = None):
        from chatglm.runtime.prompts import template_options

        self.model = model
        self.template_kwargs = template_options({"template_kwargs": template_kwargs or {}})  # for every turn
        self.sampling = sampling or model.sampling
        self.on_truncate = on_truncate
        self.dropped_messages = 0  # dropped so far to fit the context
        self.last_reply: Optional[Message] = None
        self._messages: list[Message] = []
        self._cached: Optional[_Cached] = None
        self._version = 0  # bumped by every change of the conversation
        self._lock = threading.Lock()
        sys_msg = system_message(system, tools)
        self.reset([sys_msg, *messages] if sys_msg else list(messages))

    # -- state ------------------------------------------------------------------------------------------------
    @property
    def messages(self) -> list[Message]:
        """A copy of the conversation so far."""
        return list(self._messages)

    @property
    def system(self) -> Optional[Message]:
        return next((m for m in self._messages if m.role == "system"), None)

    @property
    def tools(self) -> Optional[list[dict]]:
        sys_msg = self.system
        return sys_msg.tools if sys_msg is not None else None

    @property
    def last_stats(self) -> GenerationStats:
        return self.model.last_stats

    @property
    def tokens(self) -> list[int]:
        """The conversation's tokens through the last reply as the model saw them (empty before the first)."""
        return list(self._cached.tokens) if self._cached else []

    def reset(self, messages: Sequence[Message]) -> None:
        self._messages = list(messages)
        self._cached = None
        self._version += 1

    def clear(self) -> None:
        """Start a new conversation, keeping the system message."""
        sys_msg = self.system
        self.reset([sys_msg] if sys_msg else [])

    def set_system(self, text: Optional[str], tools: Optional[list[dict]] = None) -> None:
        """Replace the system message (``None`` and no tools removes it); the rest of the history stays."""
        sys_msg = system_message(text, tools)
        rest = [m for m in self._messages if m.role != "system"]
        self.reset([sys_msg, *rest] if sys_msg else rest)

    # -- turns ------------------------------------------------------------------------------------------------
    def chat(self, content: MessagesLike, *, cancel: Optional[threading.Event] = None, **kwargs) -> Message:
        """Send a user message (or messages, e.g. an observation) and return the reply (``kwargs``: sampling
        settings and template options for this turn)."""
        return drain(self.stream_chat(content, cancel=cancel, **kwargs))

    def send(self, text: str, *, images: Sequence = (), audio: Sequence = (), stream: bool = False,
             cancel: Optional[threading.Event] = None, **kwargs):
        """Send one user message with ``images`` / ``audio`` (paths or bytes) attached: the reply, or with
        ``stream=True`` a generator of its visible text (as :meth:`stream_chat`)."""
        from chatglm.runtime.media import load_media

        media = tuple(load_media(x, "image") for x in images) + tuple(load_media(x, "audio") for x in audio)
        message = Message("user", text, media=media)
        self.model.media_of([message])  # refused now, before the first next()
        gen = self.stream_chat([message], cancel=cancel, **kwargs)
        return gen if stream else drain(gen)

    def stream_chat(self, content: MessagesLike, *, cancel: Optional[threading.Event] = None,
                    on_thinking: Optional[Callable[[str], None]] = None,
                    **kwargs) -> Generator[str, None, Message]:
        """Send a user message (or messages) and yield the reply's visible text; ``last_reply`` afterwards (its
        thinking apart, in ``thinking``, and piece by piece to ``on_thinking``)."""
        from chatglm.runtime.prompts import split_options, template_options

        new = as_conversation(content)
        if not new:
            raise InputError("nothing to send: give a message")
        options, sampling = split_options(kwargs)
        options = {**self.template_kwargs, **template_options(options)}
        params = self.sampling.updated(**sampling) if sampling else self.sampling
        prompt = self._prompt(new, params, options)  # checks the messages now, not at the first next()
        return self._turn(new, params, cancel, self._version, prompt, options, on_thinking)

    def _turn(self, new: list[Message], params: SamplingParams, cancel: Optional[threading.Event], version: int,
              prompt: tuple[list[int], list[Message], int], options: dict,
              on_thinking: Optional[Callable[[str], None]]) -> Generator[str, None, Message]:
        if not self._lock.acquire(blocking=False):
            raise ModelBusyError("this chat session is already answering (one turn at a time)")
        try:
            if version != self._version:  # the conversation moved on between the call and the first next()
                prompt = self._prompt(new, params, options)
            ids, kept, dropped = prompt
            media = self.model.media_of(kept + new)
            gen = yield from self.model.stream_reply(ids, params, cancel, on_thinking, media,
                                                     declared_tools(kept + new))
            return self._commit(gen, kept, new, dropped)
        finally:
            self._lock.release()

    def _commit(self, gen: Generation, kept: list[Message], new: list[Message], dropped: int) -> Message:
        """Record a finished turn (a reply cancelled before its first token leaves the conversation as it was)."""
        reply = gen.reply or Message("assistant", "")
        self.last_reply = reply
        if gen.stats.finish_reason == "cancelled" and not gen.tokens:
            return reply
        if dropped:
            self.dropped_messages += dropped
            log.info("the conversation outgrew the context of %d tokens: dropped its %d oldest messages",
                     self.model.info.n_ctx, dropped)
            if self.on_truncate is not None:
                self.on_truncate(dropped)
        self._messages = kept + new + [reply]
        media = self.model.media
        # a reply holding the media placeholder token would pass for a medium next turn: render it again instead
        reusable = media is None or media.placeholder_id not in gen.tokens
        self._cached = _Cached(gen.prompt + gen.tokens, len(self._messages), len(gen.tokens),
                               self.model.format_for(self._messages)) if reusable else None
        self._version += 1
        return reply

    # -- prompts ----------------------------------------------------------------------------------------------
    def _prompt(self, new: list[Message], params: SamplingParams,
                options: dict) -> tuple[list[int], list[Message], int]:
        """The ids for this turn, the history they keep, and how many old messages were dropped to fit."""
        fmt = self.model.format_for(self._messages + new)  # one format for the whole turn (media or not)
        with fmt.using(options):
            return self._prompt_now(fmt, new, params)

    def _prompt_now(self, fmt: "ChatFormat", new: list[Message],
                    params: SamplingParams) -> tuple[list[int], list[Message], int]:
        n_ctx = self.model.info.n_ctx
        room = min(params.max_tokens if params.max_tokens is not None else n_ctx // 4, n_ctx // 2)
        tail = self._continuation(fmt, new)
        if tail is not None and len(self._cached.tokens) + len(tail) + room <= n_ctx:
            return self._cached.tokens + tail, list(self._messages), 0
        kept = list(self._messages)
        tok = self.model.engine
        ids = fmt.prompt_ids(kept + new, tok)
        while len(ids) + room > n_ctx and drop_round(kept, keep_last=new[0].role == "observation"):
            ids = fmt.prompt_ids(kept + new, tok)
        if len(ids) >= n_ctx:
            raise ContextOverflowError(f"the message needs {len(ids)} tokens with the system prompt, more than the "
                                       f"context of {n_ctx} tokens")
        return ids, kept, len(self._messages) - len(kept)

    def _continuation(self, fmt: "ChatFormat", new: list[Message]) -> Optional[list[int]]:
        """The ids ``fmt`` puts after the last reply to continue with ``new``, or None (see the module doc)."""
        cached, history = self._cached, self._messages
        if cached is None or cached.n_messages != len(history) or history[-1].role != "assistant":
            return None
        tok = self.model.engine
        blank_reply = replace(history[-1], content="", tool_calls=[], thinking="")
        try:
            before = fmt.prompt_ids(history[:-1], tok)  # the previous turn's prompt, as the format writes it
            full = fmt.prompt_ids(history + new, tok)
            blank = fmt.prompt_ids(history[:-1] + [blank_reply] + new, tok)
        except InputError:
            return None
        n = len(before)
        if full[:n] != before or blank[:n] != before or cached.fmt is not fmt:
            return None
        k = min(common_suffix(full, blank), len(blank) - n)
        head = blank[n:len(blank) - k]  # what opens the reply (its metadata line): generated by the model itself
        if not k or full[n:n + len(head)] != head:
            return None
        # The format must write the reply back as it was generated (GLM-4.5 drops old thinking, for one).
        generated = cached.tokens[len(cached.tokens) - cached.n_reply:]
        if tok.detokenize(generated).strip() != tok.detokenize(full[n:len(full) - k]).strip():
            return None
        return full[len(full) - k:]

    # -- files ------------------------------------------------------------------------------------------------
    def save(self, path: os.PathLike | str) -> None:
        """Write the conversation as JSON (``{"kind": "chatglm-conversation", "version": 1, "messages": [...]}``;
        images and audio by path and sha256, or inline when given as bytes: :mod:`chatglm.runtime.chatfiles`)."""
        data = conversation_bytes(self._messages, self.model.info.description, path)
        with atomic_output(path, sources=[self.model.info.path]) as fh:  # renamed at the end; never over the model
            fh.write(data)

    def load(self, path: os.PathLike | str) -> None:
        """Replace the conversation with one saved by :meth:`save` (or a JSON list of messages).

        The messages must be ones this model's chat format can continue with a user message; their media (each file
        read again and checked against its sha256) ones it takes."""
        messages = read_conversation(path)
        try:
            self.model.media_of(messages)
        except InputError as exc:
            raise InputError(exc.problem, path) from None
        if messages:
            try:
                self.model.prompt_ids(messages + [Message("user", "")])
            except InputError as exc:
                raise InputError(f"this conversation does not fit the {self.model.format.name} chat format: "
                                 f"{exc.problem}", path) from None
        self.reset(messages)


def drop_round(messages: list[Message], *, keep_last: bool = False) -> bool:
    """Remove the oldest round (a user message and everything up to the next one); system messages stay."""
    starts = [i for i, m in enumerate(messages) if m.role == "user"]
    first = next((i for i, m in enumerate(messages) if m.role != "system"), None)
    if first is None or (keep_last and len(starts) <= 1):
        return False
    end = next((i for i in starts if i > first), len(messages))
    del messages[first:end]
    return True

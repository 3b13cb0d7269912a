"""Chat prompts as token ids, exactly as each family's published tokenizer builds them.

Each format turns a list of messages into ids (ending with the generation prompt) and turns the generated text back
into an assistant :class:`Message`. This module holds the base class and the helpers formats share; the formats
themselves live in their family's ``chatglm/families/<name>/chat.py`` (``FORMATS``). The GGUF's ``glm.chat_format``
(or its architecture and special tokens) picks one. Text pieces are tokenized separately where the reference does so, since tokenizing the
joined string gives different ids.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, ClassVar, Iterator, Optional, Protocol, Sequence

from chatglm import families
from chatglm.errors import InputError
from chatglm.runtime.messages import Message
from chatglm.schema import keys


class Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[int]: ...


class ChatFormat(ABC):
    name: ClassVar[str]
    required_tokens: ClassVar[tuple[str, ...]] = ()  # special tokens the vocab must have
    stop_tokens: ClassVar[tuple[str, ...]] = ()  # end a reply, besides the vocab's eos

    # Whether the template takes tools in OpenAI's shape ({"type": "function", "function": {...}}) and writes them as
    # given (GLM-4.5 and later, the Jinja path), rather than bare functions (ChatGLM3's tool prompt).
    openai_tools: ClassVar[bool] = False
    # Whether the format stands for a Jinja chat template the checkpoint ships (GLM-4.5 and later), so that a GGUF
    # carrying another template is better served by rendering that one (the sandboxed path) than by this builder.
    renders_template: ClassVar[bool] = False
    # Whether prompt_ids writes each medium of a message (its placeholder token) where it stands; a format that
    # does not leaves conversations with media to the checkpoint's template (``jinja_chat.media_format``).
    places_media: ClassVar[bool] = False
    # Template options the format reads (``enable_thinking``, ``clear_thinking``, ``reasoning_effort``); the others
    # ignore them, as their templates do.
    option_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, special: dict[str, int]):
        missing = [t for t in self.required_tokens if t not in special]
        if missing:
            raise InputError(f"the model's vocabulary lacks the {self.name} special tokens {', '.join(missing)}")
        self.special = special
        self.options: dict[str, Any] = {}  # template options (None or absent: the template's default)

    @contextmanager
    def using(self, options: Optional[dict[str, Any]]) -> Iterator["ChatFormat"]:
        """These template options (over the format's own) for the prompts built inside the block."""
        saved = self.options
        if options:
            self.options = {**saved, **check_options(options)}
        try:
            yield self
        finally:
            self.options = saved

    def option(self, name: str, default: Any = None) -> Any:
        value = self.options.get(name)
        return default if value is None else value

    def sp(self, token: str) -> int:
        return self.special[token]

    def stop_ids(self) -> set[int]:
        return {self.special[t] for t in self.stop_tokens if t in self.special}

    @abstractmethod
    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        """Ids of the whole conversation, ending with the prompt for the assistant's next reply."""

    # Special tokens the published tokenizer puts around any encoded text (tokenizer(text), add_special_tokens=True).
    completion_prefix: ClassVar[tuple[str, ...]] = ()
    completion_suffix: ClassVar[tuple[str, ...]] = ()

    def completion_ids(self, text: str, tok: Tokenizer) -> list[int]:
        """Plain text as the published model takes it for completion: its special prefix/suffix, no chat roles."""
        pre = [self.special[t] for t in self.completion_prefix if t in self.special]
        post = [self.special[t] for t in self.completion_suffix if t in self.special]
        body = tok.tokenize(text)
        return pre + body + post if body else []

    def parse_reply(self, text: str, tools: Sequence[Any] = ()) -> Message:
        """The generated text (special tokens removed) as an assistant message; ``tools`` (the conversation's
        declared tools) type the arguments of the calls it makes where a format writes them untyped."""
        return Message("assistant", text.strip())

    def visible(self, text: str) -> str:
        """The part of a partial reply to show while streaming (a prefix of the final content)."""
        return text.lstrip()


def get_format(name: str, special: dict[str, int]) -> ChatFormat:
    """The chat format called ``name`` for a vocabulary with these special tokens; it comes from the ``chat.py`` of the
    family that defines it (loaded on first use). (``jinja_chat.chat_format`` adds the sandboxed Jinja path.)"""
    return format_class(name)(special)


def format_class(name: str) -> type[ChatFormat]:
    """The class of chat format ``name``, from the ``chat.py`` of the family that defines it."""
    owner = families.owner_of_format(name)
    if owner is None:
        known = ", ".join(sorted((*families.chat_formats(), keys.JINJA_CHAT_FORMAT)))
        raise InputError(f"unknown chat format {name!r}; known: {known}")
    return next(cls for cls in families.part(owner.name, "chat").FORMATS if cls.name == name)


REASONING_EFFORTS = ("low", "high", "max")
TEMPLATE_OPTIONS = ("enable_thinking", "clear_thinking", "reasoning_effort")  # the options GLM templates read
RESERVED_OPTIONS = ("messages", "tools", "documents", "add_generation_prompt")  # what every render is given


def check_options(options: dict[str, Any]) -> dict[str, Any]:
    """Template options as the API, CLI and server give them, checked: booleans and a reasoning effort."""
    if not isinstance(options, dict):
        raise InputError(f"template options must be an object, got {type(options).__name__}")
    out = {}
    for key, value in options.items():
        if value is None:
            continue
        if key in ("enable_thinking", "clear_thinking"):
            if not isinstance(value, bool):
                raise InputError(f"{key} must be true or false, got {value!r}")
        elif key == "reasoning_effort":
            if value not in REASONING_EFFORTS:
                raise InputError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {value!r}")
        elif not isinstance(key, str) or not NAME.fullmatch(key):
            raise InputError(f"a template option needs a name, got {key!r}")
        elif key in RESERVED_OPTIONS:
            raise InputError(f"{key} is not a template option (the conversation sets it)")
        elif not isinstance(value, (bool, int, float, str)):
            raise InputError(f"template option {key} must be a boolean, number or string")
        out[key] = value
    return out


def template_options(options: dict) -> dict:
    """``enable_thinking=...``, ``reasoning_effort=...``, ``clear_thinking=...`` and ``template_kwargs={...}`` as one
    dict of template options (the named ones win)."""
    extra = options.get("template_kwargs")
    if extra is not None and not isinstance(extra, dict):
        raise InputError(f"template_kwargs must be a dict, got {type(extra).__name__}")
    out = dict(extra or {})
    out.update({k: v for k, v in options.items() if k != "template_kwargs" and v is not None})
    return check_options(out)


def split_options(kwargs: dict) -> tuple[dict, dict]:
    """(template options, sampling settings) of a chat call's keyword arguments."""
    options = {k: kwargs[k] for k in (*TEMPLATE_OPTIONS, "template_kwargs") if k in kwargs}
    return options, {k: v for k, v in kwargs.items() if k not in options}



def check_roles(messages: Sequence[Message], allowed: Sequence[str], fmt: str) -> None:
    if not messages:
        raise InputError("empty conversation: give at least one user message")
    for m in messages:
        if m.role not in allowed:
            raise InputError(f"the {fmt} chat format has no {m.role!r} role (allowed: {', '.join(allowed)})")
    if messages[-1].role not in ("user", "observation"):
        raise InputError("the conversation must end with a user (or observation) message")


def rounds_of(messages: Sequence[Message], model: str = "ChatGLM-6B") -> tuple[list[tuple[str, str]], str]:
    """(past (query, reply) rounds, the new query) of a user/assistant conversation ([Round N] formats)."""
    rounds, pending = [], None
    for m in messages:
        if m.role == "user":
            if pending is not None:
                raise InputError(f"two user messages in a row: {model} needs user/assistant rounds")
            pending = m.content
        else:
            if pending is None:
                raise InputError("an assistant message must follow a user message")
            rounds.append((pending, m.content))
            pending = None
    if pending is None:
        raise InputError("the conversation must end with a user message")
    return rounds, pending


NAME = re.compile(r"[A-Za-z_][\w.\-]*")  # a tool name (or ``interpreter``): the metadata line of a tool call


def is_name(line: str) -> bool:
    return bool(NAME.fullmatch(line.strip()))


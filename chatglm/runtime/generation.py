"""What a model and a chat session both use: a generation's outcome and stats, conversations from loose input,
and the busy error. Kept apart from :mod:`chatglm.runtime.model` so that :mod:`chatglm.runtime.session` needs no
import of the model module at run time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generator, Iterable, Optional, TypeVar, Union

from chatglm.errors import InputError, ModelRuntimeError
from chatglm.runtime.messages import Message, as_messages

MessagesLike = Union[str, Message, dict, Iterable[Union[Message, dict]]]
T = TypeVar("T")


class ModelBusyError(ModelRuntimeError):
    """The model is already generating (one model runs one generation at a time)."""


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    evaluated_tokens: int = 0  # prompt tokens actually run (the rest came from the KV cache)
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop", "length" or "cancelled"
    drafted_tokens: int = 0  # speculative decoding: tokens drafted, drafts accepted, batches verified
    accepted_tokens: int = 0
    verifications: int = 0
    draft_lengths: dict[int, int] = field(default_factory=dict)  # tokens drafted for a step -> steps (0: none)

    @property
    def cached_tokens(self) -> int:
        return self.prompt_tokens - self.evaluated_tokens

    @property
    def prefill_tps(self) -> float:
        return self.evaluated_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def acceptance(self) -> float:
        """The share of drafted tokens the model accepted (0 when nothing was drafted)."""
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def decode_tps(self) -> float:
        return self.generated_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Generation:
    """One finished generation: the prompt ids, the ids produced (a stop token excluded), their text, the stats."""

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)
    reply: Optional[Message] = None  # the parsed reply, for chat generations


def as_conversation(messages: MessagesLike) -> list[Message]:
    """A conversation from messages or dicts; a bare string or a single message is a one-message conversation."""
    if isinstance(messages, str):
        return [Message("user", messages)]
    if isinstance(messages, (Message, dict)):
        return as_messages([messages])
    try:
        items = list(messages)
    except TypeError:
        raise InputError(f"messages must be a list of messages, got {type(messages).__name__}") from None
    return as_messages(items)


def drain(stream: Generator[str, None, T]) -> T:
    """Run a generation to its end and return what it returned."""
    try:
        while True:
            next(stream)
    except StopIteration as done:
        return done.value

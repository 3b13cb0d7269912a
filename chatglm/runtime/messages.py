"""Chat messages and tool calls: the typed values the API, the CLI and the server exchange."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

if TYPE_CHECKING:
    from chatglm.runtime.media import Media

ROLES = ("system", "user", "assistant", "observation")
ROLE_ALIASES = {"tool": "observation", "function": "observation"}
# The system text sessions and the server give a tool list that comes without one (ChatGLM3's published preamble).
TOOLS_SYSTEM = "Answer the following questions as best as you can. You have access to the following tools:"


@dataclass
class ToolCall:
    name: str
    arguments: Any  # parsed JSON (usually a dict); never evaluated code
    id: str = field(default="", compare=False)  # the OpenAI tool-call id, when given (results name it: tool_call_id)


@dataclass
class Message:
    role: str
    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    metadata: str = ""  # ChatGLM3's text after the role token (a tool name, "interpreter", ...)
    tools: Optional[list[dict]] = None  # on a system message: the tools the model may call
    thinking: str = ""  # GLM-Z1 / GLM-4.5 <think> text, kept apart from the answer
    tool_call_id: str = ""  # on a tool result: the id of the call it answers (GLM-5.3-Flash orders results by it)
    media: tuple["Media", ...] = ()  # images and audio of this message, in order, each at its ``offset`` in the text

    @classmethod
    def from_dict(cls, data: dict) -> "Message":
        from chatglm.errors import InputError

        if not isinstance(data, dict):
            raise InputError(f"a message must be an object with 'role' and 'content', got {type(data).__name__}")
        role = ROLE_ALIASES.get(str(data.get("role")), data.get("role"))
        if role not in ROLES:
            raise InputError(f"unknown message role {data.get('role')!r}; expected one of {', '.join(ROLES)}, tool")
        content = data.get("content") or ""
        media: tuple = ()
        if isinstance(content, list):
            content, media = content_parts(content)
        if not isinstance(content, str):
            raise InputError(f"message content must be a string or a list of parts, got {type(content).__name__}")
        calls = [ToolCall(str(c.get("name", "")), c.get("arguments", {}), str(c.get("id") or ""))
                 for c in data.get("tool_calls") or [] if isinstance(c, dict)]
        tools = data.get("tools")
        thinking = data.get("thinking") or data.get("reasoning_content") or ""
        return cls(role=role, content=content, tool_calls=calls, metadata=str(data.get("metadata") or ""),
                   tools=tools if isinstance(tools, list) else None, thinking=str(thinking),
                   tool_call_id=str(data.get("tool_call_id") or ""), media=media)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [{"name": c.name, "arguments": c.arguments, **({"id": c.id} if c.id else {})}
                                 for c in self.tool_calls]
        if self.metadata:
            out["metadata"] = self.metadata
        if self.tools is not None:
            out["tools"] = self.tools
        if self.thinking:
            out["thinking"] = self.thinking
        if self.tool_call_id:
            out["tool_call_id"] = self.tool_call_id
        return out


def content_parts(parts: list) -> tuple[str, tuple]:
    """transformers' content parts: ``{"type": "text", "text": ...}`` joined, ``{"type": "image", "image": path or
    bytes}`` (and ``"audio"``) loaded and checked, each medium at its place among the texts (``Media.offset``)."""
    from chatglm.errors import InputError
    from chatglm.runtime.media import KINDS, load_media

    texts, media = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in KINDS and isinstance(part.get(kind), (str, bytes, os.PathLike)):
            media.append(replace(load_media(part[kind], kind), offset=sum(map(len, texts))))
        else:
            raise InputError(f"a content part must be {{'type': 'text', 'text': ...}} or {{'type': 'image', 'image': "
                             f"path or bytes}}, got {str(part)[:60]}")
    return "".join(texts), tuple(media)


def declared_tools(messages: Sequence[Message]) -> list[dict]:
    """Every tool the conversation's system messages declare, in order."""
    return [t for m in messages if m.role == "system" and m.tools for t in m.tools]


def in_order(m: Message) -> list[Union[str, "Media"]]:
    """The message's text and media as content parts in their order: each medium where its ``offset`` puts it, the
    text split around it (no empty texts). A message without media is its text alone."""
    from chatglm.errors import InputError

    out: list[Union[str, "Media"]] = []
    at = 0
    for x in m.media:
        if not at <= x.offset <= len(m.content):
            raise InputError(f"{x.name}: its place in the message (offset {x.offset}) is outside the text's "
                             f"{len(m.content)} characters or before the medium ahead of it")
        if x.offset > at:
            out.append(m.content[at:x.offset])
        out.append(x)
        at = x.offset
    if at < len(m.content):
        out.append(m.content[at:])
    return out


def tools_only(m: Message) -> bool:
    """A system message that only carries tools (no text of its own, or just :data:`TOOLS_SYSTEM`): templates that
    take ``tools`` apart from the messages (GLM-4.5 and later) get the tools, not a system turn."""
    return m.role == "system" and bool(m.tools) and m.content in ("", TOOLS_SYSTEM)


def as_messages(items) -> list[Message]:
    return [m if isinstance(m, Message) else Message.from_dict(m) for m in items]

"""Chat prompts as token ids, exactly as each family's published tokenizer builds them.

Each format turns a list of messages into ids (ending with the generation prompt) and turns the generated text back
into an assistant :class:`Message`. Formats register by name; the GGUF's ``glm.chat_format`` (or its architecture and
special tokens) picks one. Text pieces are tokenized separately where the reference does so, since tokenizing the
joined string gives different ids.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from typing import ClassVar, Optional, Protocol, Sequence

from chatglm.errors import InputError
from chatglm.runtime.messages import Message, ToolCall


class Tokenizer(Protocol):
    def tokenize(self, text: str) -> list[int]: ...


class ChatFormat(ABC):
    name: ClassVar[str]
    required_tokens: ClassVar[tuple[str, ...]] = ()  # special tokens the vocab must have
    stop_tokens: ClassVar[tuple[str, ...]] = ()  # end a reply, besides the vocab's eos

    def __init__(self, special: dict[str, int]):
        missing = [t for t in self.required_tokens if t not in special]
        if missing:
            raise InputError(f"the model's vocabulary lacks the {self.name} special tokens {', '.join(missing)}")
        self.special = special

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

    def parse_reply(self, text: str) -> Message:
        """The generated text (special tokens removed) as an assistant message."""
        return Message("assistant", text.strip())

    def visible(self, text: str) -> str:
        """The part of a partial reply to show while streaming (a prefix of the final content)."""
        return text.lstrip()


FORMATS: dict[str, type[ChatFormat]] = {}


def register(cls: type[ChatFormat]) -> type[ChatFormat]:
    FORMATS[cls.name] = cls
    return cls


def get_format(name: str, special: dict[str, int]) -> ChatFormat:
    from chatglm.runtime import prompt_formats  # noqa: F401  (registers the formats of other families)

    if name not in FORMATS:
        raise InputError(f"unknown chat format {name!r}; known: {', '.join(sorted(FORMATS))}")
    return FORMATS[name](special)


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


@register
class ChatGLM2Format(ChatFormat):
    """ChatGLM2-6B: ``[gMASK] sop`` + the text "[Round N]\\n\\n问：...\\n\\n答：..." tokenized as one string."""

    name = "chatglm2"
    required_tokens = ("[gMASK]", "sop")
    completion_prefix = ("[gMASK]", "sop")

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        check_roles(messages, ("system", "user", "assistant"), self.name)
        system = "".join(m.content + "\n\n" for m in messages if m.role == "system")
        rounds, pending = rounds_of([m for m in messages if m.role != "system"], "ChatGLM2")
        text = system + "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(rounds, 1))
        text += f"[Round {len(rounds) + 1}]\n\n问：{pending}\n\n答："
        return [self.sp("[gMASK]"), self.sp("sop")] + tok.tokenize(text)


def tools_text(m: Message) -> str:
    """A system message's content with its tools appended as the published ChatGLM3 code does."""
    if m.role == "system" and m.tools is not None:
        return m.content + "\n" + json.dumps(m.tools, indent=4, ensure_ascii=False)
    return m.content


@register
class ChatGLM3Format(ChatFormat):
    """ChatGLM3-6B: ``[gMASK] sop``, then per message ``<|role|>`` + enc(metadata + "\\n") + enc(content)."""

    name = "chatglm3"
    required_tokens = ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
    completion_prefix = ("[gMASK]", "sop")
    stop_tokens = ("<|user|>", "<|observation|>")

    def message_ids(self, m: Message, tok: Tokenizer) -> list[int]:
        metadata, content = m.metadata, tools_text(m)
        if m.role == "assistant" and m.tool_calls and not content:
            metadata = metadata or m.tool_calls[0].name
            content = render_tool_call(m.tool_calls[0])
        return [self.sp(f"<|{m.role}|>")] + tok.tokenize(metadata + "\n") + tok.tokenize(content)

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        check_roles(messages, ("system", "user", "assistant", "observation"), self.name)
        ids = [self.sp("[gMASK]"), self.sp("sop")]
        for m in messages:
            ids += self.message_ids(m, tok)
        return ids + [self.sp("<|assistant|>")]

    def parse_reply(self, text: str) -> Message:
        metadata, content = reply_parts(text)
        if metadata is None:
            return Message("assistant", content.strip())
        call = parse_tool_call(metadata, content)
        return Message("assistant", content.strip(), tool_calls=[call] if call else [], metadata=metadata)

    def visible(self, text: str) -> str:
        # Only what may still become a tool call's metadata line (a name, then the call) is held back.
        return "" if may_become_call(text) else reply_parts(text)[1].lstrip()


NAME = re.compile(r"[A-Za-z_][\w.\-]*")  # a tool name (or ``interpreter``): the metadata line of a tool call
CALL_OPENINGS = ("```", "tool_call(")  # how ChatGLM3 writes a call after its name line


def is_name(line: str) -> bool:
    return bool(NAME.fullmatch(line.strip()))


def reply_parts(text: str) -> tuple[Optional[str], str]:
    """(tool name, call text) for a ChatGLM3 tool call; (None, answer) otherwise, the empty metadata line removed.

    A tool call is a name line followed by a fenced block or ``tool_call(...)``; any other first line is text."""
    first, newline, rest = text.partition("\n")
    if newline and not first.strip():
        return None, rest
    if newline and is_name(first) and rest.lstrip().startswith(CALL_OPENINGS):
        return first.strip(), rest
    return None, text


def may_become_call(text: str) -> bool:
    """Whether the reply so far is a prefix of a metadata line (blank or a name) or of a name line and a call."""
    first, newline, rest = text.partition("\n")
    if not newline:
        return not first.strip() or is_name(first)
    opening = rest.lstrip()
    return is_name(first) and any(c.startswith(opening) or opening.startswith(c) for c in CALL_OPENINGS)


def render_tool_call(call: ToolCall) -> str:
    """ChatGLM3's tool-call text: a fenced ``tool_call(k=v, ...)`` with Python literal arguments, or, for the code
    interpreter (``interpreter`` with ``{"code": ...}``), the fenced code itself."""
    args = call.arguments if isinstance(call.arguments, dict) else {}
    if call.name == "interpreter" and isinstance(args.get("code"), str):
        return f"```python\n{args['code']}\n```"
    inner = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return f"```python\ntool_call({inner})\n```"


def parse_tool_call(name: str, content: str) -> ToolCall | None:
    """Parse ChatGLM3's ``tool_call(k=v, ...)`` with the ast module: literals only, nothing evaluated."""
    import ast

    body = content.strip()
    if body.startswith("```"):
        body = "\n".join(body.split("\n")[1:-1]) if body.count("\n") >= 2 else body.strip("`")
    if name == "interpreter":  # the code interpreter's "call" is the code itself, whatever it parses as
        return ToolCall(name, {"code": body})
    try:
        node = ast.parse(body.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # ValueError: null bytes
        return ToolCall(name, body)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        try:
            return ToolCall(name, {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg})
        except (ValueError, SyntaxError, TypeError, RecursionError):
            pass
    return ToolCall(name, body)

"""The chat formats of ChatGLM2-6B / CodeGeeX2 (``[Round N]`` 问/答) and ChatGLM3-6B (role tokens, tools, the code
interpreter), as the published tokenization_chatglm.py builds them, and ChatGLM3's tool-call grammar.
"""

from __future__ import annotations

import json
from typing import Any, Optional, Sequence

from chatglm.families.chatglm2 import FAMILY
from chatglm.runtime.messages import Message, ToolCall
from chatglm.runtime.prompts import ChatFormat, Tokenizer, check_roles, is_name, rounds_of

CHATGLM2, CHATGLM3 = FAMILY.chat_formats


class ChatGLM2Format(ChatFormat):
    """ChatGLM2-6B: ``[gMASK] sop`` + the text "[Round N]\\n\\n问：...\\n\\n答：..." tokenized as one string."""

    name = CHATGLM2
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


class ChatGLM3Format(ChatFormat):
    """ChatGLM3-6B: ``[gMASK] sop``, then per message ``<|role|>`` + enc(metadata + "\\n") + enc(content)."""

    name = CHATGLM3
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

    def parse_reply(self, text: str, tools: Sequence[Any] = ()) -> Message:
        metadata, content = reply_parts(text)
        if metadata is None:
            return Message("assistant", content.strip())
        call = parse_tool_call(metadata, content)
        return Message("assistant", content.strip(), tool_calls=[call] if call else [], metadata=metadata)

    def visible(self, text: str) -> str:
        # Only what may still become a tool call's metadata line (a name, then the call) is held back.
        return "" if may_become_call(text) else reply_parts(text)[1].lstrip()


CALL_OPENINGS = ("```", "tool_call(")  # how ChatGLM3 writes a call after its name line


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


FORMATS = (ChatGLM2Format, ChatGLM3Format)

"""OpenAI chat messages and tools in, GLM :class:`Message` values out, and replies back as OpenAI objects.

- ``system`` and ``developer`` messages become system messages, ``user`` user messages; content parts (text, images
  as ``data:`` URLs, ``input_audio``) become the text and the checked media (:mod:`chatglm.server.content`).
- ``tools`` (unless ``tool_choice`` is ``"none"``) become a system message carrying the function definitions
  (``name``, ``description``, ``parameters``: the library's tool shape) in its ``tools`` field, placed first, as
  ChatGLM3's published OpenAI demo does and as ``Model.session(tools=...)`` builds it; the chat format renders them.
- An assistant message's ``tool_calls`` become :class:`ToolCall` values with their JSON arguments parsed (kept as the
  raw string when they are not JSON); ``tool`` (and legacy ``function``) messages become ``observation`` messages.
- An assistant message's ``reasoning_content`` becomes its ``thinking``; a tool message's ``tool_call_id`` and a tool
  call's ``id`` are kept (GLM-5.3-Flash's template orders results by them).
- Replies: a tool call goes out with ``content: null`` and its arguments as a JSON string, ``finish_reason:
  "tool_calls"``; the model's thinking as ``reasoning_content`` (in the message, and in stream deltas), apart from
  ``content``, as llama.cpp's and vLLM's servers write it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Optional

from chatglm.limits import MAX_MEDIA_PER_REQUEST
from chatglm.runtime.messages import Message, ToolCall
from chatglm.runtime.session import TOOLS_SYSTEM
from chatglm.server import strictjson
from chatglm.server.content import content_parts, media_parts
from chatglm.server.errors import APIError, invalid
from chatglm.server.schema import ChatRequest, NamedToolChoice

TOOLS_PREAMBLE = TOOLS_SYSTEM  # the library's tool system text (ChatGLM3's published preamble), as sessions use
ROLE_MAP = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
            "tool": "observation", "function": "observation"}


def to_messages(req: ChatRequest) -> list[Message]:
    """The conversation of a chat request as GLM messages (raises a 400 APIError naming the bad message)."""
    out: list[Message] = []
    tools = offered_tools(req)
    if tools:
        out.append(Message("system", TOOLS_PREAMBLE, tools=tools))
    if media_parts(req.messages) > MAX_MEDIA_PER_REQUEST:  # counted before any is decoded
        raise invalid(f"the request carries more than {MAX_MEDIA_PER_REQUEST} images and audio clips", "messages")
    for i, raw in enumerate(req.messages):
        out.append(_message(raw, f"messages[{i}]"))
    return out


def tools_for_format(messages: list[Message], fmt) -> list[Message]:
    """The messages with their tools in the shape the model's template takes: OpenAI's ``{"type": "function",
    "function": {...}}`` for GLM-4.5 and later (as vLLM passes them to the template), bare functions otherwise."""
    if not getattr(fmt, "openai_tools", False):
        return messages
    return [replace(m, tools=[{"type": "function", "function": t} for t in m.tools]) if m.tools else m
            for m in messages]


def offered_tools(req: ChatRequest) -> list[dict]:
    if not req.tools or req.tool_choice == "none":
        return []
    functions = [t.function.model_dump(exclude_none=True) for t in req.tools]
    if isinstance(req.tool_choice, NamedToolChoice):
        wanted = req.tool_choice.function.name
        functions = [f for f in functions if f["name"] == wanted]
        if not functions:
            raise invalid(f"tool_choice names the function {wanted!r}, which is not among the tools", "tool_choice")
    return functions


def _message(raw: dict, where: str) -> Message:
    role = raw.get("role")
    if not isinstance(role, str):
        raise invalid(f"{where}.role must be a string, one of {', '.join(ROLE_MAP)}; got {type(role).__name__}",
                      f"{where}.role")
    if role not in ROLE_MAP:
        raise invalid(f"{where}.role: unknown role {role[:64]!r}; expected one of {', '.join(ROLE_MAP)}", where)
    content, media = content_parts(raw.get("content"), where, role)
    call_id = _string(raw.get("tool_call_id"), f"{where}.tool_call_id") if role == "tool" else ""
    thinking = _string(raw.get("reasoning_content"), f"{where}.reasoning_content") if role == "assistant" else ""
    if role != "assistant" or not raw.get("tool_calls"):
        return Message(ROLE_MAP[role], content, thinking=thinking, tool_call_id=call_id, media=media)
    calls = raw["tool_calls"]
    if not isinstance(calls, list):
        raise invalid(f"{where}.tool_calls must be a list", where)
    return Message("assistant", content, thinking=thinking,
                   tool_calls=[_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)])


def _string(value: Any, where: str) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    raise invalid(f"{where} must be a string", where)


def _tool_call(call: Any, where: str) -> ToolCall:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise invalid(f"{where}: a tool call needs function.name and function.arguments", where)
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = strictjson.loads(args, f"{where}.function.arguments") if args.strip() else {}
        except APIError:
            pass  # kept as the raw string: the model wrote it so
    elif not isinstance(args, dict):
        raise invalid(f"{where}.function.arguments must be a JSON string or an object, not {type(args).__name__}",
                      where)
    return ToolCall(fn["name"], args, _string(call.get("id"), f"{where}.id"))


# -- replies ---------------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What one generation produced, ready to be written in either endpoint's shape."""

    content: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reasoning: str = ""  # the model's thinking, apart from content

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def tool_calls_out(calls: list[ToolCall]) -> list[dict]:
    return [{"id": c.id or new_id("call"), "type": "function",
             "function": {"name": c.name, "arguments": c.arguments if isinstance(c.arguments, str)
                          else json.dumps(c.arguments, ensure_ascii=False)}} for c in calls]


def chat_completion(rid: str, model_id: str, out: Outcome) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": out.content}
    if out.tool_calls:
        message = {"role": "assistant", "content": out.content or None, "tool_calls": tool_calls_out(out.tool_calls)}
    if out.reasoning:
        message["reasoning_content"] = out.reasoning
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": message, "finish_reason": out.finish_reason, "logprobs": None}],
            "usage": out.usage()}


def chat_chunk(rid: str, model_id: str, delta: dict, finish_reason: Optional[str] = None,
               created: Optional[int] = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created or int(time.time()), "model": model_id,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def tool_call_deltas(calls: list[ToolCall]) -> list[dict]:
    return [{"index": i, **c} for i, c in enumerate(tool_calls_out(calls))]


def usage_chunk(rid: str, model_id: str, out: Outcome, created: Optional[int] = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created or int(time.time()), "model": model_id,
            "choices": [], "usage": out.usage()}


def text_completion(rid: str, model_id: str, text: str, finish_reason: Optional[str],
                    usage: Optional[dict] = None, created: Optional[int] = None) -> dict:
    body: dict[str, Any] = {"id": rid, "object": "text_completion", "created": created or int(time.time()),
                            "model": model_id, "choices": [{"index": 0, "text": text, "finish_reason": finish_reason,
                                                            "logprobs": None}]}
    if usage is not None:
        body["usage"] = usage
    return body

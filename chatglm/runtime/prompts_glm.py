"""What the GLM-4-style chat formats share (glm-4-9b-chat, GLM-Edge, GLM-4-0414, GLM-Z1, GLM-4.5): pieces to ids, the
tool-list text, the reply grammar. The formats themselves are in their families' chat.py.

Every format renders what the model's published chat template renders, as a list of pieces: special-token ids and
text. Text between two special tokens is tokenized as one string, which is what ``apply_chat_template`` does (it
renders the template, then splits the string at the added tokens and tokenizes each stretch). Message content is
never searched for special-token text: a user cannot inject ``<|assistant|>``.

Replies. After ``<|assistant|>`` GLM-4 writes a metadata line: empty for an answer (so the answer starts with "\\n",
which is not shown), or a function name for a tool call, followed by the arguments as JSON and ``<|observation|>``.
Tool calls are parsed with ``json.loads`` only. GLM-Z1 thinks first (its prompt ends with ``<think>``); the thinking
is returned in ``Message.thinking``, apart from the answer.

The strings below are the protocol text the models were trained on (the tool-list headers of the published chat
templates); they must match byte for byte.
"""

from __future__ import annotations

import json
import re
from typing import Any, Optional, Sequence, Union

from chatglm.errors import InputError
from chatglm.runtime.messages import Message, ToolCall
from chatglm.runtime.prompts import ChatFormat, Tokenizer, is_name

Piece = Union[int, str]  # a special-token id, or text to tokenize

ROLES = ("system", "user", "assistant", "observation")
GLM4_STOPS = ("<|endoftext|>", "<|user|>", "<|observation|>")
GLM4_SPECIALS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

TOOLS_TITLE = "# 可用工具"
TOOL_FOOTER = "在调用上述函数时，请使用 Json 格式表示调用的参数。"


def tool_function(tool: Any) -> dict:
    """The function description of one tool: ``{"type": "function", "function": {...}}`` or a bare function."""
    if not isinstance(tool, dict):
        raise InputError(f"a tool must be an object, got {type(tool).__name__}")
    if tool.get("type", "function") != "function":
        raise InputError(f"tool type {tool.get('type')!r} is not supported: declare tools as functions")
    function = tool.get("function") or tool
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise InputError("a tool needs a function with a 'name'")
    return function


def tool_sections(tools: Sequence[Any]) -> str:
    """``## name`` + the function as indented JSON + the instruction to answer with JSON, per tool."""
    out = ""
    for tool in tools:
        function = tool_function(tool)
        out += f"\n\n## {function['name']}\n\n{json.dumps(function, ensure_ascii=False, indent=4)}\n{TOOL_FOOTER}"
    return out


def call_arguments_text(call: ToolCall) -> str:
    """A tool call's arguments as the model writes them: JSON (a string argument is kept as given)."""
    if isinstance(call.arguments, str):
        return call.arguments
    return json.dumps(call.arguments, ensure_ascii=False)


class Thinking:
    """Replies that may open with thinking: ``<think>`` in the reply, or a prompt that ends inside it."""

    thinks = False  # the prompt ends inside <think>: the reply starts with thinking

    def split_thinking(self, text: str) -> tuple[str, str, bool]:
        """(thinking, rest, complete): thinking ends at ``</think>``; ``complete`` is False while it is open."""
        opened = self.thinks
        body = text
        if not opened and text.lstrip().startswith("<think>"):
            opened, body = True, text.lstrip()[len("<think>"):]
        if not opened:
            return "", text, True
        thinking, sep, rest = body.partition("</think>")
        return thinking.strip(), rest, bool(sep)

    def visible_thinking(self, text: str) -> str:
        """The thinking shown so far while streaming (a prefix of the final ``thinking``), markers held back."""
        if opens_with_partial(text, "<think>"):
            return ""
        thinking, _, complete = self.split_thinking(text)
        if complete:
            return thinking
        raw = text.lstrip()
        raw = raw[len("<think>"):] if raw.startswith("<think>") else raw
        raw = raw[:len(raw) - partial_suffix(raw, "</think>")]
        return raw.strip()


class GLMFormat(Thinking, ChatFormat):
    """Shared machinery: pieces → ids, and the GLM-4 reply grammar."""

    required_tokens = GLM4_SPECIALS
    completion_prefix = ("[gMASK]", "<sop>")
    stop_tokens = GLM4_STOPS

    def piece(self, text: str) -> Piece:
        """A marker that the vocabulary may hold as one token (``<think>``): its id if known, else text."""
        return self.special.get(text, text)

    def encode(self, pieces: Sequence[Piece], tok: Tokenizer) -> list[int]:
        ids: list[int] = []
        text = ""
        for p in pieces:
            if isinstance(p, str):
                text += p
                continue
            if text:
                ids += tok.tokenize(text)
                text = ""
            ids.append(p)
        return ids + (tok.tokenize(text) if text else [])

    def role(self, name: str) -> int:
        return self.sp(f"<|{name}|>")

    @staticmethod
    def call_of(m: Message) -> Optional[ToolCall]:
        if not m.tool_calls:
            return None
        if len(m.tool_calls) > 1:
            raise InputError("GLM-4 makes one tool call per assistant message; split the calls into messages")
        return m.tool_calls[0]

    # -- replies ----------------------------------------------------------------------------------------------
    def parse_reply(self, text: str, tools: Sequence[Any] = ()) -> Message:
        thinking, rest, _ = self.split_thinking(text)
        if thinking or self.thinks:
            rest = rest.lstrip("\n")  # after thinking, the metadata line may follow blank lines
        msg = parse_call_or_answer(rest)
        msg.thinking = thinking
        return msg

    def visible(self, text: str) -> str:
        if opens_with_partial(text, "<think>"):
            return ""  # the thinking marker is still arriving
        thinking, rest, complete = self.split_thinking(text)
        if not complete:
            return ""
        return visible_answer(rest.lstrip("\n") if thinking or self.thinks else rest)


# -- GLM-4.5 and later: XML tool calls ---------------------------------------------------------------------------

XML_MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
               "</arg_value>", "<tool_response>", "</tool_response>")
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def argument_text(value: Any) -> str:
    """An argument value as the templates write it: strings as they are, anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def argument_value(text: str) -> Any:
    """An argument value as written in a call: JSON when it parses as JSON, else the string itself."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def call_arguments(call: ToolCall, model: str) -> dict:
    """A past call's arguments as the key/value pairs the XML call format writes (a JSON object string is parsed)."""
    args = argument_value(call.arguments) if isinstance(call.arguments, str) else call.arguments
    if not isinstance(args, dict):
        raise InputError(f"tool call {call.name!r}: {model} writes arguments as key/value pairs; "
                         f"got {type(args).__name__}")
    return args


def declared_strings(tools: Sequence[Any]) -> set[tuple[str, str]]:
    """(tool, argument) pairs whose JSON schema admits only strings: their values are kept as written, since the
    templates write a string argument without quotes (``"42"`` and ``42`` look the same in a call)."""
    out = set()
    for tool in tools:
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        params = function.get("parameters") if isinstance(function, dict) else None
        props = params.get("properties") if isinstance(params, dict) else None
        if not isinstance(function, dict) or not isinstance(props, dict):
            continue
        for key, schema in props.items():
            if isinstance(schema, dict) and _string_only(schema):
                out.add((function.get("name"), key))
    return out


def _string_only(schema: dict) -> bool:
    kind = schema.get("type")
    if kind is None:  # an enum of strings alone
        enum = schema.get("enum")
        return isinstance(enum, list) and bool(enum) and all(isinstance(v, str) for v in enum)
    kinds = kind if isinstance(kind, list) else [kind]
    return bool(kinds) and all(k == "string" for k in kinds)


def parse_xml_calls(text: str, tools: Sequence[Any] = ()) -> tuple[str, list[ToolCall]]:
    """(the text outside the calls, the calls) of ``<tool_call>NAME[\\n]<arg_key>K</arg_key>[\\n]<arg_value>V
    </arg_value>...</tool_call>`` (GLM-4.5's form with newlines and GLM-4.7's without). A value is the string as
    written where the tool's schema declares a string, else JSON where it parses as JSON (the templates JSON-encode
    every non-string value); nothing is evaluated."""
    strings = declared_strings(tools)
    calls = []
    for body in _CALL.findall(text):
        cut = min((i for i in (body.find("\n"), body.find("<arg_key>")) if i >= 0), default=len(body))
        name = body[:cut].strip()
        if name:
            args = {}
            for k, v in _ARG.findall(body[cut:]):
                args[k.strip()] = v if (name, k.strip()) in strings else argument_value(v)
            calls.append(ToolCall(name, args))
    return _CALL.sub("", text).strip(), calls


class XmlReplies(Thinking):
    """Replies of GLM-4.5 and later: optional thinking, the answer, then XML tool calls (never shown as text)."""

    keep_special_text = XML_MARKERS  # must stay in the generated text for parse_reply

    def parse_reply(self, text: str, tools: Sequence[Any] = ()) -> Message:
        thinking, rest, _ = self.split_thinking(text)
        content, calls = parse_xml_calls(rest, tools)
        return Message("assistant", content, tool_calls=calls, thinking=thinking)

    def visible(self, text: str) -> str:
        if opens_with_partial(text, "<think>"):
            return ""  # the thinking marker is still arriving
        _, rest, complete = self.split_thinking(text)
        if not complete:
            return ""
        shown = rest.split("<tool_call>")[0]
        return shown[:len(shown) - partial_suffix(shown, "<tool_call>")].lstrip()


def partial_suffix(text: str, marker: str) -> int:
    """The length of the longest end of ``text`` that is a proper prefix of ``marker`` (it may still become one)."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def opens_with_partial(text: str, marker: str) -> bool:
    """Whether ``text`` (leading whitespace aside) is a non-empty proper prefix of ``marker``."""
    head = text.lstrip()
    return bool(head) and len(head) < len(marker) and marker.startswith(head)


def _call_candidate(text: str) -> bool:
    """Whether ``text`` may still turn out to be ``name\\n{json}`` (so nothing of it may be shown yet)."""
    first, newline, rest = text.partition("\n")
    if not newline:
        return not first.strip() or is_name(first)
    stripped = rest.lstrip()
    return is_name(first) and (not stripped or stripped.startswith("{"))


def parse_call_or_answer(text: str) -> Message:
    """``name\\n{json}`` → a tool call; ``\\nanswer`` (or anything else) → an answer."""
    first, newline, rest = text.partition("\n")
    if newline and is_name(first):
        try:
            arguments = json.loads(rest.strip())
        except (ValueError, RecursionError):
            arguments = None
        if isinstance(arguments, dict):
            name = first.strip()
            return Message("assistant", rest.strip(), tool_calls=[ToolCall(name, arguments)], metadata=name)
    if newline and not first.strip():
        return Message("assistant", rest.strip())
    return Message("assistant", text.strip())


def visible_answer(text: str) -> str:
    """The shown part of an answer: nothing while it may be a tool call, and never the leading metadata line."""
    if _call_candidate(text):
        return ""
    first, newline, rest = text.partition("\n")
    return rest.lstrip() if newline and not first.strip() else text.lstrip()

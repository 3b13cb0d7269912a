"""GLM-4 chat prompts as token ids: glm-4-9b-chat, GLM-Edge, GLM-4-0414 and GLM-Z1.

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
from typing import Any, Optional, Sequence, Union

from chatglm.errors import InputError
from chatglm.runtime.messages import Message, ToolCall
from chatglm.runtime.prompts import ChatFormat, Tokenizer, check_roles, is_name, register

Piece = Union[int, str]  # a special-token id, or text to tokenize

ROLES = ("system", "user", "assistant", "observation")
GLM4_STOPS = ("<|endoftext|>", "<|user|>", "<|observation|>")
GLM4_SPECIALS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")

# glm-4-9b-chat: the system block a message with ``tools`` opens with.
GLM4_TOOL_HEADER = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                    "你的任务是针对用户的问题和要求提供适当的答复和支持。")
# GLM-Z1-0414 uses the same sentence with "智谱 AI 公司"; GLM-4-0414 has no header.
Z1_TOOL_HEADER = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
                  "你的任务是针对用户的问题和要求提供适当的答复和支持。")
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


class GLMFormat(ChatFormat):
    """Shared machinery: pieces → ids, and the GLM-4 reply grammar."""

    required_tokens = GLM4_SPECIALS
    completion_prefix = ("[gMASK]", "<sop>")
    stop_tokens = GLM4_STOPS
    thinks = False  # the prompt ends inside <think>: the reply starts with thinking

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

    def parse_reply(self, text: str) -> Message:
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


@register
class GLM4Format(GLMFormat):
    """glm-4-9b-chat (THUDM and -hf): ``[gMASK]<sop>``, per message ``<|role|>metadata\\ncontent``.

    A message with ``tools`` first opens a system block listing them (the published template's header); a message
    with empty content is left out, as the template does.
    """

    name = "glm4"

    def message_pieces(self, m: Message) -> list[Piece]:
        pieces: list[Piece] = []
        if m.tools is not None:
            pieces += [self.role("system"), f"\n{GLM4_TOOL_HEADER}\n\n{TOOLS_TITLE}{tool_sections(m.tools)}"]
        metadata, content = m.metadata, m.content
        call = self.call_of(m) if m.role == "assistant" else None
        if call is not None:
            metadata = metadata or call.name
            content = content or call_arguments_text(call)
        if content:
            pieces += [self.role(m.role), f"{metadata}\n{content}"]
        return pieces

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        check_roles(messages, ROLES, self.name)
        pieces: list[Piece] = [self.sp("[gMASK]"), self.sp("<sop>")]
        for m in messages:
            pieces += self.message_pieces(m)
        return self.encode(pieces + [self.role("assistant")], tok)


@register
class GLMEdgeFormat(GLMFormat):
    """GLM-Edge chat: no ``[gMASK]<sop>`` prefix; ``<|role|>\\ncontent`` per message; no tools."""

    name = "glm-edge"
    required_tokens = ("<|system|>", "<|user|>", "<|assistant|>")

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        check_roles(messages, ("system", "user", "assistant"), self.name)
        pieces: list[Piece] = []
        for m in messages:
            if m.tools is not None or m.tool_calls:
                raise InputError("the glm-edge chat format has no tool calling")
            pieces += [self.role(m.role), f"\n{m.content}"]
        return self.encode(pieces + [self.role("assistant")], tok)


@register
class GLM40414Format(GLMFormat):
    """GLM-4-0414: tools first (one system block), then every system message, then the conversation.

    An assistant tool call renders as ``<|assistant|>name \\n{arguments}`` (the space is the template's).
    """

    name = "glm4-0414"
    tool_header = ""

    def text_of(self, m: Message) -> str:
        return m.content

    def head_pieces(self, messages: Sequence[Message]) -> list[Piece]:
        tools = [t for m in messages if m.tools for t in m.tools]
        pieces: list[Piece] = [self.sp("[gMASK]"), self.sp("<sop>")]
        if tools:
            header = f"{self.tool_header}\n\n" if self.tool_header else ""
            pieces += [self.role("system"), f"\n{header}{TOOLS_TITLE}{tool_sections(tools)}"]
        for m in messages:
            if m.role == "system":
                pieces += [self.role("system"), f"\n{m.content}"]
        return pieces

    def message_pieces(self, m: Message) -> list[Piece]:
        call = self.call_of(m) if m.role == "assistant" else None
        metadata = m.metadata or (call.name if call else "")
        content = self.text_of(m) or (call_arguments_text(call) if call else "")
        if m.role == "assistant" and metadata:
            return [self.role("assistant"), f"{metadata} \n{content}"]
        return [self.role(m.role), f"\n{content}"]

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        check_roles(messages, ROLES, self.name)
        pieces = self.head_pieces(messages)
        for m in messages:
            if m.role != "system":
                pieces += self.message_pieces(m)
        return self.encode(pieces + self.generation_prompt(), tok)

    def generation_prompt(self) -> list[Piece]:
        return [self.role("assistant")]


@register
class GLMZ1Format(GLM40414Format):
    """GLM-Z1-0414: as GLM-4-0414, but history keeps only the text after ``</think>`` (stripped), the tool block
    opens with the ChatGLM sentence, and the prompt ends with ``<|assistant|>\\n<think>``."""

    name = "glm4-z1"
    thinks = True
    tool_header = Z1_TOOL_HEADER

    def text_of(self, m: Message) -> str:
        return m.content.split("</think>")[-1].strip()

    def generation_prompt(self) -> list[Piece]:
        return [self.role("assistant"), "\n", self.piece("<think>")]

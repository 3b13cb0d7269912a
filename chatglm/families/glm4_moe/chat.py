"""GLM-4.5 / GLM-4.6 (``glm4moe``) chat prompts as token ids, and their XML tool calls and ``<think>`` replies.

What the published chat template renders (with transformers' ``trim_blocks``/``lstrip_blocks``):

- ``[gMASK]<sop>``; if any tools: ``<|system|>\\n`` + a fixed English tool preamble listing each tool as compact JSON
  between ``<tools>`` lines, and the XML call format;
- system ``<|system|>\\n{content}``; user ``<|user|>\\n{content}``;
- assistant ``<|assistant|>`` + ``\\n<think>{reasoning}</think>`` for turns after the last user message that carry
  reasoning, else ``\\n<think></think>``; then ``\\n{content}`` if any; then per tool call
  ``\\n<tool_call>{name}\\n`` + ``<arg_key>{k}</arg_key>\\n<arg_value>{v}</arg_value>\\n`` per argument (strings as
  they are, other values as JSON) + ``</tool_call>``;
- tool results (our ``observation`` role): one ``<|observation|>`` for a run of them, each
  ``\\n<tool_response>\\n{content}\\n</tool_response>``;
- generation prompt ``<|assistant|>``.

``<think>``, ``<tool_call>``, ``<arg_key>`` ... are single tokens of the vocabulary; they are written as text and
the tokenizer matches them (llama.cpp splits user-defined tokens out of text the way ``tokenizers`` does), unless
the vocabulary lists them among the control tokens the format knows, in which case their ids are used.
"""

from __future__ import annotations

import json
import re
from typing import Any, Sequence

from chatglm.errors import InputError
from chatglm.runtime.messages import Message, ToolCall
from chatglm.families.glm4_moe import FAMILY
from chatglm.runtime.prompts import Tokenizer, check_roles
from chatglm.runtime.prompts_glm import ROLES, GLMFormat, Piece, opens_with_partial

TOOLS_PREAMBLE = ("\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
CALL_FORMAT = ("</tools>\n\nFor each function call, output the function name and arguments within the following "
               "XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n"
               "<arg_value>{arg-value-1}</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n"
               "<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")
MARKERS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
           "</arg_value>", "<tool_response>", "</tool_response>")
_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)


def argument_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def argument_value(text: str) -> Any:
    """An argument value as written in a call: JSON when it parses as JSON, else the string itself."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


class GLM45Format(GLMFormat):
    name = FAMILY.chat_formats[0]
    required_tokens = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
    keep_special_text = MARKERS  # must stay in the generated text for parse_reply

    def text(self, s: str) -> list[Piece]:
        """Template text with its markers as ids where the vocabulary's control tokens include them."""
        pieces: list[Piece] = []
        for part in re.split("(" + "|".join(re.escape(m) for m in MARKERS) + ")", s):
            if part:
                pieces.append(self.piece(part) if part in MARKERS else part)
        return pieces

    def tools_pieces(self, messages: Sequence[Message]) -> list[Piece]:
        tools = [t for m in messages if m.tools for t in m.tools]
        if not tools:
            return []
        listing = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)
        return [self.role("system"), *self.text(TOOLS_PREAMBLE + listing + CALL_FORMAT)]

    def assistant_pieces(self, m: Message, after_last_user: bool) -> list[Piece]:
        reasoning, content = m.thinking, m.content
        if not reasoning and "</think>" in content:
            head = content.partition("</think>")[0]
            reasoning = head.rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
        text = f"\n<think>{reasoning.strip()}</think>" if after_last_user and reasoning else "\n<think></think>"
        if content.strip():
            text += "\n" + content.strip()
        for call in m.tool_calls:
            args = argument_value(call.arguments) if isinstance(call.arguments, str) else call.arguments
            if not isinstance(args, dict):
                raise InputError(f"tool call {call.name!r}: GLM-4.5 writes arguments as key/value pairs; "
                                 f"got {type(args).__name__}")
            text += f"\n<tool_call>{call.name}\n"
            text += "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{argument_text(v)}</arg_value>\n"
                            for k, v in args.items())
            text += "</tool_call>"
        return [self.role("assistant"), *self.text(text)]

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        check_roles(messages, ROLES, self.name)
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        pieces: list[Piece] = [self.sp("[gMASK]"), self.sp("<sop>"), *self.tools_pieces(messages)]
        for i, m in enumerate(messages):
            if m.role == "assistant":
                pieces += self.assistant_pieces(m, i > last_user)
            elif m.role == "observation":
                if i == 0 or messages[i - 1].role != "observation":
                    pieces.append(self.role("observation"))
                pieces += self.text(f"\n<tool_response>\n{m.content}\n</tool_response>")
            else:
                pieces += [self.role(m.role), f"\n{m.content}"]
        return self.encode(pieces + [self.role("assistant")], tok)

    # -- replies ----------------------------------------------------------------------------------------------
    def parse_reply(self, text: str) -> Message:
        thinking, rest, _ = self.split_thinking(text)
        calls = []
        for body in _CALL.findall(rest):
            name, _, args_text = body.partition("\n")
            if name.strip():
                args = {k.strip(): argument_value(v) for k, v in _ARG.findall(args_text)}
                calls.append(ToolCall(name.strip(), args))
        content = _CALL.sub("", rest).strip()
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


FORMATS = (GLM45Format,)

"""GLM-4.5 / GLM-4.6 (``glm45``) and GLM-4.7 (``glm47``) chat prompts as token ids, and their XML tool calls and
``<think>`` replies.

What the published GLM-4.6 chat template renders (with transformers' ``trim_blocks``/``lstrip_blocks``; GLM-4.5's
differs only in how it writes arguments that are not a mapping):

- ``[gMASK]<sop>``; if any tools: ``<|system|>\\n`` + a fixed English tool preamble listing each tool as compact JSON
  between ``<tools>`` lines, and the XML call format;
- system ``<|system|>\\n{content}``; user ``<|user|>\\n{content}`` (+ ``/nothink`` when ``enable_thinking`` is
  false and the text does not already end with it);
- assistant ``<|assistant|>`` + ``\\n<think>{reasoning}</think>`` for turns after the last user message that carry
  reasoning, else ``\\n<think></think>``; then ``\\n{content}`` if any; then per tool call
  ``\\n<tool_call>{name}\\n`` + ``<arg_key>{k}</arg_key>\\n<arg_value>{v}</arg_value>\\n`` per argument (strings
  as they are, other values as JSON) + ``</tool_call>``;
- tool results (our ``observation`` role): one ``<|observation|>`` for a run of them, each
  ``\\n<tool_response>\\n{content}\\n</tool_response>``;
- generation prompt ``<|assistant|>`` (+ ``\\n<think></think>`` when ``enable_thinking`` is false).

GLM-4.7's template is the same with the newlines taken out: ``<|user|>{content}``, ``<|system|>{content}``, the call
format and calls written ``<tool_call>{name}<arg_key>{k}</arg_key><arg_value>{v}</arg_value></tool_call>``, results
``<tool_response>{content}</tool_response>``; a past turn's thinking is written ``<think>{reasoning}</think>`` and
an empty one as ``</think>`` alone; ``clear_thinking`` false keeps the thinking of every past turn (by default only
turns after the last user message keep it); the generation prompt is ``<|assistant|><think>`` (``<|assistant|></think>``
when ``enable_thinking`` is false). No ``/nothink``.

``<think>``, ``<tool_call>``, ``<arg_key>`` ... are single tokens of the vocabulary; they are written as text and
the tokenizer matches them (llama.cpp splits user-defined tokens out of text the way ``tokenizers`` does), unless
the vocabulary lists them among the control tokens the format knows, in which case their ids are used.
"""

from __future__ import annotations

import json
import re
from typing import Sequence

from chatglm.families.glm4_moe import FAMILY
from chatglm.runtime.messages import Message, tools_only
from chatglm.runtime.prompts import Tokenizer, check_roles
from chatglm.runtime.prompts_glm import (ROLES, XML_MARKERS, GLMFormat, Piece, XmlReplies, argument_text,
                                         call_arguments)

TOOLS_PREAMBLE = ("\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                  "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
CALL_INTRO = "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
CALL_FORMAT = ("<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
               "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")
NOTHINK = "/nothink"


def split_reasoning(m: Message, trim: bool = True) -> tuple[str, str]:
    """(reasoning, content) of a past assistant turn: ``thinking``, else the ``<think>...</think>`` in its content
    (as the templates split it: before the first ``</think>``, after the last ``<think>``; ``trim``: newlines
    around it dropped, as GLM-4.5..4.7 do)."""
    reasoning, content = m.thinking, m.content
    if not reasoning and "</think>" in content:
        head = content.partition("</think>")[0]
        head = head.rstrip("\n") if trim else head
        reasoning = head.split("<think>")[-1].lstrip("\n") if trim else head.split("<think>")[-1]
        content = content.split("</think>")[-1]
        content = content.lstrip("\n") if trim else content
    return reasoning, content


def tool_list(messages: Sequence[Message]) -> list:
    return [t for m in messages if m.tools for t in m.tools]


def shown_messages(messages: Sequence[Message]) -> list[Message]:
    """The messages a template renders: a system message that only carries tools gives the tools, not a turn."""
    return [m for m in messages if not tools_only(m)]


class GLM45Format(XmlReplies, GLMFormat):
    name = FAMILY.chat_formats[0]
    required_tokens = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
    option_names = ("enable_thinking",)
    openai_tools = True
    renders_template = True
    nl = "\n"  # GLM-4.7 drops the newlines GLM-4.5/4.6 write after role tokens and around calls
    call_format = CALL_FORMAT

    def text(self, s: str) -> list[Piece]:
        """Template text with its markers as ids where the vocabulary's control tokens include them."""
        pieces: list[Piece] = []
        for part in re.split("(" + "|".join(re.escape(m) for m in XML_MARKERS) + ")", s):
            if part:
                pieces.append(self.piece(part) if part in XML_MARKERS else part)
        return pieces

    def tool_lines(self, tools: list) -> str:
        return "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)

    def tools_pieces(self, tools: list) -> list[Piece]:
        if not tools:
            return []
        return [self.role("system"), *self.text(TOOLS_PREAMBLE + self.tool_lines(tools) + CALL_INTRO
                                                + self.call_format)]

    def thinking_text(self, reasoning: str, kept: bool) -> str:
        return f"\n<think>{reasoning.strip()}</think>" if kept and reasoning else "\n<think></think>"

    def keeps_thinking(self, after_last_user: bool) -> bool:
        return after_last_user

    def call_text(self, name: str, args: dict) -> str:
        nl = self.nl
        pairs = "".join(f"<arg_key>{k}</arg_key>{nl}<arg_value>{argument_text(v)}</arg_value>{nl}"
                        for k, v in args.items())
        return f"{nl}<tool_call>{name}{nl}{pairs}</tool_call>"

    trims_reasoning = True

    def assistant_pieces(self, m: Message, after_last_user: bool) -> list[Piece]:
        reasoning, content = split_reasoning(m, self.trims_reasoning)
        text = self.thinking_text(reasoning, self.keeps_thinking(after_last_user))
        if content.strip():
            text += self.nl + content.strip()
        for call in m.tool_calls:
            text += self.call_text(call.name, call_arguments(call, "GLM-4.5"))
        return [self.role("assistant"), *self.text(text)]

    def user_text(self, content: str) -> str:
        if self.option("enable_thinking", True) is False and not content.endswith(NOTHINK):
            content += NOTHINK
        return "\n" + content

    def turn_pieces(self, m: Message) -> list[Piece]:
        """A user or system turn: its role token and text (a format that places media writes them here too)."""
        return [self.role(m.role), self.user_text(m.content) if m.role == "user" else self.nl + m.content]

    def results_pieces(self, results: list[Message], calls: Sequence) -> list[Piece]:
        """A run of tool results after the call that asked for them."""
        nl = self.nl
        return [self.role("observation"),
                *self.text("".join(f"{nl}<tool_response>{nl}{r.content}{nl}</tool_response>" for r in results))]

    def generation_prompt(self) -> str:
        return "\n<think></think>" if self.option("enable_thinking", True) is False else ""

    def opens_thinking(self) -> bool:
        return False

    def head_pieces(self, tools: list) -> list[Piece]:
        return [self.sp("[gMASK]"), self.sp("<sop>"), *self.tools_pieces(tools)]

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        check_roles(messages, ROLES, self.name)
        tools = tool_list(messages)
        messages = shown_messages(messages)
        last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
        pieces: list[Piece] = self.head_pieces(tools)
        i = 0
        while i < len(messages):
            m = messages[i]
            if m.role == "observation":
                end = next((j for j in range(i, len(messages)) if messages[j].role != "observation"), len(messages))
                calls = messages[i - 1].tool_calls if i and messages[i - 1].role == "assistant" else []
                pieces += self.results_pieces(messages[i:end], calls)
                i = end
                continue
            if m.role == "assistant":
                pieces += self.assistant_pieces(m, i > last_user)
            else:
                pieces += self.turn_pieces(m)
            i += 1
        self.thinks = self.opens_thinking()
        return self.encode(pieces + [self.role("assistant"), *self.text(self.generation_prompt())], tok)


class GLM47Format(GLM45Format):
    """GLM-4.7 (and the GLM-5.x models that ship its template): GLM-4.5's prompt without the newlines, thinking on by
    default and ``clear_thinking``."""

    name = FAMILY.chat_formats[1]
    option_names = ("enable_thinking", "clear_thinking")
    nl = ""
    call_format = CALL_FORMAT.replace("\n", "")

    def thinking_text(self, reasoning: str, kept: bool) -> str:
        return f"<think>{reasoning.strip()}</think>" if kept and reasoning else "</think>"

    def keeps_thinking(self, after_last_user: bool) -> bool:
        return self.option("clear_thinking", True) is False or after_last_user

    def user_text(self, content: str) -> str:
        return content

    def generation_prompt(self) -> str:
        return "</think>" if self.option("enable_thinking", True) is False else "<think>"

    def opens_thinking(self) -> bool:
        return self.option("enable_thinking", True) is not False


FORMATS = (GLM45Format, GLM47Format)

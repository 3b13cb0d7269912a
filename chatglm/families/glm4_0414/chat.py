"""The chat formats of GLM-4-0414 (``glm4-0414``) and GLM-Z1 (``glm4-z1``, thinking first)."""

from __future__ import annotations

from typing import Sequence

from chatglm.families.glm4_0414 import FAMILY
from chatglm.runtime.messages import Message
from chatglm.runtime.prompts import Tokenizer, check_roles
from chatglm.runtime.prompts_glm import ROLES, TOOLS_TITLE, GLMFormat, Piece, call_arguments_text, tool_sections

GLM4_0414, GLM_Z1 = FAMILY.chat_formats

# GLM-Z1-0414 uses the same sentence with "智谱 AI 公司"; GLM-4-0414 has no header.
Z1_TOOL_HEADER = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
                  "你的任务是针对用户的问题和要求提供适当的答复和支持。")


class GLM40414Format(GLMFormat):
    """GLM-4-0414: tools first (one system block), then every system message, then the conversation.

    An assistant tool call renders as ``<|assistant|>name \\n{arguments}`` (the space is the template's).
    """

    name = GLM4_0414
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


class GLMZ1Format(GLM40414Format):
    """GLM-Z1-0414: as GLM-4-0414, but history keeps only the text after ``</think>`` (stripped), the tool block
    opens with the ChatGLM sentence, and the prompt ends with ``<|assistant|>\\n<think>``."""

    name = GLM_Z1
    thinks = True
    tool_header = Z1_TOOL_HEADER

    def text_of(self, m: Message) -> str:
        return m.content.split("</think>")[-1].strip()

    def generation_prompt(self) -> list[Piece]:
        return [self.role("assistant"), "\n", self.piece("<think>")]


FORMATS = (GLM40414Format, GLMZ1Format,)

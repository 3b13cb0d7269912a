"""The ``glm4`` chat format of glm-4-9b-chat (THUDM layout and -hf): ``[gMASK]<sop>``, role tokens, JSON tool calls."""

from __future__ import annotations

from typing import Sequence

from chatglm.families.glm4 import FAMILY
from chatglm.runtime.messages import Message
from chatglm.runtime.prompts import Tokenizer, check_roles
from chatglm.runtime.prompts_glm import ROLES, TOOLS_TITLE, GLMFormat, Piece, call_arguments_text, tool_sections

# glm-4-9b-chat: the system block a message with ``tools`` opens with.
GLM4_TOOL_HEADER = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
                    "你的任务是针对用户的问题和要求提供适当的答复和支持。")


class GLM4Format(GLMFormat):
    """glm-4-9b-chat (THUDM and -hf): ``[gMASK]<sop>``, per message ``<|role|>metadata\\ncontent``.

    A message with ``tools`` first opens a system block listing them (the published template's header); a message
    with empty content is left out, as the template does.
    """

    name = FAMILY.chat_formats[0]

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


FORMATS = (GLM4Format,)

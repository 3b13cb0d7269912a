"""The ``glm-edge`` chat format of GLM-Edge 1.5B/4B chat (glm-4-9b-chat-hf uses the ``glm4`` format of
``chatglm/families/glm4``)."""

from __future__ import annotations

from typing import Sequence

from chatglm.errors import InputError
from chatglm.families.glm4_hf import FAMILY
from chatglm.runtime.messages import Message
from chatglm.runtime.prompts import Tokenizer, check_roles
from chatglm.runtime.prompts_glm import GLMFormat, Piece


class GLMEdgeFormat(GLMFormat):
    """GLM-Edge chat: no ``[gMASK]<sop>`` prefix; ``<|role|>\\ncontent`` per message; no tools."""

    name = FAMILY.chat_formats[0]
    required_tokens = ("<|system|>", "<|user|>", "<|assistant|>")

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        check_roles(messages, ("system", "user", "assistant"), self.name)
        pieces: list[Piece] = []
        for m in messages:
            if m.tools is not None or m.tool_calls:
                raise InputError("the glm-edge chat format has no tool calling")
            pieces += [self.role(m.role), f"\n{m.content}"]
        return self.encode(pieces + [self.role("assistant")], tok)


FORMATS = (GLMEdgeFormat,)

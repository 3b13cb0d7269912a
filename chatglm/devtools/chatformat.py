"""Token-exact ChatGLM3 chat sequences, built the way the published ``tokenization_chatglm.py`` builds them.

Published ``build_chat_input(query, history, role="user")``: ``[gMASK] sop``; for every history item
``build_single_message(role, metadata, content)`` = ``<|role|>`` + ``sp.encode(metadata + "\\n")`` +
``sp.encode(content)`` (two separate encodes); then the query as a ``user`` message; then ``<|assistant|>``. The
published model ends its reply by emitting ``<|user|>`` (or ``<|observation|>`` for a tool call, or eos).

Development only (training data for the demo model and test references); the runtime builds its own prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from chatglm.devtools.sptrain import SPECIAL_TOKENS

ROLES = ("system", "user", "assistant", "observation")


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    metadata: str = ""


class ChatEncoder:
    """Encodes messages with one SentencePiece model and the ChatGLM3 special ids appended after it."""

    def __init__(self, tokenizer_model: str) -> None:
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
        n = self.sp.vocab_size()
        self.special = {name: n + i for i, name in enumerate(SPECIAL_TOKENS["chatglm3"])}
        self.eos = self.sp.eos_id()

    def prefix(self) -> list[int]:
        return [self.special["[gMASK]"], self.special["sop"]]

    def message(self, msg: Message) -> list[int]:
        """``<|role|>`` + encode(metadata + "\\n") + encode(content)."""
        if msg.role not in ROLES:
            raise ValueError(f"unknown role {msg.role!r}")
        return [self.special[f"<|{msg.role}|>"], *self.sp.encode(msg.metadata + "\n"), *self.sp.encode(msg.content)]

    def prompt(self, history: Sequence[Message], query: str) -> list[int]:
        """Ids of ``build_chat_input(query, history)``: ends with ``<|assistant|>``, ready for generation."""
        ids = self.prefix()
        for msg in history:
            ids += self.message(msg)
        ids += self.message(Message("user", query))
        ids.append(self.special["<|assistant|>"])
        return ids

    def reply_ids(self, reply: str) -> list[int]:
        """What the model should generate after ``<|assistant|>``: encode("\\n") + encode(reply) + ``<|user|>``."""
        return [*self.sp.encode("\n"), *self.sp.encode(reply), self.special["<|user|>"]]

    def decode_reply(self, ids: Sequence[int]) -> str:
        """Text of generated ids up to the first end-of-turn id (``<|user|>``, ``<|observation|>`` or eos)."""
        stops = {self.special["<|user|>"], self.special["<|observation|>"], self.eos}
        body: list[int] = []
        for i in ids:
            if i in stops:
                break
            body.append(i)
        return self.sp.decode([i for i in body if i < self.sp.vocab_size()]).strip()

    def stop_ids(self) -> list[int]:
        return [self.eos, self.special["<|user|>"], self.special["<|observation|>"]]

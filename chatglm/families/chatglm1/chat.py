"""ChatGLM-6B's chat format, as the published ``ChatGLMForConditionalGeneration.chat`` of THUDM/chatglm-6b builds it.

- No history: the prompt is the query itself. With history: ``"[Round {i}]\\n问：{q}\\n答：{a}\\n"`` per past round
  (numbered from 0), then ``"[Round {n}]\\n问：{query}\\n答："``.
- The whole prompt is tokenized as one string and the tokenizer appends ``[gMASK] <sop>``: everything before
  ``<sop>`` is the bidirectional context, the reply follows ``<sop>`` and ends with ``<eop>``.
- The reply is post-processed: stripped, ``[[训练时间]]`` replaced by ``2023年``, and ASCII ``, ! : ; ?`` next to a
  CJK character made full-width.

ChatGLM-6B has no system role; a system message's text is put before the prompt, as the published fine-tuning
scripts put their ``source_prefix``.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from chatglm.runtime.messages import Message
from chatglm.families.chatglm1 import FAMILY
from chatglm.runtime.prompts import ChatFormat, Tokenizer, check_roles, rounds_of

TRAINING_TIME = "[[训练时间]]"
PUNCTUATION = {",": "，", "!": "！", ":": "：", ";": "；", "?": "？"}
_CJK = "\u4e00-\u9fff"


def build_prompt(query: str, history: Sequence[tuple[str, str]]) -> str:
    if not history:
        return query
    past = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return past + f"[Round {len(history)}]\n问：{query}\n答："


def process_response(text: str) -> str:
    text = text.strip().replace(TRAINING_TIME, "2023年")
    for ascii_mark, wide in PUNCTUATION.items():
        mark = re.escape(ascii_mark)
        text = re.sub(f"([{_CJK}]){mark}", f"\\g<1>{wide}", text)
        text = re.sub(f"{mark}([{_CJK}])", f"{wide}\\g<1>", text)
    return text


class ChatGLM1Format(ChatFormat):
    name = FAMILY.chat_formats[0]
    required_tokens = ("[gMASK]", "<sop>", "<eop>")
    completion_suffix = ("[gMASK]", "<sop>")  # the model generates only after <sop>
    stop_tokens = ("<eop>",)

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        check_roles(messages, ("system", "user", "assistant"), self.name)
        prefix = "".join(m.content for m in messages if m.role == "system")
        rounds, query = rounds_of([m for m in messages if m.role != "system"])
        return tok.tokenize(prefix + build_prompt(query, rounds)) + [self.sp("[gMASK]"), self.sp("<sop>")]

    def parse_reply(self, text: str, tools: Sequence[Any] = ()) -> Message:
        return Message("assistant", process_response(text))

    def visible(self, text: str) -> str:
        """The processed reply so far, minus a tail the next characters could still change."""
        hold = 0
        for n in range(min(len(text), len(TRAINING_TIME) - 1), 0, -1):
            if TRAINING_TIME.startswith(text[-n:]):
                hold = n
                break
        if not hold and text and text[-1] in PUNCTUATION:
            hold = 1
        return process_response(text[:len(text) - hold]) if text[:len(text) - hold].strip() else ""


FORMATS = (ChatGLM1Format,)

"""GLM-5.3-Flash (``glm53flash``) chat prompts as token ids: the official template (revision ``690b7052``; ``04c4e9e9``
renders the same for every conversation this API can express), token for token.

What it renders (transformers' ``trim_blocks``/``lstrip_blocks``):

- ``[gMASK]<sop><|system|>Reasoning Effort: {Max|Low|High}`` always (``reasoning_effort`` ``low``/``high``, else max);
- if any tools: ``<|system|>\\n`` + the tool preamble, each tool's function (the ``function`` object itself, its
  ``defer_loading``/``strict`` keys dropped, a tool with a true ``defer_loading`` left out) as ``{"k": json, ...}``
  on its own line, and GLM-4.7's compact call format;
- system ``<|system|>{content}``; user ``<|user|>{content}``;
- assistant ``<|assistant|><think>{reasoning}</think>`` (the reasoning as given, not stripped) when the turn has
  reasoning and ``clear_thinking`` is false (the default: past thinking is kept) or it follows the last user
  message; else ``<think></think>``; then ``{content}`` stripped; then ``<tool_call>{name}<arg_key>{k}</arg_key>
  <arg_value>{v}</arg_value>...</tool_call>`` per call;
- a run of tool results: ``<|observation|>`` then ``<tool_response>{content}</tool_response>`` per result, in the
  order of the calls of the assistant turn before when every result and call has an id, the ids are unique and each
  result's id names a call (otherwise in the order given);
- generation prompt ``<|assistant|><think>`` (the official template has no switch for thinking: ``enable_thinking``
  is not read);
- each image of a user, system or tool-result message where it stands in the text (``Media.offset``), as
  ``<|begin_of_image|><|image|><|end_of_image|>`` (libmtmd's chunk takes the place of ``<|image|>``), so the format
  places media itself (``places_media``); the builder refuses media in an assistant turn, which the template would
  fold into the reply's text before splitting off its thinking.

:func:`check_projector`: the ``glm5v`` projector's tower, GLM-4.1V's table (``chatglm/families/glm4v/tower.py``),
checked before libmtmd sees the file.
"""

from __future__ import annotations

import json
from typing import Sequence

from chatglm.families.glm4_moe.chat import GLM47Format
from chatglm.families.glm4v.tower import check_tower
from chatglm.families.glm5_next import FAMILY
from chatglm.errors import InputError
from chatglm.runtime.messages import Message, ToolCall, in_order
from chatglm.runtime.prompts_glm import Piece

FORMAT_NAME = FAMILY.chat_formats[0]
EFFORTS = {"low": "Low", "high": "High"}  # anything else: Max
DROPPED_KEYS = ("defer_loading", "strict")
# what the template writes for a medium's content part (its ``emit_image``), by medium kind
MEDIA_MARKERS = {"image": ("<|begin_of_image|>", FAMILY.projectors[0].placeholder, "<|end_of_image|>")}


def tool_json(function: dict) -> str:
    """The template's ``tool_to_json``: the keys written raw, each value as ``tojson``, ``defer_loading``/``strict``
    left out."""
    return "{" + ", ".join(f'"{k}": {json.dumps(v, ensure_ascii=False)}' for k, v in function.items()
                           if k not in DROPPED_KEYS) + "}"


def result_order(results: Sequence[Message], calls: Sequence[ToolCall]) -> list[Message]:
    """The tool results in the order of the calls they answer, where the ids allow it (else as given)."""
    ids = [r.tool_call_id for r in results]
    call_ids = [c.id for c in calls]
    if (not calls or not all(ids) or len(set(ids)) < len(ids) or not all(call_ids)
            or len(set(call_ids)) < len(call_ids) or not set(ids) <= set(call_ids)):
        return list(results)
    return [r for c in call_ids for r in results if r.tool_call_id == c]


class GLM53FlashFormat(GLM47Format):
    name = FORMAT_NAME
    option_names = ("reasoning_effort", "clear_thinking")
    trims_reasoning = False

    places_media = True

    def media_pieces(self, m: Message, text=lambda s: [s]) -> list[Piece]:
        """The message's text (each stretch through ``text``) with each medium's markers, as ids, where it stands."""
        pieces: list[Piece] = []
        for part in in_order(m):
            if isinstance(part, str):
                pieces += text(part)
                continue
            markers = MEDIA_MARKERS.get(part.kind)
            if markers is None or not all(t in self.special for t in markers):
                raise InputError(f"{self.name} places images only, and only with {', '.join(MEDIA_MARKERS['image'])} "
                                 f"in the vocabulary: cannot place this {part.kind}", part.name)
            pieces += [self.sp(t) for t in markers]
        return pieces

    def turn_pieces(self, m: Message) -> list[Piece]:
        return [self.role(m.role), *self.media_pieces(m)]

    def assistant_pieces(self, m: Message, after_last_user: bool) -> list[Piece]:
        if m.media:
            raise InputError(f"{self.name} places media in user, system and tool turns, not in an assistant's "
                             "reply", m.media[0].name)
        return super().assistant_pieces(m, after_last_user)

    def head_pieces(self, tools: list) -> list[Piece]:
        effort = EFFORTS.get(self.option("reasoning_effort", "max"), "Max")
        return [self.sp("[gMASK]"), self.sp("<sop>"), self.role("system"), f"Reasoning Effort: {effort}",
                *self.tools_pieces(tools)]

    def tool_lines(self, tools: list) -> str:
        functions = [t["function"] if isinstance(t, dict) and "function" in t else t for t in tools]
        return "".join(tool_json(f) + "\n" for f in functions if not (isinstance(f, dict) and f.get("defer_loading")))

    def thinking_text(self, reasoning: str, kept: bool) -> str:
        return f"<think>{reasoning}</think>" if kept and reasoning else "<think></think>"

    def keeps_thinking(self, after_last_user: bool) -> bool:
        return self.option("clear_thinking", False) is False or after_last_user

    def results_pieces(self, results: list[Message], calls: Sequence) -> list[Piece]:
        ordered = result_order(results, calls)
        pieces: list[Piece] = [self.role("observation")]
        for r in ordered:
            pieces += [*self.text("<tool_response>"), *self.media_pieces(r, self.text), *self.text("</tool_response>")]
        return pieces

    def generation_prompt(self) -> str:
        return "<think>"

    def opens_thinking(self) -> bool:
        return True


FORMATS = (GLM53FlashFormat,)
check_projector = check_tower

"""The converter of ``Glm4vForConditionalGeneration`` / ``Glm46VForConditionalGeneration`` checkpoints.

Language model (``model.language_model.*``, ``lm_head``; settings in ``text_config``): GLM-4-0414's tensors and
llama.cpp ``glm4``, plus M-RoPE. transformers rotates the first ``n_rot`` dims of each head in consecutive pairs with
frequencies split into ``mrope_section`` (temporal, height, width) runs; llama.cpp's M-RoPE rotates NeoX pairs ``(i,
i + n_rot/2)`` with the same runs (``rope.dimension_sections``), so the rotated rows of Q and K (weights and biases)
are reordered: even rows first, then odd ones. With text alone all three positions are equal and the model is
GLM-4-0414's.

Projector: libmtmd's ``glm4v``, written by ``vision.py`` (shared with GLM-4.5V, GLM-OCR, GLM-5.3-Flash) from
``TOWER`` below.
"""

from __future__ import annotations

import gguf
import numpy as np

from chatglm.convert.config_types import shown
from chatglm.convert.family import OutTensor, check_shape
from chatglm.convert.hf_layout import template_format
from chatglm.families.glm4_0414 import FAMILY as GLM4_0414
from chatglm.families.glm4_0414.convert import Glm4HF
from chatglm.families.glm4v import FAMILY
from chatglm.families.glm4v.tower import Tower
from chatglm.families.glm4v.vision import CLIP_NORM, GlmVisionProjector, sub_config

DEFAULT_MROPE = [8, 12, 12]  # transformers' mrope_section when the config names none

# The tower (chatglm/families/glm4v/vision.py): the MLP out_hidden_size wide, the merger's intermediate_size; learned
# positions; attention_bias on qkv alone; CLIP's normalization when preprocessor_config.json is absent.
TOWER = Tower(FAMILY.projectors[0].projector_type, tower_ff=("out_hidden_size",), merger_ff=("intermediate_size",),
              positions=True, qk_norm=False, biased=("qkv",), default_norm=CLIP_NORM)


def mrope_sections(family) -> list[int]:
    """``mrope_section`` (frequency pairs per time/height/width), checked to cover the rotated dimensions; padded to
    the four llama.cpp's ``rope.dimension_sections`` holds."""
    params = family.config.get("rope_parameters") or family.config.get("rope_scaling") or {}
    sections = params.get("mrope_section", DEFAULT_MROPE) if isinstance(params, dict) else None
    if (not isinstance(sections, list) or not 1 <= len(sections) <= 4
            or any(type(s) is not int or s < 0 for s in sections) or sum(sections) * 2 != family.hp.n_rot):
        raise family.bad(f"'mrope_section' must be up to 4 non-negative integers summing to half the rotated "
                         f"dimensions ({family.hp.n_rot // 2}), got {shown(sections)}")
    return sections + [0] * (4 - len(sections))


def neox_rows(n_head: int, head_dim: int, n_rot: int) -> np.ndarray:
    """Row order taking each head's first ``n_rot`` rows from consecutive pairs to NeoX halves."""
    within = np.concatenate([np.arange(0, n_rot, 2), np.arange(1, n_rot, 2), np.arange(n_rot, head_dim)])
    return (np.arange(n_head)[:, None] * head_dim + within[None, :]).reshape(-1)


class Glm4v(Glm4HF):
    """The language model of GLM-4.1V/4.6V: llama.cpp ``glm4`` with M-RoPE."""

    name = FAMILY.variants[0]
    arch = FAMILY.arch
    text_prefix = "model.language_model."

    def __init__(self, ckpt):
        # transformers before 4.52 saved the language model at the top of ``model.`` and the tower as ``visual.``
        names = set(ckpt.names())
        legacy = "model.language_model.embed_tokens.weight" not in names and "model.embed_tokens.weight" in names
        self.text_prefix = "model." if legacy else type(self).text_prefix
        super().__init__(ckpt)
        self.sections = mrope_sections(self)

    def text_config(self) -> dict:
        top = {k: self.ckpt.config[k] for k in ("tie_word_embeddings",) if k in self.ckpt.config}
        return {**top, **sub_config(self.ckpt, "text_config")}

    def detect_chat_format(self, template: str) -> str:
        return template_format(template, GLM4_0414.chat_formats[0])

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        super().write_metadata(w)
        w.add_rope_dimension_sections(self.sections)

    def _permuted(self, t: OutTensor, n_head: int) -> OutTensor:
        order = neox_rows(n_head, self.hp.head_dim, self.hp.n_rot)
        return OutTensor(t.name, t.shape, t.sources, lambda a, order=order: a[0][order])

    def tensors(self) -> list[OutTensor]:
        hp = self.hp
        heads = {".attn_q.": hp.n_head, ".attn_k.": hp.n_head_kv}
        plan = []
        for t in super().tensors():
            n_head = next((n for key, n in heads.items() if key in t.name), None)
            plan.append(t if n_head is None else self._permuted(t, n_head))
        return plan

    def check_shapes(self, plan: list[OutTensor]) -> None:
        for t in plan:
            check_shape(self, t.sources[0], t.shape)

    def projector(self) -> GlmVisionProjector:
        return GlmVisionProjector(self, TOWER)


CONVERTER = Glm4v

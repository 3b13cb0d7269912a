"""The converter of ``GlmOcrForConditionalGeneration`` (GLM-OCR): llama.cpp ``glm4`` + libmtmd ``glm4v``.

Language model (``modeling_glm_ocr.py``): GLM-4-0414's layer (``chatglm/families/glm4_0414``: norms after attention
and after the MLP, fused ``gate_up_proj``), no attention biases, read from under ``model.language_model.`` with
``text_config``. Its rope rotates interleaved pairs of the first ``partial_rotary_factor`` (default 1.0 here, as
transformers has it) of each head with the M-RoPE sections; llama.cpp's M-RoPE rotates NeoX halves, so the rotated
rows of Q and K are reordered (even dimensions first, then odd) within each head, which leaves q·k unchanged.

Projector: GLM-4.1V's writer (``chatglm/families/glm4v/vision.py``) with ``TOWER`` below: per-head RMSNorm of q
and k, no learned position table and no norm after the patch embedding; the tower's MLP is ``intermediate_size``
wide (with biases when ``attention_bias``), the merger's ``out_hidden_size * in_channels``.
"""

from __future__ import annotations

from typing import Sequence

import gguf
import numpy as np

from chatglm.convert.family import OutTensor, check_shape
from chatglm.convert.hf_layout import template_format
from chatglm.families.glm4_0414 import FAMILY as GLM4_0414
from chatglm.families.glm4_0414.convert import Glm4HF
from chatglm.families.glm4v import FAMILY as GLM4V
from chatglm.families.glm4v.convert import neox_rows
from chatglm.families.glm4v.vision import GlmVisionProjector, Tower, sub_config
from chatglm.families.glm4v_moe.convert import LanguageModelView, mrope_sections
from chatglm.families.glm_ocr import FAMILY

Q_K = ("attn_q.", "attn_k.")
# GLM-4.1V's tower (chatglm/families/glm4v/vision.py) with per-head q/k norms and no learned positions; its MLP is
# intermediate_size wide, its merger out_hidden_size * in_channels; attention_bias biases qkv, the output projection
# and the MLP
TOWER = Tower(GLM4V.projectors[0].projector_type, tower_ff=("intermediate_size",),
              merger_ff=("out_hidden_size", "in_channels"), positions=False, qk_norm=True,
              biased=("qkv", "out", "ffn"))


def ocr_text_view(ckpt) -> LanguageModelView:
    """The language model, transformers' rope defaults for GLM-OCR made explicit (all of each head rotates)."""
    text = dict(sub_config(ckpt, "text_config"))
    rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 1e4)})
    rope.setdefault("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
    text["rope_parameters"] = rope
    if "tie_word_embeddings" in ckpt.config:
        text["tie_word_embeddings"] = ckpt.config["tie_word_embeddings"]
    return LanguageModelView(ckpt, text)


class GlmOcr(Glm4HF):
    name = FAMILY.variants[0]
    arch = FAMILY.arch
    default_bias = False

    def __init__(self, ckpt):
        super().__init__(ocr_text_view(ckpt))
        self.sections = mrope_sections(self)

    def detect_chat_format(self, template: str) -> str:
        return template_format(template, GLM4_0414.chat_formats[0])

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        super().write_metadata(w)
        w.add_rope_dimension_sections(self.sections)

    def attention_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        plan = super().attention_tensors(bid)
        for t in plan:
            kind = next((k for k in Q_K if t.name.startswith(f"blk.{bid}.{k}")), None)
            if kind is not None:
                heads = hp.n_head if kind == Q_K[0] else hp.n_head_kv
                t.build = _rows(neox_rows(heads, hp.head_dim, hp.n_rot))
        return plan

    def check_shapes(self, plan: list[OutTensor]) -> None:
        super().check_shapes(plan)
        for t in plan:
            if len(t.sources) == 1 and not t.is_copy:  # the reordered Q/K rows
                check_shape(self, t.sources[0], t.shape)

    def projector(self) -> GlmVisionProjector:
        return GlmVisionProjector(self, TOWER)


def _rows(order: np.ndarray):
    def build(arrays: Sequence[np.ndarray]) -> np.ndarray:
        return arrays[0][order]
    return build


CONVERTER = GlmOcr

"""The converter of ``GlmOcrForConditionalGeneration`` (GLM-OCR): llama.cpp ``glm4`` + libmtmd ``glm4v``.

Language model (``modeling_glm_ocr.py``): GLM-4.1V's (``chatglm/families/glm4v``: GLM-4-0414's layer read from under
``model.language_model.`` with ``text_config``, M-RoPE, the rotated rows of Q and K reordered to NeoX halves) with no
attention biases by default, all of each head rotated unless ``partial_rotary_factor`` says otherwise (transformers'
default for GLM-OCR), and the top-level ``tie_word_embeddings`` over ``text_config``'s.

Projector: GLM-4.1V's writer (``chatglm/families/glm4v/vision.py``) with ``TOWER`` below: per-head RMSNorm of q
and k, no learned position table and no norm after the patch embedding; the tower's MLP is ``intermediate_size``
wide, the merger's ``out_hidden_size * in_channels``; ``attention_bias`` (true unless said otherwise) biases qkv, the
output projection and the MLP.
"""

from __future__ import annotations

from chatglm.families.glm4v import FAMILY as GLM4V
from chatglm.families.glm4v.convert import Glm4v
from chatglm.families.glm4v.tower import Tower
from chatglm.families.glm4v.vision import GlmVisionProjector
from chatglm.families.glm_ocr import FAMILY

TOWER = Tower(GLM4V.projectors[0].projector_type, tower_ff=("intermediate_size",),
              merger_ff=("out_hidden_size", "in_channels"), positions=False, qk_norm=True,
              biased=("qkv", "out", "ffn"), bias_default=True)


class GlmOcr(Glm4v):
    name = FAMILY.variants[0]
    arch = FAMILY.arch
    default_bias = False

    def text_config(self) -> dict:
        text = super().text_config()
        if "tie_word_embeddings" in self.ckpt.config:
            text["tie_word_embeddings"] = self.ckpt.config["tie_word_embeddings"]
        rope = dict(text.get("rope_parameters") or {"rope_type": "default", "rope_theta": text.get("rope_theta", 1e4)})
        rope.setdefault("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
        return {**text, "rope_parameters": rope}

    def projector(self) -> GlmVisionProjector:
        return GlmVisionProjector(self, TOWER)


CONVERTER = GlmOcr

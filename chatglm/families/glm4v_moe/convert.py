"""The converter of ``Glm4vMoeForConditionalGeneration`` (GLM-4.5V), and the text-model view GLM-OCR shares.

Language model: GLM-4.5's (``chatglm/families/glm4_moe``) read from under ``model.language_model.`` with
config.json's ``text_config``, plus multimodal rope: transformers rotates the first ``partial_rotary_factor`` of each
head in halves (llama.cpp's MROPE is NeoX-style too, so Q/K are copied unchanged), the frequency pairs split into
``mrope_section`` (time, height, width): ``rope.dimension_sections``. Text alone runs as plain rope (every section
takes the same position).

Projector: libmtmd's ``glm4v``, GLM-4.1V's tower (``chatglm/families/glm4v/vision.py``; ``TOWER`` below): its MLP
``out_hidden_size`` wide, learned positions, ``attention_bias`` on qkv alone (the output projection and the MLP have
no biases), preprocessor_config.json required.
"""

from __future__ import annotations

from typing import Any

import gguf
import numpy as np

from chatglm.convert.checkpoint import CheckpointView
from chatglm.families.glm4_moe.convert import Glm4Moe
from chatglm.families.glm4v import FAMILY as GLM4V
from chatglm.families.glm4v.convert import mrope_sections
from chatglm.families.glm4v.tower import Tower
from chatglm.families.glm4v.vision import GlmVisionProjector, sub_config
from chatglm.families.glm4v_moe import FAMILY

TEXT_PREFIX = "model.language_model."
# GLM-4.1V's tower (chatglm/families/glm4v/vision.py), preprocessor_config.json required
TOWER = Tower(GLM4V.projectors[0].projector_type, tower_ff=("out_hidden_size",), merger_ff=("intermediate_size",),
              positions=True, qk_norm=False, biased=("qkv",))


class LanguageModelView(CheckpointView):
    """The checkpoint as its text model alone would be saved: ``model.language_model.X`` named ``model.X``, the
    config ``text_config`` (the vision tensors keep their names, for the projector)."""

    def __init__(self, base, config: dict[str, Any], prefix: str = TEXT_PREFIX):
        super().__init__(base)
        self.full_config = base.config
        self.config = config
        self._source = {("model." + n[len(prefix):] if n.startswith(prefix) else n): n for n in base.names()}

    def names(self) -> list[str]:
        return list(self._source)

    def info(self, name: str):
        return self.base.info(self._source.get(name, name))

    def load(self, name: str) -> np.ndarray:
        return self.base.load(self._source.get(name, name))

    def file_of(self, name: str):
        return self.base.file_of(self._source.get(name, name))


def text_view(ckpt) -> LanguageModelView:
    """The language model of a GLM vision checkpoint; the top-level ``tie_word_embeddings`` is the one saved."""
    text = dict(sub_config(ckpt, "text_config"))
    if "tie_word_embeddings" in ckpt.config:
        text["tie_word_embeddings"] = ckpt.config["tie_word_embeddings"]
    return LanguageModelView(ckpt, text)


class Glm4vMoe(Glm4Moe):
    name = FAMILY.variants[0]
    arch = FAMILY.arch

    def __init__(self, ckpt):
        super().__init__(text_view(ckpt))
        self.sections = mrope_sections(self)

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        super().write_metadata(w)
        w.add_rope_dimension_sections(self.sections)

    def projector(self) -> GlmVisionProjector:
        return GlmVisionProjector(self, TOWER)


CONVERTER = Glm4vMoe


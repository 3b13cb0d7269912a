"""GLM-5.3-Flash's vision tower (``model.visual.*``) as libmtmd's ``glm5v``: GLM-4.1V's writer
(``chatglm/families/glm4v/vision.py``) with GLM-OCR's tower (per-head q/k norms, no learned positions, biases wherever
``attention_bias``), a merger ``projection_intermediate_size`` wide, every SwiGLU clamped at ``swiglu_limit`` (gate
above, up both ways) and the image processor's token budget (its canvas is aligned up to whole merged patches and
padded, so an image in whole 28-pixel units within the budget is not resized)."""

from __future__ import annotations

import gguf

from chatglm.convert.config_types import is_number, shown
from chatglm.errors import InputError
from chatglm.families.glm4v.tower import Tower
from chatglm.families.glm4v.vision import GlmVisionProjector
from chatglm.families.glm5_next import FAMILY

KV = gguf.Keys.ClipVision
KEY_SWIGLU_CLAMP = "clip.vision.swiglu_clamp"  # clip-impl.h's KEY_SWIGLU_CLAMP; gguf-py 0.19 predates it
TOWER = Tower(FAMILY.projectors[0].projector_type, tower_ff=("intermediate_size",),
              merger_ff=("projection_intermediate_size",), positions=False, qk_norm=True, biased=("qkv", "out", "ffn"),
              bias_default=True)
# preprocessor_config.json's token bounds with transformers' defaults
TOKEN_BUDGET = (("min_image_tokens", 16), ("max_image_tokens", 8000))


class Glm5vProjector(GlmVisionProjector):
    def __init__(self, family):
        super().__init__(family, TOWER)
        self.limit = self.vision.get("swiglu_limit", 10.0)
        if not is_number(self.limit) or not 0 < self.limit < 1e30:
            raise family.bad(f"vision_config.swiglu_limit must be a positive number, got {shown(self.limit)}")
        self.min_pixels, self.max_pixels = self.token_budget()

    def token_budget(self) -> tuple[int, int]:
        """(min, max) pixels of one frame: the token bounds times the pixels of one merged patch."""
        path = self.ckpt.dir / "preprocessor_config.json"
        unit = (self.size["patch_size"] * self.size["spatial_merge_size"]) ** 2
        out = []
        for key, default in TOKEN_BUDGET:
            value = self.pre.get(key, default)
            if type(value) is not int or not 0 < value <= (1 << 31) // unit:
                raise InputError(f"{key} must be a positive integer, got {shown(value)}", path)
            out.append(value * unit)
        if out[0] > out[1]:
            raise InputError("min_image_tokens is more than max_image_tokens", path)
        return out[0], out[1]

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        super().write_metadata(w)
        w.add_float32(KEY_SWIGLU_CLAMP, float(self.limit))
        w.add_uint32(KV.IMAGE_MIN_PIXELS, self.min_pixels)
        w.add_uint32(KV.IMAGE_MAX_PIXELS, self.max_pixels)

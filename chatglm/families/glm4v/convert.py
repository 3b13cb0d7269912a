"""The converter of ``Glm4vForConditionalGeneration`` / ``Glm46VForConditionalGeneration`` checkpoints.

Language model (``model.language_model.*``, ``lm_head``; settings in ``text_config``): GLM-4-0414's tensors and
llama.cpp ``glm4``, plus M-RoPE. transformers rotates the first ``n_rot`` dims of each head in consecutive pairs with
frequencies split into ``mrope_section`` (temporal, height, width) runs; llama.cpp's M-RoPE rotates NeoX pairs ``(i,
i + n_rot/2)`` with the same runs (``rope.dimension_sections``), so the rotated rows of Q and K (weights and biases)
are reordered: even rows first, then odd ones. With text alone all three positions are equal and the model is
GLM-4-0414's.

Projector (``model.visual.*``, preprocessor_config.json): libmtmd's ``glm4v`` (tools/mtmd/models/glm4v.cpp). The
Conv3d patch embedding (kernel 2 frames deep; an image is its own second frame) is split along time into
``v.patch_embd.weight`` and ``.weight.1``, which libmtmd applies to the image and adds; RMS norms after the
convolution (``v.norm_embd``), in the blocks (``ln1``, ``ln2``) and after them (``v.post_ln``); fused ``attn_qkv``;
a SwiGLU MLP; the learned position table (interpolated by libmtmd to the image's grid); the 2x2 ``downsample``
convolution as ``mm.patch_merger``; the merger's ``proj`` (``mm.model.fc``), LayerNorm (``mm.post_norm``), GELU and
gated MLP (``mm.gate``/``mm.up``/``mm.down``).
"""

from __future__ import annotations

import re
from typing import Sequence

import gguf
import numpy as np

from chatglm.convert.checkpoint import read_json
from chatglm.convert.config_types import is_number, shown
from chatglm.convert.family import OutTensor, check_shape
from chatglm.convert.hf_layout import template_format
from chatglm.convert.mmproj import KEY_HAS_VISION, Projector
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.glm4_0414 import FAMILY as GLM4_0414
from chatglm.families.glm4_0414.convert import Glm4HF
from chatglm.families.glm4v import FAMILY

T = gguf.MODEL_TENSOR
VISUAL = "model.visual."
# transformers' Glm4vImageProcessor defaults (OpenAI CLIP's), used when preprocessor_config.json has none.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
        self.visual = "visual." if legacy else VISUAL
        super().__init__(ckpt)

    def text_config(self) -> dict:
        text = self.ckpt.config.get("text_config")
        if not isinstance(text, dict):
            raise self.bad("'text_config' must be an object (the language model's settings)")
        top = {k: self.ckpt.config[k] for k in ("tie_word_embeddings",) if k in self.ckpt.config}
        return {**top, **text}

    def detect_chat_format(self, template: str) -> str:
        return template_format(template, GLM4_0414.chat_formats[0])

    def mrope_sections(self) -> list[int]:
        """``mrope_section`` (temporal, height, width frequency runs), checked to cover the rotated half-dims."""
        params = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        sections = params.get("mrope_section") if isinstance(params, dict) else None
        n_half = self.hp.n_rot // 2
        if (not isinstance(sections, list) or len(sections) != 3
                or not all(type(s) is int and s > 0 for s in sections) or sum(sections) != n_half):
            raise self.bad(f"'mrope_section' must be three positive integers adding up to {n_half} (half the "
                           f"rotated dims), got {shown(sections)}")
        return sections

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        super().write_metadata(w)
        w.add_rope_dimension_sections([*self.mrope_sections(), 0])

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

    def projector(self) -> "Glm4vProjector":
        return Glm4vProjector(self)


class Glm4vProjector(Projector):
    """The vision tower and merger as libmtmd's ``glm4v`` projector."""

    projector_type = FAMILY.projectors[0].projector_type
    f32_tensors = ("v.position_embd.weight",)

    def __init__(self, family: Glm4v):
        super().__init__(family)
        vision = self.ckpt.config.get("vision_config")
        if not isinstance(vision, dict):
            raise family.bad("'vision_config' must be an object (the vision tower's settings)")
        self.vision = vision
        act = vision.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"vision_config.hidden_act={shown(act)} is not supported (GLM-4.1V uses "
                                        "'silu')", family.config_path)
        self.n_layer = self.vint("depth")
        self.n_embd = self.vint("hidden_size")
        self.n_head = self.vint("num_heads")
        self.n_out = self.vint("out_hidden_size")
        self.n_ff_merger = self.vint("intermediate_size")
        self.patch = self.vint("patch_size", 14)
        self.merge = self.vint("spatial_merge_size", 2)
        self.frames = self.vint("temporal_patch_size", 2)
        self.image_size = self.vint("image_size", 336)
        self.channels = self.vint("in_channels", 3)
        if self.frames != 2:
            raise UnsupportedModelError(f"vision_config.temporal_patch_size={self.frames} is not supported (libmtmd's "
                                        "glm4v splits a kernel 2 frames deep)", family.config_path)
        if self.channels != 3:
            raise family.bad(f"vision_config.in_channels must be 3 (RGB), got {self.channels}")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 4:
            raise family.bad(f"vision_config.hidden_size ({self.n_embd}) must split into num_heads ({self.n_head}) "
                             "heads of a multiple of 4 dims (libmtmd's 2-D rope)")
        if self.n_out != family.hp.n_embd:
            raise family.bad(f"vision_config.out_hidden_size ({self.n_out}) differs from the language model's "
                             f"hidden_size ({family.hp.n_embd})")
        self.eps = vision.get("rms_norm_eps", 1e-5)
        if not is_number(self.eps) or not 0 < self.eps < 1:
            raise family.bad(f"vision_config.rms_norm_eps must be a small positive number, got {shown(self.eps)}")
        self.bias = vision.get("attention_bias", False)
        if type(self.bias) is not bool:
            raise family.bad(f"vision_config.attention_bias must be true or false, got {shown(self.bias)}")
        self.prefix = family.visual
        family.check_layers("vision_config.depth", self.n_layer, re.escape(self.prefix) + r"blocks\.(\d+)\.")
        self.mean, self.std = self.normalization()

    def vint(self, key: str, default: int | None = None) -> int:
        value = self.vision.get(key, default)
        if type(value) is not int or not 0 < value < 1 << 20:
            raise self.family.bad(f"vision_config.{key} must be a positive integer, got {shown(value)}")
        return value

    def normalization(self) -> tuple[list[float], list[float]]:
        """image_mean/image_std from preprocessor_config.json (the processor's; CLIP's when absent)."""
        path = self.ckpt.dir / "preprocessor_config.json"
        cfg = read_json(path, "preprocessor_config.json") if path.is_file() else {}
        if not isinstance(cfg, dict):
            raise InputError("preprocessor_config.json must hold an object", path)
        out = []
        for key, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            value = cfg.get(key, list(default))
            if not isinstance(value, list) or len(value) != 3 or not all(is_number(v) for v in value) \
                    or (key == "image_std" and not all(v > 0 for v in value)):
                raise InputError(f"{key!r} must be three numbers{' above 0' if key == 'image_std' else ''}, got "
                                 f"{shown(value)}", path)
            out.append([float(v) for v in value])
        for key in ("patch_size", "merge_size", "temporal_patch_size"):
            expected = {"patch_size": self.patch, "merge_size": self.merge, "temporal_patch_size": self.frames}[key]
            if key in cfg and cfg[key] != expected:
                raise InputError(f"{key!r} is {shown(cfg[key])} but config.json's vision_config says {expected}",
                                 path)
        return out[0], out[1]

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        w.add_bool(KEY_HAS_VISION, True)
        w.add_bool("clip.use_silu", True)
        w.add_uint32("clip.vision.image_size", self.image_size)
        w.add_uint32("clip.vision.patch_size", self.patch)
        w.add_uint32("clip.vision.embedding_length", self.n_embd)
        w.add_uint32("clip.vision.feed_forward_length", self.n_out)
        w.add_uint32("clip.vision.block_count", self.n_layer)
        w.add_uint32("clip.vision.projection_dim", self.n_out)
        w.add_uint32("clip.vision.attention.head_count", self.n_head)
        w.add_float32("clip.vision.attention.layer_norm_epsilon", float(self.eps))
        w.add_array("clip.vision.image_mean", self.mean)
        w.add_array("clip.vision.image_std", self.std)
        w.add_uint32("clip.vision.spatial_merge_size", self.merge)

    def tensors(self) -> list[OutTensor]:
        e, o, f, p, m = self.n_embd, self.n_out, self.n_ff_merger, self.patch, self.merge
        n_pos = (self.image_size // p) ** 2
        vis = self.prefix
        conv = vis + "patch_embed.proj.weight"

        def frame(k: int):
            return lambda a: a[0][:, :, k]

        plan = [
            OutTensor("v.patch_embd.weight", (e, 3, p, p), (conv,), frame(0)),
            OutTensor("v.patch_embd.weight.1", (e, 3, p, p), (conv,), frame(1)),
            OutTensor("v.patch_embd.bias", (e,), (vis + "patch_embed.proj.bias",)),
            OutTensor("v.norm_embd.weight", (e,), (vis + "post_conv_layernorm.weight",)),
            OutTensor("v.position_embd.weight", (n_pos, e), (vis + "embeddings.position_embedding.weight",)),
        ]
        for i in range(self.n_layer):
            src, dst = f"{vis}blocks.{i}.", f"v.blk.{i}."
            plan += [
                OutTensor(dst + "ln1.weight", (e,), (src + "norm1.weight",)),
                OutTensor(dst + "ln2.weight", (e,), (src + "norm2.weight",)),
                OutTensor(dst + "attn_qkv.weight", (3 * e, e), (src + "attn.qkv.weight",)),
                OutTensor(dst + "attn_out.weight", (e, e), (src + "attn.proj.weight",)),
                *([OutTensor(dst + "attn_qkv.bias", (3 * e,), (src + "attn.qkv.bias",))] if self.bias else []),
                OutTensor(dst + "ffn_gate.weight", (o, e), (src + "mlp.gate_proj.weight",)),
                OutTensor(dst + "ffn_up.weight", (o, e), (src + "mlp.up_proj.weight",)),
                OutTensor(dst + "ffn_down.weight", (e, o), (src + "mlp.down_proj.weight",)),
            ]
        merger = vis + "merger."
        plan += [
            OutTensor("v.post_ln.weight", (e,), (vis + "post_layernorm.weight",)),
            OutTensor("mm.patch_merger.weight", (o, e, m, m), (vis + "downsample.weight",)),
            OutTensor("mm.patch_merger.bias", (o,), (vis + "downsample.bias",)),
            OutTensor("mm.model.fc.weight", (o, o), (merger + "proj.weight",)),
            OutTensor("mm.post_norm.weight", (o,), (merger + "post_projection_norm.weight",)),
            OutTensor("mm.post_norm.bias", (o,), (merger + "post_projection_norm.bias",)),
            OutTensor("mm.gate.weight", (f, o), (merger + "gate_proj.weight",)),
            OutTensor("mm.up.weight", (f, o), (merger + "up_proj.weight",)),
            OutTensor("mm.down.weight", (o, f), (merger + "down_proj.weight",)),
        ]
        return plan

    def check_shapes(self, plan: Sequence[OutTensor]) -> None:
        super().check_shapes(list(plan))
        check_shape(self.family, self.prefix + "patch_embed.proj.weight", (self.n_embd, 3, 2, self.patch, self.patch))


CONVERTER = Glm4v

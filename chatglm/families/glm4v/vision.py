"""The GLM-4.1V vision tower as a libmtmd projector: the one writer for GLM-4.1V/4.6V, GLM-4.5V and GLM-OCR (libmtmd
``glm4v``, tools/mtmd/models/glm4v.cpp) and GLM-5.3-Flash (``glm5v``, which ``chatglm/families/glm5_next/vision.py``
extends with its SwiGLU clamp and token budget).

The tower (``model.visual.*``, or ``visual.*`` as transformers before 4.52 saved it): a Conv3d patch embedding two
frames deep, split along time into ``v.patch_embd.weight`` and ``.weight.1`` (libmtmd applies both to the image, its
own second frame, and adds them); ViT blocks with RMS norms (``ln1``, ``ln2``), fused ``attn_qkv``, 2-D rope and a
SwiGLU MLP; an RMSNorm after them (``v.post_ln``); the 2x2 ``downsample`` convolution (``mm.patch_merger``); the
merger: linear (``mm.model.fc``), LayerNorm (``mm.post_norm``), GELU, SwiGLU (``mm.gate``/``mm.up``/``mm.down``).

What the towers differ in each family declares as a :class:`Tower`: the widths of the two MLPs, the learned position
table with the RMSNorm after the patch embedding (GLM-4.1V, GLM-4.5V; libmtmd resamples the table to each image's
grid), per-head q/k RMS norms (GLM-OCR, GLM-5.3-Flash), which tensors ``attention_bias`` gives biases, and the image
normalization used when preprocessor_config.json is absent (none: the file is required). The tensors themselves
and their shapes are ``tower.py``'s table, which the runtime's projector check reads too.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence

import gguf
import numpy as np

from chatglm.convert.checkpoint import read_json
from chatglm.convert.config_types import is_number, shown
from chatglm.convert.family import OutTensor, check_shape
from chatglm.convert.mmproj import KEY_HAS_VISION, Projector
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.glm4v.tower import Tower, layout
from chatglm.limits import MAX_NORM_EPS

T = gguf.MODEL_TENSOR
KV = gguf.Keys.ClipVision
PREFIXES = ("model.visual.", "visual.")  # transformers 4.52 on, and before
IMAGE_TOKENS = ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>")
# transformers' Glm4vImageProcessor defaults (OpenAI CLIP's image mean and std)
CLIP_NORM = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
# vision_config sizes with transformers' defaults (None: required)
SIZES = {"depth": None, "hidden_size": None, "num_heads": None, "out_hidden_size": None, "patch_size": 14,
         "spatial_merge_size": 2, "temporal_patch_size": 2, "image_size": 336, "in_channels": 3}
# preprocessor_config.json key -> the vision_config size it must equal
PROCESSOR_SIZES = {"patch_size": "patch_size", "merge_size": "spatial_merge_size",
                   "temporal_patch_size": "temporal_patch_size"}

def sub_config(ckpt, key: str) -> dict[str, Any]:
    """``config.json``'s ``text_config``/``vision_config`` (a dict, or one line naming the file)."""
    value = getattr(ckpt, "full_config", ckpt.config).get(key)
    if not isinstance(value, dict):
        raise InputError(f"config.json has no {key!r} object (a vision checkpoint keeps its parts' settings there)",
                         ckpt.dir / "config.json")
    return value


def _frame(k: int):
    def build(arrays: Sequence[np.ndarray]) -> np.ndarray:
        return arrays[0][:, :, k]  # (out, in, time, h, w) -> frame k's (out, in, h, w)
    return build


class GlmVisionProjector(Projector):
    """A GLM vision tower and merger (``tower`` says how this family's differs) as a libmtmd projector."""

    f32_tensors = (gguf.TENSOR_NAMES[T.V_ENC_EMBD_POS] + ".weight",)

    def __init__(self, family, tower: Tower):
        super().__init__(family)
        self.tower = tower
        self.projector_type = tower.projector_type
        self.vision = sub_config(family.ckpt, "vision_config")
        act = self.vision.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"vision_config.hidden_act={shown(act)} is not supported (libmtmd's "
                                        f"{tower.projector_type} takes 'silu')", family.config_path)
        self.size = {key: self.vint(key, default) for key, default in SIZES.items()}
        self.check_sizes()
        self.eps = self.vision.get("rms_norm_eps", 1e-5)
        if not is_number(self.eps) or not 0 < self.eps < MAX_NORM_EPS:
            raise family.bad(f"vision_config.rms_norm_eps must be a small positive number, got {shown(self.eps)}")
        bias = self.vision.get("attention_bias", tower.bias_default)
        if type(bias) is not bool:
            raise family.bad(f"vision_config.attention_bias must be true or false, got {shown(bias)}")
        self.parts = {*(("positions",) if tower.positions else ()), *(("qk_norm",) if tower.qk_norm else ()),
                      *(tower.biased if bias else ())}
        names = family.ckpt.names()
        self.prefix = PREFIXES[1] if any(n.startswith(PREFIXES[1]) for n in names) else PREFIXES[0]
        family.check_layers("vision_config.depth", self.size["depth"], re.escape(self.prefix) + r"blocks\.(\d+)\.")
        self.pre = self.preprocessor()
        self.mean, self.std = self.normalization()

    def vint(self, key: str, default: int | None = None) -> int:
        value = self.vision.get(key, default)
        if type(value) is not int or not 0 < value < 1 << 20:
            raise self.family.bad(f"vision_config.{key} must be a positive integer, got {shown(value)}")
        return value

    def width(self, keys: tuple[str, ...]) -> int:
        return math.prod(self.vint(key, SIZES.get(key)) for key in keys)

    def check_sizes(self) -> None:
        s, family = self.size, self.family
        if s["temporal_patch_size"] != 2:
            raise UnsupportedModelError(f"vision_config.temporal_patch_size={s['temporal_patch_size']} is not "
                                        f"supported: libmtmd's {self.projector_type} takes temporal_patch_size=2 (a "
                                        "kernel two frames deep)", family.config_path)
        if s["in_channels"] != 3:
            raise family.bad(f"vision_config.in_channels must be 3 (RGB), got {s['in_channels']}")
        d, n_head = s["hidden_size"], s["num_heads"]
        if d % n_head or (d // n_head) % 4:
            raise family.bad(f"vision_config.hidden_size ({d}) must split into num_heads ({n_head}) heads of a "
                             "multiple of 4 dims (libmtmd's 2-D rope)")
        if s["out_hidden_size"] != family.hp.n_embd:
            raise family.bad(f"vision_config.out_hidden_size ({s['out_hidden_size']}) differs from the language "
                             f"model's hidden_size ({family.hp.n_embd})")

    def preprocessor(self) -> dict[str, Any]:
        """preprocessor_config.json (``{}`` when absent and the tower has a default normalization)."""
        path = self.ckpt.dir / "preprocessor_config.json"
        if not path.is_file():
            if self.tower.default_norm is None:
                raise InputError("preprocessor_config.json not found (a vision checkpoint ships it)", path)
            return {}
        pre = read_json(path, "preprocessor_config.json")
        if not isinstance(pre, dict):
            raise InputError("preprocessor_config.json must hold an object", path)
        for key, size in PROCESSOR_SIZES.items():
            if key in pre and pre[key] != self.size[size]:
                raise InputError(f"{key!r} is {shown(pre[key])} but config.json's vision_config says "
                                 f"{self.size[size]}", path)
        return pre

    def normalization(self) -> tuple[list[float], list[float]]:
        """image_mean/image_std: preprocessor_config.json's (the tower's default where the file is absent)."""
        out, default = [], self.tower.default_norm or (None, None)
        for key, fallback in zip(("image_mean", "image_std"), default):
            value = self.pre.get(key, None if fallback is None else list(fallback))
            if (not isinstance(value, list) or len(value) != 3 or not all(is_number(v) and abs(v) < 1e6 for v in value)
                    or (key == "image_std" and not all(v > 0 for v in value))):
                raise InputError(f"{key} must be three numbers (std positive), got {shown(value)}",
                                 self.ckpt.dir / "preprocessor_config.json")
            out.append([float(v) for v in value])
        return out[0], out[1]

    def check_vocabulary(self) -> None:
        """The image prompts' tokens are in tokenizer.json (else the projector could not be used: the runtime refuses
        it); checked when the projector is written, so ``--no-mmproj`` converts the text model of such a folder."""
        path = self.ckpt.dir / "tokenizer.json"
        added = read_json(path, "tokenizer.json").get("added_tokens") if path.is_file() else None
        have = {t.get("content") for t in added if isinstance(t, dict)} if isinstance(added, list) else set()
        missing = [t for t in IMAGE_TOKENS if t not in have]
        if missing:
            raise InputError(f"the vocabulary lacks {', '.join(missing)}, which image prompts need (--no-mmproj "
                             "converts the text model alone)", path)

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check_vocabulary()
        s = self.size
        w.add_bool(KEY_HAS_VISION, True)
        w.add_bool(KV.USE_SILU, True)
        sizes = ((KV.IMAGE_SIZE, s["image_size"]), (KV.PATCH_SIZE, s["patch_size"]),
                 (KV.EMBEDDING_LENGTH, s["hidden_size"]), (KV.FEED_FORWARD_LENGTH, self.width(self.tower.tower_ff)),
                 (KV.BLOCK_COUNT, s["depth"]), (KV.PROJECTION_DIM, s["out_hidden_size"]),
                 (KV.Attention.HEAD_COUNT, s["num_heads"]))
        for key, value in sizes:
            w.add_uint32(key, value)
        w.add_float32(KV.Attention.LAYERNORM_EPS, float(self.eps))
        w.add_array(KV.IMAGE_MEAN, self.mean)
        w.add_array(KV.IMAGE_STD, self.std)
        w.add_uint32(KV.SPATIAL_MERGE_SIZE, s["spatial_merge_size"])

    def sizes(self) -> dict[str, int]:
        s = self.size
        d, p = s["hidden_size"], s["patch_size"]
        return {"d": d, "3d": 3 * d, "head": d // s["num_heads"], "ff": self.width(self.tower.tower_ff),
                "o": s["out_hidden_size"], "merger_ff": self.width(self.tower.merger_ff), "p": p,
                "m": s["spatial_merge_size"], "n_pos": (s["image_size"] // p) ** 2, "rgb": s["in_channels"]}

    def tensors(self) -> list[OutTensor]:
        """The rows of the shared table (``tower.py``) for this tower's parts; each patch frame cut from the Conv3d."""
        plan = []
        for r in layout(self.sizes(), self.size["depth"], self.parts):
            sources = (self.prefix + r.source,)
            plan.append(OutTensor(r.name, r.shape, sources) if r.frame is None
                        else OutTensor(r.name, r.shape, sources, _frame(r.frame)))
        return plan

    def check_shapes(self, plan: list[OutTensor]) -> None:
        super().check_shapes(plan)
        d, p = self.size["hidden_size"], self.size["patch_size"]
        check_shape(self.family, self.prefix + "patch_embed.proj.weight", (d, 3, 2, p, p))

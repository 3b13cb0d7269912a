"""The converter of ``Glm4vMoeForConditionalGeneration`` (GLM-4.5V) and the ``glm4v`` projector GLM-OCR shares.

Language model: GLM-4.5's (``chatglm/families/glm4_moe``) read from under ``model.language_model.`` with
config.json's ``text_config``, plus multimodal rope: transformers rotates the first ``partial_rotary_factor`` of each
head in halves (llama.cpp's MROPE is NeoX-style too, so Q/K are copied unchanged), the frequency pairs split into
``mrope_section`` (time, height, width): ``rope.dimension_sections``. Text alone runs as plain rope (every section
takes the same position).

Projector (``modeling_glm4v_moe.py``'s vision tower → libmtmd ``glm4v``, ``tools/mtmd/models/glm4v.cpp``): the
Conv3d patch embedding split along time into ``v.patch_embd.weight`` / ``.weight.1`` (two frames of one image are
the same picture), RMSNorm after it (``v.norm_embd``), learned positions (``v.position_embd``, resampled bicubically
by both sides), ViT blocks with RMSNorm, fused qkv, 2-D rope and a SwiGLU MLP (width ``out_hidden_size``), RMSNorm
(``v.post_ln``), the 2x2 patch merger (a Conv2d: ``mm.patch_merger``), then the merger MLP: linear, LayerNorm, GELU,
SwiGLU (``mm.model.fc``, ``mm.post_norm``, ``mm.gate/up/down``).
"""

from __future__ import annotations

from typing import Any, Sequence

import gguf
import numpy as np

from chatglm.convert.checkpoint import CheckpointView, read_json
from chatglm.convert.config_types import shown
from chatglm.convert.family import OutTensor
from chatglm.convert.mmproj import KEY_HAS_VISION, Projector
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.glm4_moe.convert import Glm4Moe
from chatglm.families.glm4v import FAMILY as GLM4V
from chatglm.families.glm4v_moe import FAMILY
from chatglm.limits import MAX_NORM_EPS

KEY_USE_SILU = "clip.use_silu"
KEY_SWIGLU_CLAMP = "clip.vision.swiglu_clamp"
TEXT_PREFIX = "model.language_model."
VISION_PREFIX = "model.visual."
IMAGE_TOKENS = ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>")
DEFAULT_MROPE = [8, 12, 12]  # transformers' mrope_section when the config names none


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


def sub_config(ckpt, key: str) -> dict[str, Any]:
    """``config.json``'s ``text_config``/``vision_config`` (a dict, or one line naming the file)."""
    value = getattr(ckpt, "full_config", ckpt.config).get(key)
    if not isinstance(value, dict):
        raise InputError(f"config.json has no {key!r} object (a vision checkpoint keeps its parts' settings there)",
                         ckpt.dir / "config.json")
    return value


def text_view(ckpt) -> LanguageModelView:
    """The language model of a GLM vision checkpoint; the top-level ``tie_word_embeddings`` is the one saved."""
    text = dict(sub_config(ckpt, "text_config"))
    if "tie_word_embeddings" in ckpt.config:
        text["tie_word_embeddings"] = ckpt.config["tie_word_embeddings"]
    return LanguageModelView(ckpt, text)


def mrope_sections(family) -> list[int]:
    """``mrope_section`` (frequency pairs per time/height/width), checked to cover the rotated dimensions."""
    params = family.config.get("rope_parameters") or family.config.get("rope_scaling") or {}
    sections = params.get("mrope_section", DEFAULT_MROPE)
    if (not isinstance(sections, list) or not 1 <= len(sections) <= 4
            or any(type(s) is not int or s < 0 for s in sections) or sum(sections) * 2 != family.hp.n_rot):
        raise family.bad(f"'mrope_section' must be up to 4 non-negative integers summing to half the rotated "
                         f"dimensions ({family.hp.n_rot // 2}), got {shown(sections)}")
    return sections + [0] * (4 - len(sections))


def _time_slice(t: int):
    def build(arrays: Sequence[np.ndarray]) -> np.ndarray:
        return arrays[0][:, :, t]  # (out, in, time, h, w) -> one frame's (out, in, h, w)
    return build


class Glm4vProjector(Projector):
    """The GLM-4.1V-lineage vision tower (GLM-4.5V, GLM-OCR) as libmtmd's ``glm4v`` projector."""

    projector_type = GLM4V.projectors[0].projector_type  # the GLM-4.1V family's (libmtmd glm4v)
    f32_tensors = ("v.position_embd.weight",)
    prefix = VISION_PREFIX
    qk_norm = False  # GLM-OCR: per-head RMSNorm of q and k
    # attention_bias puts a bias on qkv; GLM-4.5V's output projection has none (GLM-OCR's and GLM-5.3-Flash's do)
    out_bias = False

    def tower_ff(self) -> int:
        """The width of the ViT blocks' MLP (GLM-4.5V: ``out_hidden_size``)."""
        return self.vint("out_hidden_size")

    def merger_ff(self) -> int:
        """The width of the merger's SwiGLU (GLM-4.5V: ``intermediate_size``)."""
        return self.vint("intermediate_size")

    def __init__(self, family):
        super().__init__(family)
        self.config = sub_config(family.ckpt, "vision_config")
        self.path = family.ckpt.dir / "config.json"
        cfg = self.config
        self.n_layer = self.vint("depth")
        self.n_embd = self.vint("hidden_size")
        self.n_head = self.vint("num_heads")
        if self.n_embd % self.n_head or (self.n_embd // self.n_head) % 4:
            raise self.bad(f"vision hidden_size {self.n_embd} over num_heads {self.n_head} must give a head size "
                           "that is a multiple of 4 (2-D rope)")
        self.n_out = self.vint("out_hidden_size")
        self.n_ff, self.n_ff_merger = self.tower_ff(), self.merger_ff()
        self.patch = self.vint("patch_size")
        self.image_size = self.vint("image_size")
        self.merge = self.vint("spatial_merge_size")
        self.n_pos = (self.image_size // self.patch) ** 2
        if self.vint("temporal_patch_size") != 2 or self.vint("in_channels", 3) != 3:
            raise UnsupportedModelError("only temporal_patch_size=2 and in_channels=3 are supported (what libmtmd's "
                                        "glm4v reads)", self.path)
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"vision hidden_act={shown(cfg.get('hidden_act'))} is not supported "
                                        "(libmtmd's glm4v takes 'silu')", self.path)
        self.eps = cfg.get("rms_norm_eps", 1e-5)
        if not isinstance(self.eps, (int, float)) or not 0 < self.eps <= MAX_NORM_EPS:
            raise self.bad(f"vision rms_norm_eps must be a small positive number, got {shown(self.eps)}")
        self.bias = cfg.get("attention_bias", False) is True
        if self.n_out != family.hp.n_embd:
            raise self.bad(f"vision out_hidden_size ({self.n_out}) differs from the language model's hidden_size "
                           f"({family.hp.n_embd})")
        self.mean, self.std = self.normalization()

    def bad(self, problem: str) -> InputError:
        return InputError(problem, self.path)

    def vint(self, key: str, default: int | None = None) -> int:
        value = self.config.get(key, default)
        if type(value) is not int or not 0 < value < 1 << 20:
            raise self.bad(f"vision_config {key!r} must be a positive integer, got {shown(value)}")
        return value

    def normalization(self) -> tuple[list[float], list[float]]:
        """``image_mean``/``image_std`` of preprocessor_config.json (three numbers each)."""
        path = self.family.ckpt.dir / "preprocessor_config.json"
        if not path.is_file():
            raise InputError("preprocessor_config.json not found (a vision checkpoint ships it)", path)
        pre = read_json(path, "preprocessor_config.json")
        out = []
        for key in ("image_mean", "image_std"):
            value = pre.get(key) if isinstance(pre, dict) else None
            if (not isinstance(value, list) or len(value) != 3
                    or not all(isinstance(v, (int, float)) and abs(v) < 1e6 for v in value)
                    or (key == "image_std" and min(value) <= 0)):
                raise InputError(f"{key} must be three numbers (std positive), got {shown(value)}", path)
            out.append([float(v) for v in value])
        return out[0], out[1]

    @property
    def n_embd_out(self) -> int:
        return self.n_out

    def check_vocabulary(self) -> None:
        """The image prompts' tokens are in tokenizer.json (else the projector could not be used: the runtime refuses
        it); checked when the projector is written, so ``--no-mmproj`` converts the text model of such a folder."""
        path = self.family.ckpt.dir / "tokenizer.json"
        added = read_json(path, "tokenizer.json").get("added_tokens") if path.is_file() else None
        have = {t.get("content") for t in added if isinstance(t, dict)} if isinstance(added, list) else set()
        missing = [t for t in IMAGE_TOKENS if t not in have]
        if missing:
            raise InputError(f"the vocabulary lacks {', '.join(missing)}, which image prompts need (--no-mmproj "
                             "converts the text model alone)", path)

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        self.check_vocabulary()
        w.add_bool(KEY_HAS_VISION, True)
        w.add_bool(KEY_USE_SILU, True)
        w.add_vision_image_size(self.image_size)
        w.add_vision_patch_size(self.patch)
        w.add_vision_embedding_length(self.n_embd)
        w.add_vision_feed_forward_length(self.n_ff)
        w.add_vision_block_count(self.n_layer)
        w.add_vision_projection_dim(self.n_out)
        w.add_vision_head_count(self.n_head)
        w.add_vision_attention_layernorm_eps(float(self.eps))
        w.add_vision_image_mean(self.mean)
        w.add_vision_image_std(self.std)
        w.add_vision_spatial_merge_size(self.merge)

    def src(self, name: str) -> str:
        return self.prefix + name

    def tensors(self) -> list[OutTensor]:
        d, p, m = self.n_embd, self.patch, self.merge
        conv = self.src("patch_embed.proj.weight")
        plan = [OutTensor("v.patch_embd.weight", (d, 3, p, p), (conv,), _time_slice(0)),
                OutTensor("v.patch_embd.weight.1", (d, 3, p, p), (conv,), _time_slice(1)),
                OutTensor("v.patch_embd.bias", (d,), (self.src("patch_embed.proj.bias"),))]
        if self.has("post_conv_layernorm.weight"):
            plan.append(OutTensor("v.norm_embd.weight", (d,), (self.src("post_conv_layernorm.weight"),)))
        if self.has("embeddings.position_embedding.weight"):
            plan.append(OutTensor("v.position_embd.weight", (self.n_pos, d),
                                  (self.src("embeddings.position_embedding.weight"),)))
        for i in range(self.n_layer):
            plan += self.block_tensors(i)
        plan.append(OutTensor("v.post_ln.weight", (d,), (self.src("post_layernorm.weight"),)))
        o = self.n_out
        plan += [OutTensor("mm.patch_merger.weight", (o, d, m, m), (self.src("downsample.weight"),)),
                 OutTensor("mm.patch_merger.bias", (o,), (self.src("downsample.bias"),)),
                 OutTensor("mm.model.fc.weight", (o, o), (self.src("merger.proj.weight"),)),
                 OutTensor("mm.post_norm.weight", (o,), (self.src("merger.post_projection_norm.weight"),)),
                 OutTensor("mm.post_norm.bias", (o,), (self.src("merger.post_projection_norm.bias"),)),
                 OutTensor("mm.gate.weight", (self.n_ff_merger, o), (self.src("merger.gate_proj.weight"),)),
                 OutTensor("mm.up.weight", (self.n_ff_merger, o), (self.src("merger.up_proj.weight"),)),
                 OutTensor("mm.down.weight", (o, self.n_ff_merger), (self.src("merger.down_proj.weight"),))]
        return plan

    def has(self, name: str) -> bool:
        return self.src(name) in set(self.ckpt.names())

    def block_tensors(self, i: int) -> list[OutTensor]:
        d, ff, blk, src = self.n_embd, self.n_ff, f"v.blk.{i}", f"blocks.{i}."
        plan = [OutTensor(f"{blk}.ln1.weight", (d,), (self.src(src + "norm1.weight"),)),
                OutTensor(f"{blk}.ln2.weight", (d,), (self.src(src + "norm2.weight"),)),
                OutTensor(f"{blk}.attn_qkv.weight", (3 * d, d), (self.src(src + "attn.qkv.weight"),)),
                OutTensor(f"{blk}.attn_out.weight", (d, d), (self.src(src + "attn.proj.weight"),))]
        if self.bias:
            plan.append(OutTensor(f"{blk}.attn_qkv.bias", (3 * d,), (self.src(src + "attn.qkv.bias"),)))
        if self.bias and self.out_bias:
            plan.append(OutTensor(f"{blk}.attn_out.bias", (d,), (self.src(src + "attn.proj.bias"),)))
        if self.qk_norm:
            head = d // self.n_head
            plan += [OutTensor(f"{blk}.attn_q_norm.weight", (head,), (self.src(src + "attn.q_norm.weight"),)),
                     OutTensor(f"{blk}.attn_k_norm.weight", (head,), (self.src(src + "attn.k_norm.weight"),))]
        for proj, shape in (("gate", (ff, d)), ("up", (ff, d)), ("down", (d, ff))):
            plan.append(OutTensor(f"{blk}.ffn_{proj}.weight", shape, (self.src(f"{src}mlp.{proj}_proj.weight"),)))
            if self.mlp_bias:
                plan.append(OutTensor(f"{blk}.ffn_{proj}.bias", shape[:1], (self.src(f"{src}mlp.{proj}_proj.bias"),)))
        return plan

    @property
    def mlp_bias(self) -> bool:
        """GLM-4.5V's tower MLP has no biases whatever ``attention_bias`` says (GLM-OCR's follows it)."""
        return False

    def check_shapes(self, plan: list[OutTensor]) -> None:
        super().check_shapes(plan)
        conv = self.src("patch_embed.proj.weight")
        shape = tuple(self.ckpt.info(conv).shape)
        if shape != (self.n_embd, 3, 2, self.patch, self.patch):
            raise InputError(f"tensor {conv!r} has shape {list(shape)}, expected "
                             f"{[self.n_embd, 3, 2, self.patch, self.patch]}", self.ckpt.file_of(conv))


class Glm4vMoe(Glm4Moe):
    name = FAMILY.variants[0]
    arch = FAMILY.arch

    def __init__(self, ckpt):
        super().__init__(text_view(ckpt))
        self.sections = mrope_sections(self)

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        super().write_metadata(w)
        w.add_rope_dimension_sections(self.sections)

    def projector(self) -> Glm4vProjector:
        return Glm4vProjector(self)


CONVERTER = Glm4vMoe


class Glm5vProjector(Glm4vProjector):
    """GLM-5.3-Flash's vision tower as libmtmd's ``glm5v``: GLM-OCR's tower (per-head q/k norms, no learned positions,
    biases when ``attention_bias``) with every SwiGLU clamped at ``swiglu_limit`` (gate above, up both ways), a merger
    ``projection_intermediate_size`` wide and the image processor's token budget (its canvas is aligned up to whole
    merged patches and padded, so an image in whole 28-pixel units within the budget is not resized)."""

    projector_type = "glm5v"
    qk_norm = True
    out_bias = True

    def __init__(self, family):
        names = family.ckpt.names()
        self.prefix = VISION_PREFIX if any(n.startswith(VISION_PREFIX) for n in names) else "visual."
        super().__init__(family)
        self.limit = self.config.get("swiglu_limit", 10.0)
        if not isinstance(self.limit, (int, float)) or isinstance(self.limit, bool) or not 0 < self.limit < 1e30:
            raise self.bad(f"vision swiglu_limit must be a positive number, got {shown(self.limit)}")
        self.min_pixels, self.max_pixels = self.token_budget()

    def tower_ff(self) -> int:
        return self.vint("intermediate_size")

    def merger_ff(self) -> int:
        return self.vint("projection_intermediate_size")

    @property
    def mlp_bias(self) -> bool:
        return self.bias

    def token_budget(self) -> tuple[int, int]:
        """(min, max) pixels of one frame: preprocessor_config.json's ``min/max_image_tokens`` (transformers'
        defaults 16 and 8000) times the pixels of one merged patch."""
        pre = read_json(self.family.ckpt.dir / "preprocessor_config.json", "preprocessor_config.json")
        unit = (self.patch * self.merge) ** 2
        out = []
        for key, default in (("min_image_tokens", 16), ("max_image_tokens", 8000)):
            value = pre.get(key, default)
            if type(value) is not int or not 0 < value <= (1 << 31) // unit:
                raise InputError(f"{key} must be a positive integer, got {shown(value)}",
                                 self.family.ckpt.dir / "preprocessor_config.json")
            out.append(value * unit)
        if out[0] > out[1]:
            raise InputError("min_image_tokens is more than max_image_tokens",
                             self.family.ckpt.dir / "preprocessor_config.json")
        return out[0], out[1]

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        super().write_metadata(w)
        w.add_float32(KEY_SWIGLU_CLAMP, float(self.limit))
        w.add_vision_min_pixels(self.min_pixels)
        w.add_vision_max_pixels(self.max_pixels)

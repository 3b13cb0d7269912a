"""GLM-Edge-V's vision tower as a libmtmd projector (``clip.projector_type`` ``adapter``: clip-impl.h's name for
PROJECTOR_TYPE_GLM_EDGE; the graph is tools/mtmd/models/llava.cpp's GLM_EDGE branch).

The published checkpoint (THUDM/glm-edge-v-2b, -5b) keeps the tower under ``model.vision.``:

- ``vit.model.vision_model.*``: a SigLIP vision transformer (the layout of transformers' ``SiglipVisionModel``):
  a patch convolution with bias, a learned position table (one row per patch, no class token), pre-norm blocks
  with LayerNorms, separate biased q/k/v/o, a tanh-GELU MLP (``fc1``/``fc2``), then ``post_layernorm``. Its pooling
  head (``head.*``) is not used: the adapter takes every patch.
- ``adapter.*``: a 2x2 stride-2 convolution from the tower's width to the language model's (``conv``); the GLU
  ``linear_proj``: a bias-free linear, a LayerNorm, GELU, then ``dense_4h_to_h(silu(gate_proj(x)) *
  dense_h_to_4h(x))`` (the language model's intermediate_size); and the learned ``boi``/``eoi`` embeddings put
  before and after the image's (libmtmd adds them itself: the image takes (grid/2)^2 + 2 embeddings).

libmtmd's loader names (clip-impl.h ``TN_GLM_*``) are not among gguf-py's tensor names, so :data:`ADAPTER` spells
them. Its loader swaps a block's ``ffn_up``/``ffn_down`` when ``ffn_down``'s rows are the tower's width (files of the
legacy converter named them the other way round), so a tower whose MLP is as wide as the tower is refused.
"""

from __future__ import annotations

from typing import Any, Sequence

import gguf
import numpy as np

from chatglm.convert.checkpoint import read_json
from chatglm.convert.config_types import is_number, shown
from chatglm.convert.family import OutTensor
from chatglm.convert.mmproj import KEY_HAS_VISION, Projector, image_normalization, missing_added_tokens
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.glm4_hf import FAMILY
from chatglm.families.glm4v.vision import GlmVisionProjector, sub_config
from chatglm.limits import MAX_NORM_EPS

T = gguf.MODEL_TENSOR
KV = gguf.Keys.ClipVision
TOWER = "model.vision.vit.model.vision_model."
ADAPTER_PREFIX = "model.vision.adapter."
PROJECTOR_TYPE, IMAGE_TOKEN = FAMILY.projectors[0].projector_type, FAMILY.projectors[0].placeholder
SIGLIP_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # SiglipImageProcessor's defaults
# SigLIP's pooling head (unused) and the position-id buffer older transformers saved
IGNORED = (r"model\.vision\.vit\.model\.vision_model\.head\..*",
           r"model\.vision\.vit\.model\.vision_model\.embeddings\.position_ids")
# vision_config sizes with SiglipVisionConfig's defaults (None: required)
SIZES = {"hidden_size": None, "intermediate_size": None, "num_hidden_layers": None, "num_attention_heads": None,
         "image_size": 224, "patch_size": 16, "num_channels": 3}

# (GGUF tensor, source below TOWER, numpy shape in the names of ``sizes``)
STEM = (
    (T.V_ENC_EMBD_PATCH, "embeddings.patch_embedding.bias", ("d",)),
    (T.V_ENC_EMBD_POS, "embeddings.position_embedding.weight", ("n_pos", "d")),
)
BLOCK = tuple(  # below ``encoder.layers.{bid}.``
    (t, f"{src}.{kind}", shape if kind == "weight" else shape[:1])
    for t, src, shape in ((T.V_ENC_INPUT_NORM, "layer_norm1", ("d",)), (T.V_ENC_ATTN_Q, "self_attn.q_proj", ("d", "d")),
                          (T.V_ENC_ATTN_K, "self_attn.k_proj", ("d", "d")),
                          (T.V_ENC_ATTN_V, "self_attn.v_proj", ("d", "d")),
                          (T.V_ENC_ATTN_O, "self_attn.out_proj", ("d", "d")),
                          (T.V_ENC_POST_ATTN_NORM, "layer_norm2", ("d",)), (T.V_ENC_FFN_UP, "mlp.fc1", ("ff", "d")),
                          (T.V_ENC_FFN_DOWN, "mlp.fc2", ("d", "ff")))
    for kind in ("weight", "bias")
)
HEAD = ((T.V_POST_NORM, "post_layernorm.weight", ("d",)), (T.V_POST_NORM, "post_layernorm.bias", ("d",)))
# (libmtmd's name, source below ADAPTER_PREFIX, numpy shape); boi/eoi (1, 1, n) are written (1, n)
ADAPTER = (
    ("adapter.conv.weight", "conv.weight", ("n", "d", "k", "k")),
    ("adapter.conv.bias", "conv.bias", ("n",)),
    ("adapter.linear.linear.weight", "linear_proj.linear_proj.weight", ("n", "n")),
    ("adapter.linear.norm1.weight", "linear_proj.norm1.weight", ("n",)),
    ("adapter.linear.norm1.bias", "linear_proj.norm1.bias", ("n",)),
    ("adapter.linear.dense_h_to_4h.weight", "linear_proj.dense_h_to_4h.weight", ("n_ff", "n")),
    ("adapter.linear.gate.weight", "linear_proj.gate_proj.weight", ("n_ff", "n")),
    ("adapter.linear.dense_4h_to_h.weight", "linear_proj.dense_4h_to_h.weight", ("n", "n_ff")),
)
MARKERS = (("adapter.boi", "boi"), ("adapter.eoi", "eoi"))


def _row(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return arrays[0].reshape(1, -1)  # (1, 1, n) -> (1, n)


class GlmEdgeVisionProjector(Projector):
    """GLM-Edge-V's SigLIP tower and adapter as libmtmd's GLM_EDGE projector."""

    projector_type = PROJECTOR_TYPE
    # the position table, and boi/eoi (ggml_concat joins them to f32 embeddings: they must be f32 too)
    f32_tensors = (gguf.TENSOR_NAMES[T.V_ENC_EMBD_POS] + ".weight", *(name for name, _ in MARKERS))

    def __init__(self, family):
        super().__init__(family)
        self.vision = sub_config(family.ckpt, "vision_config")
        act = self.vision.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise UnsupportedModelError(f"vision_config.hidden_act={shown(act)} is not supported (libmtmd's GLM-Edge "
                                        "graph takes SigLIP's 'gelu_pytorch_tanh')", family.config_path)
        self.size = {key: self.vint(key, default) for key, default in SIZES.items()}
        self.check_sizes()
        self.eps = self.vision.get("layer_norm_eps", 1e-6)
        if not is_number(self.eps) or not 0 < self.eps < MAX_NORM_EPS:
            raise family.bad(f"vision_config.layer_norm_eps must be a small positive number, got {shown(self.eps)}")
        family.check_layers("vision_config.num_hidden_layers", self.size["num_hidden_layers"],
                            r"model\.vision\.vit\.model\.vision_model\.encoder\.layers\.(\d+)\.")
        self.mean, self.std = self.normalization()

    vint = GlmVisionProjector.vint  # vision_config's positive integers, as the GLM-4.1V tower reads them

    def check_sizes(self) -> None:
        s, bad = self.size, self.family.bad
        if s["num_channels"] != 3:
            raise bad(f"vision_config.num_channels must be 3 (RGB), got {s['num_channels']}")
        if s["hidden_size"] % s["num_attention_heads"]:
            raise bad(f"vision_config.hidden_size ({s['hidden_size']}) must split into num_attention_heads "
                      f"({s['num_attention_heads']}) heads")
        grid, rest = divmod(s["image_size"], s["patch_size"])
        if rest or grid % 2:
            raise bad(f"vision_config.image_size ({s['image_size']}) must be an even number of patches of "
                      f"{s['patch_size']} (the adapter merges 2x2 patches)")
        if s["intermediate_size"] == s["hidden_size"]:
            raise UnsupportedModelError(f"vision_config.intermediate_size equal to hidden_size ({s['hidden_size']}) "
                                        "is not supported: libmtmd's loader would take the MLP's two matrices for "
                                        "each other", self.family.config_path)

    def normalization(self) -> tuple[list[float], list[float]]:
        """image_mean/image_std of preprocessor_config.json (SigLIP's 0.5/0.5 where the file is absent)."""
        path = self.ckpt.dir / "preprocessor_config.json"
        pre: Any = read_json(path, "preprocessor_config.json") if path.is_file() else {}
        if not isinstance(pre, dict):
            raise InputError("preprocessor_config.json must hold an object", path)
        return image_normalization(pre, SIGLIP_NORM, path)

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        if missing_added_tokens(self.ckpt.dir, (IMAGE_TOKEN,)):  # --no-mmproj still converts the text model
            raise InputError(f"the vocabulary lacks {IMAGE_TOKEN}, which image prompts need (--no-mmproj converts "
                             "the text model alone)", self.ckpt.dir / "tokenizer.json")
        s = self.size
        w.add_bool(KEY_HAS_VISION, True)
        w.add_bool(KV.USE_GELU, True)
        for key, value in ((KV.IMAGE_SIZE, s["image_size"]), (KV.PATCH_SIZE, s["patch_size"]),
                           (KV.EMBEDDING_LENGTH, s["hidden_size"]), (KV.FEED_FORWARD_LENGTH, s["intermediate_size"]),
                           (KV.BLOCK_COUNT, s["num_hidden_layers"]), (KV.PROJECTION_DIM, self.n_embd_out),
                           (KV.Attention.HEAD_COUNT, s["num_attention_heads"])):
            w.add_uint32(key, value)
        w.add_float32(KV.Attention.LAYERNORM_EPS, float(self.eps))
        w.add_array(KV.IMAGE_MEAN, self.mean)
        w.add_array(KV.IMAGE_STD, self.std)

    def sizes(self) -> dict[str, int]:
        """The dimensions the tensor tables name ("k": the adapter's 2x2 kernel)."""
        s, hp = self.size, self.family.hp
        return {"d": s["hidden_size"], "ff": s["intermediate_size"], "n": hp.n_embd, "n_ff": hp.n_ff,
                "n_pos": (s["image_size"] // s["patch_size"]) ** 2, "k": 2}

    def rows(self, table, sizes: dict, below: str, bid: int | None = None) -> list[OutTensor]:
        return [OutTensor(gguf.TENSOR_NAMES[t].format(bid=bid) + "." + source.rsplit(".", 1)[1],
                          tuple(sizes[x] for x in shape), (below + source,)) for t, source, shape in table]

    def tensors(self) -> list[OutTensor]:
        sizes, p = self.sizes(), self.size["patch_size"]
        plan = [OutTensor(gguf.TENSOR_NAMES[T.V_ENC_EMBD_PATCH] + ".weight", (sizes["d"], 3, p, p),
                          (TOWER + "embeddings.patch_embedding.weight",))]
        plan += self.rows(STEM, sizes, TOWER)
        for bid in range(self.size["num_hidden_layers"]):
            plan += self.rows(BLOCK, sizes, f"{TOWER}encoder.layers.{bid}.", bid)
        plan += self.rows(HEAD, sizes, TOWER)
        plan += [OutTensor(name, tuple(sizes[x] for x in shape), (ADAPTER_PREFIX + source,))
                 for name, source, shape in ADAPTER]
        return plan + [OutTensor(name, (1, sizes["n"]), (ADAPTER_PREFIX + source,), _row) for name, source in MARKERS]

    def check_shapes(self, plan: list[OutTensor]) -> None:
        super().check_shapes(plan)
        for name, source in MARKERS:
            shape = tuple(self.ckpt.info(ADAPTER_PREFIX + source).shape)
            if shape != (1, 1, self.n_embd_out):
                raise InputError(f"tensor {ADAPTER_PREFIX + source!r} has shape {list(shape)}, expected "
                                 f"[1, 1, {self.n_embd_out}] from config.json", self.ckpt.file_of(ADAPTER_PREFIX + source))

"""The models the benchmarks build, as weightless checkpoints: published config.json keys, tensor names and shapes.

Two kinds of rows:

- :class:`Shape`: the THUDM-layout generations (ChatGLM-6B, ChatGLM3-6B, GLM-4-9B), a handful of numbers from which
  the published config.json and tensor table follow.
- :class:`HFShape`: transformers-layout models (GLM-4.7, GLM-4.7-Flash, GLM-5.3, GLM-5.3-Flash), config.json as
  transformers' configuration class for ``model_type`` writes it, from the published keys, then *cut* (fewer layers and
  experts: the width stays real) so that a model fits 24 GB of RAM and a run on 2 cores stays short. The tensor table
  comes from transformers' own model class on the meta device (``chatglm.devtools.weightless.hf_table``). GLM-5.3's
  keys are read at run time from ``../shared/reference/configs/GLM-5.3/config.json``; the other three take their
  transformers class's defaults, which are the published model's, plus the keys the published config.json adds.

A row whose family is not in the registry yet (``chatglm.families.REGISTRY``) raises :class:`NotMerged`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from chatglm import families
from chatglm.convert.family import Family, detect
from chatglm.devtools.weightless import Table, WeightlessCheckpoint, hf_config, hf_table, write_weightless

_ROOT = Path(__file__).resolve().parents[1]
# ../shared/reference beside the checkout (or beside the folder of worktrees)
REFERENCE = Path(os.environ.get("CHATGLM_REFERENCE") or next(
    (p / "shared" / "reference" for p in (_ROOT.parent, _ROOT.parents[1]) if (p / "shared" / "reference").is_dir()),
    _ROOT.parent / "shared" / "reference"))
REFERENCE_CONFIGS = REFERENCE / "configs"
GLM4_TOKENIZER = REFERENCE / "tokenizers" / "glm-4-9b-chat"  # GLM-4's published tiktoken ranks and specials
PER_LAYER_KEYS = ("mlp_layer_types", "indexer_types", "layer_types")  # lists cut with the layers


class NotMerged(RuntimeError):
    """The row's family is not registered (its branch is not merged yet)."""


# ------------------------------------------------------------------------------------------------ THUDM layouts
@dataclass(frozen=True)
class Shape:
    """The config.json numbers that set a model's cost (published values for the real shapes)."""

    name: str
    family: str  # chatglm3 | glm4 | chatglm1 (the tokenizer recipe and layout)
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    ctx: int
    rope_ratio: float = 1.0
    eps: float = 1e-5

    @property
    def registry(self) -> str:
        return {"chatglm3": "chatglm2", "glm4": "glm4", "chatglm1": "chatglm1"}[self.family]

    @property
    def key(self) -> str:
        return f"{self.family}-{self.hidden}x{self.layers}"

    cut = ""

    def config(self) -> dict[str, Any]:
        return published_config(self)

    def table(self, config: dict[str, Any]) -> Table:
        return glm1_table(self) if self.family == "chatglm1" else thudm_table(self)

    def write_tokenizer(self, folder: Path) -> None:
        write_tokenizer(self.family, folder)


REAL = {s.name: s for s in (
    Shape("chatglm-6b", "chatglm1", 4096, 28, 32, 32, 16384, 130528, 2048),
    Shape("chatglm3-6b", "chatglm3", 4096, 28, 32, 2, 13696, 65024, 8192),
    Shape("glm4-9b", "glm4", 4096, 40, 32, 2, 13696, 151552, 131072, rope_ratio=500.0, eps=1.5625e-07),
)}
SMALL = {s.name: s for s in (
    Shape("chatglm-6b", "chatglm1", 256, 28, 4, 4, 1024, 4096, 2048),  # GLM-1 keeps 28 layers (alpha = sqrt(56))
    Shape("chatglm3-6b", "chatglm3", 256, 2, 4, 2, 704, 4096, 8192),
    Shape("glm4-9b", "glm4", 256, 2, 4, 2, 704, 8192, 131072, rope_ratio=500.0, eps=1.5625e-07),
)}
# A ~1.3B ChatGLM3 shape (benchmarks/python_overhead.py).
CHATGLM3_1B = Shape("chatglm3-1.3b", "chatglm3", 2048, 24, 16, 2, 5632, 65024, 8192)


def published_config(shape: Shape) -> dict[str, Any]:
    if shape.family == "chatglm1":
        return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "position_encoding_2d": True,
                "hidden_size": shape.hidden, "inner_hidden_size": shape.ffn, "num_attention_heads": shape.heads,
                "num_layers": shape.layers, "vocab_size": shape.vocab, "max_sequence_length": shape.ctx,
                "layernorm_epsilon": shape.eps}
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "padded_vocab_size": shape.vocab,
            "multi_query_attention": True, "multi_query_group_num": shape.kv_heads, "hidden_size": shape.hidden,
            "num_attention_heads": shape.heads, "kv_channels": shape.hidden // shape.heads,
            "num_layers": shape.layers, "ffn_hidden_size": shape.ffn, "seq_length": shape.ctx,
            "layernorm_epsilon": shape.eps, "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True,
            "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "original_rope": True,
            **({"rope_ratio": shape.rope_ratio} if shape.rope_ratio != 1.0 else {})}


def thudm_table(shape: Shape) -> Table:
    """ChatGLM2/3 and GLM-4-9B's published tensor names and shapes (THUDM layout), in the published order."""
    e, head_dim = shape.hidden, shape.hidden // shape.heads
    qkv = e + 2 * shape.kv_heads * head_dim
    out = [("transformer.embedding.word_embeddings.weight", (shape.vocab, e)),
           ("transformer.rotary_pos_emb.inv_freq", (head_dim // 4,))]
    for i in range(shape.layers):
        layer = f"transformer.encoder.layers.{i}."
        out += [(layer + "input_layernorm.weight", (e,)),
                (layer + "self_attention.query_key_value.weight", (qkv, e)),
                (layer + "self_attention.query_key_value.bias", (qkv,)),
                (layer + "self_attention.dense.weight", (e, e)),
                (layer + "post_attention_layernorm.weight", (e,)),
                (layer + "mlp.dense_h_to_4h.weight", (2 * shape.ffn, e)),
                (layer + "mlp.dense_4h_to_h.weight", (e, shape.ffn))]
    return out + [("transformer.encoder.final_layernorm.weight", (e,)),
                  ("transformer.output_layer.weight", (shape.vocab, e))]


def glm1_table(shape: Shape) -> Table:
    """ChatGLM-6B's published tensor names and shapes (biases everywhere, LayerNorm, an untied lm_head)."""
    e, ff = shape.hidden, shape.ffn
    out = [("transformer.word_embeddings.weight", (shape.vocab, e))]
    for i in range(shape.layers):
        p = f"transformer.layers.{i}."
        for name, rows, cols in (("attention.query_key_value", 3 * e, e), ("attention.dense", e, e),
                                 ("mlp.dense_h_to_4h", ff, e), ("mlp.dense_4h_to_h", e, ff)):
            out += [(f"{p}{name}.weight", (rows, cols)), (f"{p}{name}.bias", (rows,))]
        out += [(f"{p}{norm}.{part}", (e,)) for norm in ("input_layernorm", "post_attention_layernorm")
                for part in ("weight", "bias")]
        out.append((p + "attention.rotary_emb.inv_freq", (e // shape.heads // 4,)))
    return out + [("transformer.final_layernorm.weight", (e,)), ("transformer.final_layernorm.bias", (e,)),
                  ("lm_head.weight", (shape.vocab, e))]


def write_tokenizer(family: str, folder: Path) -> None:
    """A tiny trained tokenizer in the family's published file layout (the family pads it to the vocab size)."""
    if family == "chatglm3":
        from chatglm.devtools.checkpoints import CHATGLM3_TEMPLATE, train_sentencepiece
        from chatglm.devtools.corpus import bilingual_corpus

        train_sentencepiece(folder / "tokenizer.model", bilingual_corpus())
        config = {"chat_template": CHATGLM3_TEMPLATE}
    elif family == "glm4":
        from chatglm.devtools.glm4 import FIXTURE_TEMPLATES, tokenizer_config, train_glm4_bpe, write_tiktoken

        tok = train_glm4_bpe()
        write_tiktoken(tok, folder / "tokenizer.model")
        config = tokenizer_config(tok, FIXTURE_TEMPLATES["glm4"])
    elif family == "chatglm1":
        from chatglm.devtools.glm1 import train_ice_tokenizer

        train_ice_tokenizer(folder / "ice_text.model")
        config = {"num_image_tokens": 0}
    elif family == "hf":
        from chatglm.devtools.glm4 import FIXTURE_TEMPLATES, GLM45_EXTRA_SPECIALS, tokenizer_config, train_glm4_bpe

        tok = train_glm4_bpe(user_defined=GLM45_EXTRA_SPECIALS)
        tok.save(str(folder / "tokenizer.json"))
        config = tokenizer_config(tok, FIXTURE_TEMPLATES["glm45"], tokenizer_class="PreTrainedTokenizerFast")
    else:
        raise ValueError(f"no tokenizer recipe for family {family!r}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


# ------------------------------------------------------------------------------------------------ HF layouts
@dataclass(frozen=True)
class HFShape:
    """A transformers-layout model: its published config keys (``published()``), then the cut applied."""

    name: str
    registry: str  # the family folder that converts it
    published: Callable[[], dict[str, Any]] = field(repr=False)
    cut: dict[str, Any] = field(default_factory=dict)  # settings replaced to make it fit (layers, experts)
    n_nextn: int = 1  # multi-token-prediction layers the published checkpoint carries
    family = "hf"  # the tokenizer recipe

    @property
    def key(self) -> str:
        return "hf-" + self.name.lower().replace(".", "") + ("-tiny" if "hidden_size" in self.cut else "")

    def config(self) -> dict[str, Any]:
        settings = {**self.published(), **self.cut}
        n_layer = settings["num_hidden_layers"]
        for key in PER_LAYER_KEYS:  # per-layer lists of the published config: their first n_layer entries
            if key not in self.cut and isinstance(settings.get(key), list):
                settings[key] = settings[key][:n_layer]
        return hf_config(settings.pop("model_type"), **settings)

    def table(self, config: dict[str, Any]) -> Table:
        return hf_table(config, self.n_nextn)

    def write_tokenizer(self, folder: Path) -> None:
        write_tokenizer("hf", folder)

    def cut_text(self) -> str:
        pub = dict(self.published())
        pub = hf_config(pub.pop("model_type"), **pub)  # the class's defaults filled in
        pub = pub.get("text_config") or pub
        return ", ".join(f"{k} {_short(pub[k])}->{_short(v)}" for k, v in self.cut.items()
                         if k in ("num_hidden_layers", "n_routed_experts", "first_k_dense_replace")
                         and pub.get(k) is not None)


def _short(value: Any) -> str:
    return str(value) if not isinstance(value, list) else f"[{len(value)}]"


def _glm47() -> dict[str, Any]:
    """GLM-4.7's config.json keys (the 355B-A32B GLM-4.5/4.6 architecture, as its published config.json has them)."""
    return {"model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "vocab_size": 151552,
            "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
            "num_hidden_layers": 92, "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128,
            "n_routed_experts": 160, "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
            "routed_scaling_factor": 2.5, "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
            "use_qk_norm": True, "attention_bias": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 202752,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5},
            "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "pad_token_id": 151329,
            "eos_token_id": [151329, 151336, 151338], "dtype": "bfloat16"}


def _glm47_flash() -> dict[str, Any]:
    """GLM-4.7-Flash (30B-A3B, MLA): Glm4MoeLiteConfig's defaults are the published model's; config.json adds these."""
    return {"model_type": "glm4_moe_lite", "architectures": ["Glm4MoeLiteForCausalLM"],
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "num_nextn_predict_layers": 1,
            "dtype": "bfloat16"}


def _glm53() -> dict[str, Any]:
    """GLM-5.3's published config.json, read now (never copied here)."""
    return json.loads((REFERENCE_CONFIGS / "GLM-5.3" / "config.json").read_text(encoding="utf-8"))


def _glm53_flash() -> dict[str, Any]:
    """GLM-5.3-Flash (KDA + latent attention hybrid): Glm5NextConfig's text defaults are the published model's."""
    return {"model_type": "glm5_next", "architectures": ["Glm5NextForConditionalGeneration"],
            "num_nextn_predict_layers": 1, "dtype": "bfloat16",
            # the vision merger feeds the language model, so its output is the text width (the class's vision
            # default, 1536, does not match its text default, 4096)
            "vision_config": {"out_hidden_size": 4096}}


def _layers(n: int, dense: int) -> dict[str, Any]:
    """The cut to ``n`` layers, the first ``dense`` of them dense (other per-layer lists: their first ``n``)."""
    return {"num_hidden_layers": n, "first_k_dense_replace": dense,
            "mlp_layer_types": ["dense"] * dense + ["sparse"] * (n - dense)}


NEW = {s.name: s for s in (
    HFShape("GLM-4.7", "glm4_moe", _glm47,
            {"num_hidden_layers": 4, "first_k_dense_replace": 1, "n_routed_experts": 16}),
    HFShape("GLM-4.7-Flash", "glm4_moe_lite", _glm47_flash, {**_layers(4, 1), "n_routed_experts": 32}),
    HFShape("GLM-5.3", "glm_moe_dsa", _glm53, {**_layers(4, 1), "n_routed_experts": 16}),
    HFShape("GLM-5.3-Flash", "glm5_next", _glm53_flash,
            {**_layers(4, 1), "n_routed_experts": 16}),  # layers 0-2 linear attention, 3 latent
)}
# The same rows at tiny widths (tests, --shape small): every code path, seconds to build.
_TINY = {"hidden_size": 128, "intermediate_size": 256, "moe_intermediate_size": 64, "num_attention_heads": 4,
         "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "vocab_size": 2048,
         "max_position_embeddings": 4096, "pad_token_id": None, "eos_token_id": None}
_TINY_EXTRA = {
    "GLM-4.7": {"num_key_value_heads": 2, "head_dim": 32},
    "GLM-4.7-Flash": {"q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
                      "v_head_dim": 32},
    "GLM-5.3": {"q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
                "v_head_dim": 32, "head_dim": 16, "index_n_heads": 16, "index_head_dim": 64, "index_topk": 16},
    "GLM-5.3-Flash": {"q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 64, "v_head_dim": 32,
                      "index_n_heads": 16, "index_head_dim": 64, "index_topk": 32, "linear_head_dim": 32,
                      "linear_num_heads": 4,
                      "vision_config": {"out_hidden_size": 128, "depth": 1, "hidden_size": 64, "num_heads": 2,
                                        "intermediate_size": 128}},
}
NEW_SMALL = {name: HFShape(name, s.registry, s.published, {**s.cut, **_TINY, **_TINY_EXTRA[name]}, s.n_nextn)
             for name, s in NEW.items()}
SHAPE_SETS = {"real": {**REAL, **NEW}, "small": {**SMALL, **NEW_SMALL}}


# ------------------------------------------------------------------------------------------------ the stub
def weightless_checkpoint(shape: Shape | HFShape, root: Path) -> WeightlessCheckpoint:
    """The weightless checkpoint of ``shape`` under ``root`` (the tokenizer is trained once and kept)."""
    if shape.registry not in families.REGISTRY:
        raise NotMerged(f"{shape.name}: family {shape.registry} not merged yet")
    folder = root / shape.key
    if not (folder / "tokenizer_config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        shape.write_tokenizer(folder)
    config = shape.config()
    write_weightless(folder, config, shape.table(config))
    return WeightlessCheckpoint(folder)


def family_for(shape: Shape | HFShape, root: Path) -> Family:
    """The converter of ``shape``'s weightless checkpoint, detected as for any checkpoint."""
    family = detect(weightless_checkpoint(shape, root))
    expected = families.part(shape.registry, "convert").CONVERTER
    if not isinstance(family, expected):
        raise RuntimeError(f"{shape.name}: detected as {family.name}, not {shape.registry}")
    return family


def parameters(family: Family) -> int:
    """Parameters the converter reads (its sources)."""
    ckpt = family.ckpt
    return sum(math.prod(ckpt.info(s).shape) for t in family.tensors() for s in t.sources)

"""What every GLM checkpoint in the Hugging Face transformers layout shares (``model.layers.N.self_attn.q_proj`` ...):
config, tokenizer, embedding, attention and head tensors. The families built on it:

- ``GlmForCausalLM`` (glm-4-9b-chat-hf, GLM-Edge; ``chatglm/families/glm4_hf``): llama.cpp's ``chatglm`` architecture
  with split q/k/v (llama.cpp accepts separate ``attn_q/k/v`` in place of the fused ``attn_qkv``).
- ``Glm4ForCausalLM`` (GLM-4-0414, GLM-Z1; ``chatglm/families/glm4_0414``): llama.cpp's ``glm4`` architecture, which
  adds a norm after attention (``post_self_attn_layernorm``) and after the MLP (``post_mlp_layernorm``).
- ``Glm4MoeForCausalLM`` (GLM-4.5/4.6; ``chatglm/families/glm4_moe``).

All rotate the first ``partial_rotary_factor`` of each head in consecutive pairs (llama.cpp rope type NORM), and both
fuse gate and up as ``mlp.gate_up_proj`` (gate rows first), which is llama.cpp's ``ffn_up`` for SwiGLU unchanged.
The tokenizer is ``tokenizer.json``. config.json may carry rope settings at the top level (published files) or in
``rope_parameters`` (files saved by transformers 5); both are read.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import gguf

from chatglm.convert.config_types import is_number, shown
from chatglm.convert.family import Family, OutTensor
from chatglm.convert.glm_hparams import write_hparams
from chatglm.limits import FLOAT32_MAX, MAX_NORM_EPS, UINT32_MAX
from chatglm.convert.vocab_bpe import (
    build_tokenizer_json_vocab,
    chat_template_of,
    glm_special_ids,
    require_specials,
    write_bpe_vocab,
)
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.schema import keys

T = gguf.MODEL_TENSOR
HF_LAYER = "model.layers.{bid}."
REQUIRED_SPECIALS = ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                     "<|observation|>")

# GGUF tensor -> transformers source name (without .weight/.bias); shared by every HF-layout GLM.
HF_TENSORS: dict[T, str] = {
    T.TOKEN_EMBD: "model.embed_tokens",
    T.OUTPUT_NORM: "model.norm",
    T.OUTPUT: "lm_head",
    T.ATTN_NORM: HF_LAYER + "input_layernorm",
    T.ATTN_Q: HF_LAYER + "self_attn.q_proj",
    T.ATTN_K: HF_LAYER + "self_attn.k_proj",
    T.ATTN_V: HF_LAYER + "self_attn.v_proj",
    T.ATTN_OUT: HF_LAYER + "self_attn.o_proj",
}


@dataclass(frozen=True)
class HFHparams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_rot: int
    n_vocab: int
    n_ctx: int
    eps: float
    rope_base: float
    qkv_bias: bool
    tied: bool


def template_format(template: str, default: str) -> str:
    """The chat format for a checkpoint's template: the token-exact builder that renders it, the sandboxed Jinja
    path for any other template, ``default`` when the checkpoint has none."""
    from chatglm import families

    known = families.recognise_template(template)
    return known if known is not None else (keys.JINJA_CHAT_FORMAT if template else default)


def gguf_name(kind: T, bid: int | None = None) -> str:
    return gguf.TENSOR_NAMES[kind].format(**({} if bid is None else {"bid": bid}))


def head_sizes(family: Family, embedding: str) -> tuple[int, int, int, int]:
    """(hidden_size, num_attention_heads, num_key_value_heads, head_dim) of a transformers-layout config, checked
    against each other and the ``embedding`` tensor."""
    n_embd = family.cfg_int("hidden_size")
    family.check_rows("hidden_size", n_embd, embedding, 1, "columns")
    n_head = family.cfg_int("num_attention_heads", maximum=n_embd)
    n_head_kv = family.cfg_int("num_key_value_heads", default=n_head, maximum=n_head)
    head_dim = family.cfg_int("head_dim", default=n_embd // n_head)
    if n_head % n_head_kv:
        raise family.bad(f"num_attention_heads ({n_head}) is not a multiple of num_key_value_heads ({n_head_kv})")
    if n_head * head_dim > UINT32_MAX:
        raise family.bad(f"num_attention_heads x head_dim ({n_head} x {head_dim}) is too large")
    return n_embd, n_head, n_head_kv, head_dim


class HFGlmFamily(Family):
    """Config, tokenizer and the attention/embedding tensors every HF-layout GLM shares."""

    default_bias: ClassVar[bool] = True
    # Where the language model's tensors live: "model." (``model.layers.N...``), or "model.language_model." in the
    # multimodal layouts (GLM-4.1V); ``lm_head`` stays at the top.
    text_prefix: ClassVar[str] = "model."

    def __init__(self, ckpt):
        super().__init__(ckpt)
        self.config = self.text_config()
        act = self.config.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (GLM uses 'silu')",
                                        self.config_path)
        self.hp = self.hparams()
        self.chat_format = self.detect_chat_format(chat_template_of(ckpt.dir / "tokenizer_config.json"))

    def detect_chat_format(self, template: str) -> str:
        raise NotImplementedError

    def text_config(self) -> dict:
        """The language model's settings (config.json itself, or its ``text_config`` in multimodal layouts)."""
        return self.config

    def source(self, name: str) -> str:
        """A transformers tensor name (``model.…``) as this layout stores it (under :attr:`text_prefix`)."""
        return self.text_prefix + name[len("model."):] if name.startswith("model.") else name

    # -- config ---------------------------------------------------------------------------------------------------
    def leading_dense(self, n_layer: int, default: int) -> int:
        """Leading dense-MLP layers of a mixture of experts: transformers' ``mlp_layer_types`` ("dense"... then
        "sparse"...), else the published ``first_k_dense_replace``, else ``default`` (the family's transformers
        default). Both given must agree; llama.cpp knows only a leading run of dense layers, then expert layers."""
        types = self.config.get("mlp_layer_types")
        declared = None if self.config.get("first_k_dense_replace") is None else \
            self.cfg_int("first_k_dense_replace", minimum=0)
        if types is None:
            n_dense = default if declared is None else declared
        else:
            if (not isinstance(types, list) or len(types) != n_layer
                    or not all(isinstance(x, str) and x in ("dense", "sparse") for x in types)):
                raise self.bad(f"'mlp_layer_types' must list 'dense' or 'sparse' for each of the {n_layer} layers, "
                               f"got {shown(types)}")
            n_dense = types.index("sparse") if "sparse" in types else n_layer
            if "dense" in types[n_dense:]:
                raise UnsupportedModelError(f"'mlp_layer_types' puts a dense layer after an expert layer; llama.cpp's "
                                            f"{self.arch} has dense layers only first", self.config_path)
            if declared is not None and declared != n_dense:
                raise self.bad(f"first_k_dense_replace={declared} disagrees with mlp_layer_types ({n_dense} leading "
                               "dense layers)")
        if n_dense >= n_layer:
            raise self.bad(f"{n_dense} leading dense layers (first_k_dense_replace, mlp_layer_types) leave no expert "
                           f"layer of {n_layer}")
        return n_dense

    def rope(self) -> tuple[float, float]:
        """(rope_theta, partial_rotary_factor), from ``rope_parameters`` or the top-level keys."""
        params = self.config.get("rope_parameters")
        scaling = self.config.get("rope_scaling")
        key, source = ("rope_parameters", params) if params is not None else ("rope_scaling", scaling)
        kind = "default" if source is None else source.get("rope_type", source.get("type", "default"))
        if kind != "default":
            raise UnsupportedModelError(f"rope type {shown(kind)} is not supported (only the default "
                                        f"rope; in {key})", self.config_path)
        values = params if params is not None else self.config
        theta = values.get("rope_theta", 10000.0)
        factor = values.get("partial_rotary_factor", 0.5)
        for name, value, top in (("rope_theta", theta, FLOAT32_MAX), ("partial_rotary_factor", factor, 1.0)):
            if not is_number(value) or not 0 < value <= top:
                raise self.bad(f"{name!r} must be a positive number (at most {top:g}), got {shown(value)}")
        return float(theta), float(factor)

    def hparams(self) -> HFHparams:
        embedding = self.source(f"{HF_TENSORS[T.TOKEN_EMBD]}.weight")
        n_embd, n_head, n_head_kv, head_dim = head_sizes(self, embedding)
        theta, factor = self.rope()
        n_rot = int(head_dim * factor)
        if n_rot < 2 or n_rot % 2:
            raise self.bad(f"head_dim ({head_dim}) x partial_rotary_factor ({factor}) must be a positive even number")
        n_layer = self.cfg_int("num_hidden_layers")
        self.check_layers("num_hidden_layers", n_layer, re.escape(self.text_prefix) + r"layers\.(\d+)\.",
                          *self.trailing_layers())
        n_vocab = self.cfg_int("vocab_size")
        self.check_rows("vocab_size", n_vocab, embedding, 0, "rows")
        return HFHparams(
            n_layer=n_layer, n_embd=n_embd, n_ff=self.cfg_int("intermediate_size", maximum=UINT32_MAX // 2),
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim, n_rot=n_rot, n_vocab=n_vocab,
            n_ctx=self.cfg_int("max_position_embeddings", default=8192),
            eps=self.cfg_float("rms_norm_eps", 1e-5, maximum=MAX_NORM_EPS),
            rope_base=theta, qkv_bias=self.cfg_bool("attention_bias", self.default_bias),
            tied=self.cfg_bool("tie_word_embeddings", False),
        )

    def trailing_layers(self) -> tuple[int, str]:
        """Layers the checkpoint holds after the last one (count, config.json key): none unless MTP."""
        return 0, ""

    # -- GGUF -----------------------------------------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        write_hparams(w, self.hp, n_rot=self.hp.n_rot)

    def write_vocab(self, w: gguf.GGUFWriter) -> None:
        path = self.ckpt.dir / "tokenizer.json"
        if not path.is_file():
            raise InputError("tokenizer file not found (this layout ships tokenizer.json)", path)
        vocab = build_tokenizer_json_vocab(path, self.hp.n_vocab)
        require_specials(vocab, REQUIRED_SPECIALS, path)
        write_bpe_vocab(w, vocab, glm_special_ids(vocab))

    def out(self, kind: T, bid: int | None, shape: tuple[int, ...], source: str | None = None,
            bias: bool = False) -> list[OutTensor]:
        fmt = {} if bid is None else {"bid": bid}
        src = self.source((source or HF_TENSORS[kind]).format(**fmt))
        tensors = [OutTensor(f"{gguf_name(kind, bid)}.weight", shape, (f"{src}.weight",))]
        if bias:
            tensors.append(OutTensor(f"{gguf_name(kind, bid)}.bias", shape[:1], (f"{src}.bias",)))
        return tensors

    def embedding_tensors(self) -> list[OutTensor]:
        hp = self.hp
        return self.out(T.TOKEN_EMBD, None, (hp.n_vocab, hp.n_embd))

    def head_tensors(self) -> list[OutTensor]:
        hp = self.hp
        plan = self.out(T.OUTPUT_NORM, None, (hp.n_embd,))
        if not hp.tied:
            plan += self.out(T.OUTPUT, None, (hp.n_vocab, hp.n_embd))
        return plan

    def attention_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        q_rows, kv_rows = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        plan = self.out(T.ATTN_NORM, bid, (hp.n_embd,))
        plan += self.out(T.ATTN_Q, bid, (q_rows, hp.n_embd), bias=hp.qkv_bias)
        plan += self.out(T.ATTN_K, bid, (kv_rows, hp.n_embd), bias=hp.qkv_bias)
        plan += self.out(T.ATTN_V, bid, (kv_rows, hp.n_embd), bias=hp.qkv_bias)
        plan += self.out(T.ATTN_OUT, bid, (hp.n_embd, q_rows))
        return plan

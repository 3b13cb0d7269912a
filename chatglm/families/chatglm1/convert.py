"""ChatGLM-6B (first generation, THUDM/chatglm-6b): our own ``chatglm1`` architecture, run by the GLM-1 engine.

Layout (published modeling_chatglm.py of the final release): LayerNorm with bias before attention and MLP, a fused
``query_key_value`` with bias laid out per head as [q | k | v] (kept as is: the engine views it), 2D rotary
embeddings over the two halves of each head, attention output and both MLP projections with biases, exact tanh GELU,
and residuals ``alpha * LN(x) + sublayer(LN(x))`` with ``alpha = sqrt(2 * 28)``: the published ``GLMBlock`` takes
``num_layers`` from its default of 28, never from config.json, so alpha is written as that constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import gguf

from chatglm.convert.checkpoint import read_json
from chatglm.convert.family import Family, OutTensor
from chatglm.convert.vocab_common import json_object, pad_tokens, unique_name
from chatglm.convert.vocab_ice import (
    BYTE,
    CONTROL,
    DEFAULT_IMAGE_TOKENS,
    NORMAL,
    UNKNOWN,
    UNUSED,
    USER_DEFINED,
    IceVocab,
    load_ice_vocab,
)
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.chatglm1 import FAMILY
from chatglm.limits import MAX_NORM_EPS
from chatglm.schema import keys
from chatglm.schema.ice import MAX_BLANK, SPECIAL_PIECES

T = gguf.MODEL_TENSOR
ARCH = FAMILY.arch
LAYER = "transformer.layers.{bid}."
PUBLISHED_NUM_LAYERS = 28  # GLMBlock's default, which the published model never overrides
TOKENIZER_FILE = "ice_text.model"

# GGUF tensor -> source tensor (without .weight/.bias) in the THUDM layout; every one but the embeddings has a bias.
TENSOR_MAP: dict[T, str] = {
    T.TOKEN_EMBD: "transformer.word_embeddings",
    T.ATTN_NORM: LAYER + "input_layernorm",
    T.ATTN_QKV: LAYER + "attention.query_key_value",
    T.ATTN_OUT: LAYER + "attention.dense",
    T.FFN_NORM: LAYER + "post_attention_layernorm",
    T.FFN_UP: LAYER + "mlp.dense_h_to_4h",
    T.FFN_DOWN: LAYER + "mlp.dense_4h_to_h",
    T.OUTPUT_NORM: "transformer.final_layernorm",
    T.OUTPUT: "lm_head",
}
LAYER_KINDS = (T.ATTN_NORM, T.ATTN_QKV, T.ATTN_OUT, T.FFN_NORM, T.FFN_UP, T.FFN_DOWN)

_GGUF_TYPE = {NORMAL: gguf.TokenType.NORMAL, UNKNOWN: gguf.TokenType.UNKNOWN, CONTROL: gguf.TokenType.CONTROL,
              USER_DEFINED: gguf.TokenType.USER_DEFINED, UNUSED: gguf.TokenType.UNUSED, BYTE: gguf.TokenType.BYTE}


@dataclass(frozen=True)
class GLM1Hparams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_vocab: int
    n_ctx: int
    eps: float

    @property
    def n_head_kv(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class ChatGLM1(Family):
    name = FAMILY.variants[0]
    arch = ARCH
    chat_format = FAMILY.chat_formats[0]
    ignored_sources = (r"transformer\.layers\.\d+\.attention\.rotary_emb\.inv_freq",)

    def __init__(self, ckpt):
        super().__init__(ckpt)
        self.cfg_require("position_encoding_2d", True)
        if self.config.get("quantization_bit", 0) not in (0, None):
            raise UnsupportedModelError(
                f"quantization_bit={self.config['quantization_bit']!r}: this is a pre-quantized "
                "ChatGLM-6B (int4/int8); convert the original float16 THUDM/chatglm-6b instead", self.config_path)
        self.hp = self._hparams()
        self.vocab = load_ice_vocab(ckpt.dir / TOKENIZER_FILE, self._image_tokens())
        self.ids = self._special_ids()

    def _hparams(self) -> GLM1Hparams:
        n_embd = self.cfg_int("hidden_size")
        n_head = self.cfg_int("num_attention_heads", maximum=n_embd)
        if n_embd % n_head or (n_embd // n_head) % 4:
            raise InputError(f"hidden_size {n_embd} / num_attention_heads {n_head} must give a head "
                             "size that is a multiple of 4 (two rotary halves)", self.config_path)
        embedding = f"{TENSOR_MAP[T.TOKEN_EMBD]}.weight"
        self.check_rows("hidden_size", n_embd, embedding, 1, "columns")
        n_layer = self.cfg_int("num_layers")
        self.check_layers("num_layers", n_layer, r"transformer\.layers\.(\d+)\.")
        n_vocab = self.cfg_int("vocab_size")
        self.check_rows("vocab_size", n_vocab, embedding, 0, "rows")
        return GLM1Hparams(
            n_layer=n_layer, n_embd=n_embd,
            n_ff=self.cfg_int("inner_hidden_size", default=4 * n_embd), n_head=n_head,
            n_vocab=n_vocab, n_ctx=self.cfg_int("max_sequence_length", default=2048),
            eps=self.cfg_float("layernorm_epsilon", default=1e-5, maximum=MAX_NORM_EPS),
        )

    def _image_tokens(self) -> int:
        path = self.ckpt.dir / "tokenizer_config.json"
        if not path.is_file():
            return DEFAULT_IMAGE_TOKENS
        cfg = json_object(read_json(path, "tokenizer_config.json"), "tokenizer_config.json", path)
        value: Any = cfg.get("num_image_tokens", DEFAULT_IMAGE_TOKENS)
        if type(value) is not int or value < 0:
            raise InputError(f"num_image_tokens must be a non-negative integer, got {value!r}", path)
        return value

    def _special_ids(self) -> dict[str, int]:
        """Ids the tokenizer gives; config.json's ids must agree (they changed between releases)."""
        v = self.vocab
        ids = ice_special_ids(v, self.config.get("pad_token_id"))
        if v.n_tokens > self.hp.n_vocab:
            raise InputError(f"{TOKENIZER_FILE} gives {v.n_tokens} token ids ({v.image_tokens} image tokens + "
                             f"{len(v.pieces)} pieces), more than vocab_size {self.hp.n_vocab}: check "
                             "num_image_tokens in tokenizer_config.json", self.config_path)
        for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("mask_token_id", "mask"),
                          ("gmask_token_id", "gmask")):
            if key in self.config and self.config[key] != ids[name]:
                raise InputError(f"{key}={self.config[key]!r} but {TOKENIZER_FILE} with "
                                 f"{v.image_tokens} image tokens gives {ids[name]}; the tokenizer and weights come "
                                 "from different releases", self.config_path)
        return ids

    # -- metadata ---------------------------------------------------------------------------------------------
    def prefix_layout(self) -> tuple[int, int, int]:
        return self.hp.n_layer, self.hp.n_head, self.hp.head_dim

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        hp = self.hp
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_feed_forward_length(hp.n_ff)
        w.add_block_count(hp.n_layer)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head)
        w.add_layer_norm_eps(hp.eps)
        w.add_rope_dimension_count(hp.head_dim // 2)
        w.add_rope_freq_base(10000.0)
        w.add_residual_scale(math.sqrt(2 * PUBLISHED_NUM_LAYERS))

    def write_vocab(self, w: gguf.GGUFWriter) -> None:
        write_ice_vocab(w, self.vocab, self.hp.n_vocab, self.ids)

    # -- tensors ----------------------------------------------------------------------------------------------
    def tensors(self) -> list[OutTensor]:
        hp = self.hp
        shapes: dict[T, tuple[int, ...]] = {
            T.TOKEN_EMBD: (hp.n_vocab, hp.n_embd), T.OUTPUT: (hp.n_vocab, hp.n_embd),
            T.ATTN_NORM: (hp.n_embd,), T.FFN_NORM: (hp.n_embd,), T.OUTPUT_NORM: (hp.n_embd,),
            T.ATTN_QKV: (3 * hp.n_embd, hp.n_embd), T.ATTN_OUT: (hp.n_embd, hp.n_embd),
            T.FFN_UP: (hp.n_ff, hp.n_embd), T.FFN_DOWN: (hp.n_embd, hp.n_ff),
        }
        plan = self._out(T.TOKEN_EMBD, None, shapes[T.TOKEN_EMBD], bias=False)
        for bid in range(hp.n_layer):
            for kind in LAYER_KINDS:
                plan += self._out(kind, bid, shapes[kind], bias=True)
        plan += self._out(T.OUTPUT_NORM, None, shapes[T.OUTPUT_NORM], bias=True)
        if f"{TENSOR_MAP[T.OUTPUT]}.weight" in set(self.ckpt.names()):  # else tied to the embeddings
            plan += self._out(T.OUTPUT, None, shapes[T.OUTPUT], bias=False)
        return plan

    def _out(self, kind: T, bid: int | None, shape: tuple[int, ...], bias: bool) -> list[OutTensor]:
        fmt = {} if bid is None else {"bid": bid}
        name = gguf.TENSOR_NAMES[kind].format(**fmt)
        source = TENSOR_MAP[kind].format(**fmt)
        out = [OutTensor(f"{name}.weight", shape, (f"{source}.weight",))]
        if bias:
            out.append(OutTensor(f"{name}.bias", shape[:1], (f"{source}.bias",)))
        return out


def ice_special_ids(vocab: IceVocab, pad: Any = None) -> dict[str, int]:
    """bos/eos/mask/gmask/end/unk/pad ids of an ice vocabulary (pad: config.json's pad_token_id when valid)."""
    ids = {"bos": vocab.id_of("<sop>"), "eos": vocab.id_of("<eop>"), "mask": vocab.id_of("[MASK]"),
           "gmask": vocab.id_of("[gMASK]")}
    for name, text in (("end", "</s>"), ("unk", "<unk>")):
        found = [i for i, p in enumerate(vocab.pieces) if p.text == text or (name == "unk" and p.type == UNKNOWN)]
        ids[name] = found[0] + vocab.image_tokens if found else ids["eos"]
    ids["pad"] = pad if type(pad) is int and 0 <= pad < vocab.n_tokens else ids["unk"]
    return ids


def _image_placeholders(v: IceVocab) -> list[str]:
    """``<image_N>`` for the ids below the pieces. The published tokenizer never produces them from text (its ids come
    from sp.encode, shifted past them), so one whose name a piece already has gets a free variant instead."""
    taken = {p.text for p in v.pieces}
    names = []
    for i in range(v.image_tokens):
        names.append(unique_name(f"<image_{i}>", taken))
        taken.add(names[-1])
    return names


def write_ice_vocab(w: gguf.GGUFWriter, v: IceVocab, n_vocab: int, ids: dict[str, int]) -> None:
    """The vocabulary (image tokens, pieces, padding up to the embedding rows), special ids and the model itself."""
    tokens = _image_placeholders(v) + [p.text for p in v.pieces]
    scores = [0.0] * v.image_tokens + [p.score for p in v.pieces]
    types = [gguf.TokenType.UNUSED] * v.image_tokens + [_GGUF_TYPE.get(p.type, gguf.TokenType.NORMAL)
                                                        for p in v.pieces]
    for text in SPECIAL_PIECES:  # control tokens, whatever the piece type, so tools find them by text
        types[v.id_of(text)] = gguf.TokenType.CONTROL
    pad_tokens(tokens, n_vocab)
    scores += [0.0] * (n_vocab - len(scores))
    types += [gguf.TokenType.UNUSED] * (n_vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre(ARCH)
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(ids["bos"])
    w.add_eos_token_id(ids["eos"])
    w.add_unk_token_id(ids["unk"])
    w.add_pad_token_id(ids["pad"])
    w.add_mask_token_id(ids["mask"])
    w.add_uint32(keys.GLM1_GMASK, ids["gmask"])
    w.add_uint32(keys.GLM1_END, ids["end"])
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_uint32(keys.GLM1_IMAGE_TOKENS, v.image_tokens)
    w.add_uint32(keys.GLM1_MAX_BLANK, MAX_BLANK)
    w.add_array(keys.GLM1_SPM_MODEL, v.proto)


CONVERTER = ChatGLM1

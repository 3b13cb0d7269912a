"""The converter of ChatGLM2-6B, ChatGLM3-6B (base, chat, 32k, 128k) and CodeGeeX2: llama.cpp's ``chatglm``
architecture.

Layout (published modeling_chatglm.py): RMSNorm, fused query_key_value with bias (q heads, then the k and v groups),
rotary over the first half of each head in consecutive pairs, SwiGLU with gate and up fused in dense_h_to_4h.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from chatglm.convert.checkpoint import read_json
from chatglm.convert.config_types import shown
from chatglm.convert.family import Family, OutTensor
from chatglm.convert.glm_hparams import write_hparams
from chatglm.convert.vocab_bpe import chat_template_of
from chatglm.convert.vocab_common import json_object
from chatglm.errors import UnsupportedModelError
from chatglm.limits import FLOAT32_MAX, MAX_NORM_EPS, UINT32_MAX
from chatglm.convert.vocab_spm import (adds_dummy_prefix, build_spm_vocab, is_sentencepiece, load_sentencepiece,
                                       write_spm_vocab)
from chatglm.families.chatglm2 import FAMILY

CHATGLM2, CHATGLM3 = FAMILY.chat_formats  # the [Round N] format (ChatGLM2, CodeGeeX2); role tokens (ChatGLM3)

T = gguf.MODEL_TENSOR
LAYER = "transformer.encoder.layers.{bid}."

# GGUF tensor -> source tensor (without .weight/.bias) in the THUDM layout.
TENSOR_MAP: dict[T, str] = {
    T.TOKEN_EMBD: "transformer.embedding.word_embeddings",
    T.OUTPUT_NORM: "transformer.encoder.final_layernorm",
    T.OUTPUT: "transformer.output_layer",
    T.ATTN_NORM: LAYER + "input_layernorm",
    T.ATTN_QKV: LAYER + "self_attention.query_key_value",
    T.ATTN_OUT: LAYER + "self_attention.dense",
    T.FFN_NORM: LAYER + "post_attention_layernorm",
    T.FFN_UP: LAYER + "mlp.dense_h_to_4h",
    T.FFN_DOWN: LAYER + "mlp.dense_4h_to_h",
}

SPECIALS_CHATGLM2 = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]

# config.json values that select model variants this graph does not implement.
REQUIRED = {
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "original_rope": True,
}


@dataclass(frozen=True)
class GLMHparams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx: int
    eps: float
    rope_base: float
    qkv_bias: bool
    rope_scale: float = 1.0  # linear position interpolation: positions are divided by this (ChatGLM2-6B-32K)


def refuse_rope_scaling(family: Family) -> None:
    """These checkpoints scale rope through ``rope_ratio``; a ``rope_scaling`` object asks for something else."""
    scaling = family.config.get("rope_scaling")
    if scaling is None:
        return
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", None):
        raise UnsupportedModelError(f"rope_scaling type {shown(kind)} is not supported (this "
                                    "converter writes rope_ratio scaling only)", family.config_path)


def detect_chat_format(ckpt) -> str:
    """ChatGLM3 when the tokenizer files know its role tokens, else ChatGLM2 (ChatGLM2, CodeGeeX2).

    Both generations ship the same SentencePiece model and config.json keys; ChatGLM3's tokenizer_config.json names
    the role tokens, in its chat template or among its added tokens. The checkpoint's Python files are never read.
    """
    path = ckpt.dir / "tokenizer_config.json"
    if "<|assistant|>" in chat_template_of(path):
        return CHATGLM3
    if not path.exists():
        return CHATGLM2
    cfg = json_object(read_json(path, "tokenizer_config.json"), "tokenizer_config.json", path)
    return CHATGLM3 if "<|observation|>" in added_token_texts(cfg) else CHATGLM2


def added_token_texts(tokenizer_config: dict) -> list[str]:
    """The texts of tokenizer_config.json's ``added_tokens_decoder`` and ``additional_special_tokens``."""
    added = tokenizer_config.get("added_tokens_decoder")
    texts = [t.get("content") for t in added.values() if isinstance(t, dict)] if isinstance(added, dict) else []
    extra = tokenizer_config.get("additional_special_tokens")
    for t in extra if isinstance(extra, list) else []:
        texts.append(t.get("content") if isinstance(t, dict) else t)
    return [t for t in texts if isinstance(t, str)]


class ChatGLM(Family):
    name = CHATGLM3
    arch = FAMILY.arch
    ignored_sources = (r"transformer\.rotary_pos_emb\.inv_freq",)

    def __init__(self, ckpt):
        super().__init__(ckpt)
        for key, expected in REQUIRED.items():
            self.cfg_require(key, expected, default=expected)
        self.chat_format = detect_chat_format(ckpt)
        self.name = self.chat_format  # the variant is the format's name: chatglm2 covers CodeGeeX2 as well
        self.hp = self._hparams()

    @classmethod
    def matches(cls, ckpt) -> bool:
        tokenizer = ckpt.dir / "tokenizer.model"
        # A missing tokenizer is claimed here so the error names the file (write_vocab reports it).
        return not tokenizer.exists() or is_sentencepiece(tokenizer)

    def _hparams(self) -> GLMHparams:
        n_embd = self.cfg_int("hidden_size")
        self.check_rows("hidden_size", n_embd, f"{TENSOR_MAP[T.TOKEN_EMBD]}.weight", 1, "columns")
        n_head = self.cfg_int("num_attention_heads", maximum=n_embd)
        head_dim = self.cfg_int("kv_channels", default=n_embd // n_head)
        mqa = self.cfg_bool("multi_query_attention", False)
        n_head_kv = self.cfg_int("multi_query_group_num") if mqa else n_head
        if n_head % n_head_kv:
            raise self.bad(f"num_attention_heads ({n_head}) is not a multiple of multi_query_group_num ({n_head_kv})")
        if head_dim % 4:
            raise self.bad(f"kv_channels ({head_dim}) must be a multiple of 4 for rotary embeddings")
        if n_head * head_dim != n_embd:  # llama.cpp's chatglm graph: attn_output is n_embd x n_embd
            raise self.bad(f"num_attention_heads x kv_channels must equal hidden_size for llama.cpp's chatglm "
                           f"graph ({n_head} x {head_dim} != {n_embd})")
        n_layer = self.cfg_int("num_layers")
        self.check_layers("num_layers", n_layer, LAYER.replace(".", r"\.").replace("{bid}", r"(\d+)"))
        n_vocab = self.cfg_int("padded_vocab_size")
        self.check_rows("padded_vocab_size", n_vocab, f"{TENSOR_MAP[T.TOKEN_EMBD]}.weight", 0, "rows")
        ratio = self.cfg_float("rope_ratio", default=1.0)
        interpolate = ratio != 1.0 and self.rope_ratio_divides_positions()
        rope_base = 10000.0 * (1.0 if interpolate else ratio)
        if rope_base > FLOAT32_MAX:
            raise self.bad(f"'rope_ratio' {ratio:g} gives a rope base of {rope_base:g}, more than a float32 holds")
        refuse_rope_scaling(self)
        return GLMHparams(
            n_layer=n_layer,
            n_embd=n_embd,
            n_ff=self.cfg_int("ffn_hidden_size", maximum=UINT32_MAX // 2),  # ffn_up holds 2 x n_ff rows
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_vocab=n_vocab,
            n_ctx=self.cfg_int("seq_length"),
            eps=self.cfg_float("layernorm_epsilon", default=1e-5, maximum=MAX_NORM_EPS),
            rope_base=rope_base,
            qkv_bias=self.cfg_bool("add_qkv_bias", True),
            rope_scale=ratio if interpolate else 1.0,
        )

    def rope_ratio_divides_positions(self) -> bool:
        """How this checkpoint's ``rope_ratio`` works, by generation: ChatGLM2-6B-32K's modeling code divides the
        positions by it (linear interpolation, base 10000); ChatGLM3-6B-32K/128K and GLM-4 multiply the rope base by
        it. The generation is the tokenizer's (see :func:`detect_chat_format`): the published ChatGLM2 checkpoints
        (the only ones whose code divides) ship no role tokens, every ChatGLM3 long-context one does."""
        return self.chat_format == CHATGLM2

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        write_hparams(w, self.hp, n_rot=self.hp.head_dim // 2)

    def prefix_layout(self) -> tuple[int, int, int]:
        return self.hp.n_layer, self.hp.n_head_kv, self.hp.head_dim

    def write_vocab(self, w: gguf.GGUFWriter) -> None:
        path = self.ckpt.dir / "tokenizer.model"
        sp = load_sentencepiece(path)
        specials = SPECIALS_CHATGLM2 + (ROLES if self.chat_format == CHATGLM3 else [])
        vocab = build_spm_vocab(sp, specials, self.hp.n_vocab, path)
        n = sp.vocab_size()
        ids = {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.unk_id()}
        if self.chat_format == CHATGLM3:
            ids["eot"] = n + specials.index("<|user|>")
            ids["eom"] = n + specials.index("<|observation|>")
        write_spm_vocab(w, vocab, {k: v for k, v in ids.items() if v >= 0}, adds_dummy_prefix(sp))

    def tensors(self) -> list[OutTensor]:
        hp = self.hp
        qkv_rows = (hp.n_head + 2 * hp.n_head_kv) * hp.head_dim
        shapes: dict[T, tuple[int, ...]] = {
            T.TOKEN_EMBD: (hp.n_vocab, hp.n_embd),
            T.OUTPUT_NORM: (hp.n_embd,),
            T.OUTPUT: (hp.n_vocab, hp.n_embd),
            T.ATTN_NORM: (hp.n_embd,),
            T.ATTN_QKV: (qkv_rows, hp.n_embd),
            T.ATTN_OUT: (hp.n_embd, hp.n_head * hp.head_dim),
            T.FFN_NORM: (hp.n_embd,),
            T.FFN_UP: (2 * hp.n_ff, hp.n_embd),
            T.FFN_DOWN: (hp.n_embd, hp.n_ff),
        }
        plan: list[OutTensor] = []
        for kind in (T.TOKEN_EMBD,):
            plan += self._out(kind, None, shapes[kind])
        for bid in range(hp.n_layer):
            for kind in (T.ATTN_NORM, T.ATTN_QKV, T.ATTN_OUT, T.FFN_NORM, T.FFN_UP, T.FFN_DOWN):
                plan += self._out(kind, bid, shapes[kind], bias=kind is T.ATTN_QKV and hp.qkv_bias)
        for kind in (T.OUTPUT_NORM, T.OUTPUT):
            plan += self._out(kind, None, shapes[kind])
        return plan

    def _out(self, kind: T, bid: int | None, shape: tuple[int, ...], bias: bool = False) -> list[OutTensor]:
        fmt = {} if bid is None else {"bid": bid}
        name = gguf.TENSOR_NAMES[kind].format(**fmt)
        source = TENSOR_MAP[kind].format(**fmt)
        out = [OutTensor(f"{name}.weight", shape, (f"{source}.weight",))]
        if bias:
            out.append(OutTensor(f"{name}.bias", shape[:1], (f"{source}.bias",)))
        return out


CONVERTER = ChatGLM

"""The converter of GLM-ASR checkpoints: the llama language model (GGUF arch ``llama``) and the audio encoder with its
adapter as libmtmd's ``glma`` projector.

Two layouts are read:

- the remote-code layout llama.cpp knows (``GlmasrModel``: config ``lm_config`` / ``whisper_config``, the language
  model at ``model.*`` / ``lm_head``, the encoder at ``audio_encoder.whisper.*`` in Whisper's names, the adapter at
  ``audio_encoder.{layer_norm,adapting.0,adapting.2,audio_bos_eos_token}``);
- transformers' own (``GlmAsrForConditionalGeneration``: ``text_config`` / ``audio_config``, the language model at
  ``model.language_model.*``, the encoder at ``model.audio_tower.*``, the adapter at ``model.multi_modal_projector``).

libmtmd's ``glma`` graph (tools/mtmd/models/whisper-enc.cpp) is Whisper's encoder with a learned position table and
no rotary embedding: conv1d x2 (gelu) + positions, pre-norm layers (q and v biased, k not), then the adapter's
LayerNorm, ``stack_factor`` frames stacked, a gelu MLP, and the begin/end-of-audio embeddings around the result. An
encoder that rotates its queries and keys (``use_rope: true``; transformers' ``GlmAsrEncoder`` always does)
computes something that graph cannot: it is written as our own projector type (:mod:`.rope_encoder`), which
chatglm/runtime/glmasr/ runs, never libmtmd.
"""

from __future__ import annotations

from typing import Sequence

import gguf
import numpy as np

from chatglm.convert.config_types import shown
from chatglm.convert.family import Family, OutTensor
from chatglm.convert.glm_hparams import write_hparams
from chatglm.convert.hf_layout import HFHparams, gguf_name, head_sizes, template_format
from chatglm.convert.mmproj import KEY_HAS_AUDIO, KEY_HAS_VISION, Projector
from chatglm.convert.vocab_bpe import build_tokenizer_json_vocab, chat_template_of, write_bpe_vocab
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.glm4_hf import FAMILY as GLM_EDGE
from chatglm.families.glm_asr import FAMILY
from chatglm.families.glm_asr.rope_encoder import RopeEncoderProjector
from chatglm.limits import MAX_NORM_EPS

T = gguf.MODEL_TENSOR
REMOTE, HF = "GlmasrModel", "GlmAsrForConditionalGeneration"
EDGE_FORMAT = GLM_EDGE.chat_formats[0]
# libmtmd's whisper front end always gives 3000 mel frames per 30 s chunk: 1500 positions after the stride-2 conv.
WHISPER_POSITIONS = 1500
AUDIO_SPECIALS = FAMILY.special_tokens


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers' llama rotates the two halves of each head; llama.cpp's ``llama`` rotates consecutive pairs:
    reorder each head's rows (q or k weight or bias) from half-split to interleaved."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GlmAsr(Family):
    """Either GLM-ASR layout: the llama text model here, the encoder in :class:`GlmaProjector`."""

    name = FAMILY.variants[0]
    arch = FAMILY.arch

    def __init__(self, ckpt):
        super().__init__(ckpt)
        self.full = self.config
        archs = self.full.get("architectures") or []
        self.layout = REMOTE if REMOTE in archs else HF
        text_key = "lm_config" if self.layout == REMOTE else "text_config"
        self.lm_prefix = "model." if self.layout == REMOTE else "model.language_model."
        text = self.full.get(text_key)
        if not isinstance(text, dict):
            raise self.bad(f"{text_key!r} must be an object (the language model's config)")
        self.config = text  # the cfg_* helpers read the language model's keys
        act = self.config.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{text_key}.hidden_act={shown(act)} is not supported (llama uses 'silu')",
                                        self.config_path)
        self.hp = self._hparams()
        self.chat_format = template_format(chat_template_of(ckpt.dir / "tokenizer_config.json"), EDGE_FORMAT)

    def _hparams(self) -> HFHparams:
        p = self.lm_prefix
        embedding = f"{p}embed_tokens.weight"
        n_embd, n_head, n_head_kv, head_dim = head_sizes(self, embedding)
        if head_dim % 2:
            raise self.bad(f"head_dim ({head_dim}) must be even (llama rotates it in pairs)")
        rope = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise UnsupportedModelError(f"rope type {shown(kind)} is not supported (only the default rope)",
                                        self.config_path)
        theta = rope.get("rope_theta", self.config.get("rope_theta", 10000.0))
        if not isinstance(theta, (int, float)) or isinstance(theta, bool) or not theta > 0:
            raise self.bad(f"'rope_theta' must be a positive number, got {shown(theta)}")
        n_layer = self.cfg_int("num_hidden_layers")
        self.check_layers("num_hidden_layers", n_layer, rf"{p.replace('.', chr(92) + '.')}layers\.(\d+)\.")
        n_vocab = self.cfg_int("vocab_size")
        self.check_rows("vocab_size", n_vocab, embedding, 0, "rows")
        tied_default = self.full.get("tie_word_embeddings", self.layout == HF)
        if self.layout == HF and isinstance(tied_default, bool):
            # GlmAsrForConditionalGeneration ties by its own config, whatever text_config says
            self.config = {**self.config, "tie_word_embeddings": tied_default}
        return HFHparams(
            n_layer=n_layer, n_embd=n_embd, n_ff=self.cfg_int("intermediate_size"), n_head=n_head,
            n_head_kv=n_head_kv, head_dim=head_dim, n_rot=head_dim, n_vocab=n_vocab,
            n_ctx=self.cfg_int("max_position_embeddings", default=8192),
            eps=self.cfg_float("rms_norm_eps", 1e-5, maximum=MAX_NORM_EPS), rope_base=float(theta),
            qkv_bias=self.cfg_bool("attention_bias", False),
            tied=self.cfg_bool("tie_word_embeddings", tied_default) and "lm_head.weight" not in self.ckpt.names(),
        )

    # -- GGUF -----------------------------------------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        write_hparams(w, self.hp, n_rot=self.hp.n_rot)
        w.add_vocab_size(self.hp.n_vocab)

    def write_vocab(self, w: gguf.GGUFWriter) -> None:
        path = self.ckpt.dir / "tokenizer.json"
        if not path.is_file():
            raise InputError("tokenizer file not found (GLM-ASR ships tokenizer.json)", path)
        vocab = build_tokenizer_json_vocab(path, self.hp.n_vocab)
        eos = next((vocab.specials[t] for t in ("<|endoftext|>", "<|user|>") if t in vocab.specials), None)
        if eos is None:
            raise InputError("the special token <|endoftext|> is not defined", path)
        ids = {"eos": eos, "pad": eos}
        if "<|user|>" in vocab.specials:
            ids["eot"] = vocab.specials["<|user|>"]
        write_bpe_vocab(w, vocab, ids)

    def _out(self, kind: T, bid: int | None, shape: tuple[int, ...], source: str, bias: bool = False,
             n_head: int = 0) -> list[OutTensor]:
        name = gguf_name(kind, bid)
        build = (lambda a, h=n_head: permute_rope(a[0], h)) if n_head else None
        plan = [OutTensor(f"{name}.weight", shape, (f"{source}.weight",), *([build] if build else []))]
        if bias:
            plan.append(OutTensor(f"{name}.bias", shape[:1], (f"{source}.bias",), *([build] if build else [])))
        return plan

    def tensors(self) -> list[OutTensor]:
        hp, p = self.hp, self.lm_prefix
        q_rows, kv_rows = hp.n_head * hp.head_dim, hp.n_head_kv * hp.head_dim
        plan = self._out(T.TOKEN_EMBD, None, (hp.n_vocab, hp.n_embd), f"{p}embed_tokens")
        for bid in range(hp.n_layer):
            layer = f"{p}layers.{bid}."
            plan += self._out(T.ATTN_NORM, bid, (hp.n_embd,), layer + "input_layernorm")
            plan += self._out(T.ATTN_Q, bid, (q_rows, hp.n_embd), layer + "self_attn.q_proj", hp.qkv_bias, hp.n_head)
            plan += self._out(T.ATTN_K, bid, (kv_rows, hp.n_embd), layer + "self_attn.k_proj", hp.qkv_bias,
                              hp.n_head_kv)
            plan += self._out(T.ATTN_V, bid, (kv_rows, hp.n_embd), layer + "self_attn.v_proj", hp.qkv_bias)
            plan += self._out(T.ATTN_OUT, bid, (hp.n_embd, q_rows), layer + "self_attn.o_proj")
            plan += self._out(T.FFN_NORM, bid, (hp.n_embd,), layer + "post_attention_layernorm")
            plan += self._out(T.FFN_GATE, bid, (hp.n_ff, hp.n_embd), layer + "mlp.gate_proj")
            plan += self._out(T.FFN_UP, bid, (hp.n_ff, hp.n_embd), layer + "mlp.up_proj")
            plan += self._out(T.FFN_DOWN, bid, (hp.n_embd, hp.n_ff), layer + "mlp.down_proj")
        plan += self._out(T.OUTPUT_NORM, None, (hp.n_embd,), f"{p}norm")
        if not hp.tied:
            plan += self._out(T.OUTPUT, None, (hp.n_vocab, hp.n_embd), "lm_head")
        return plan

    def projector(self) -> Projector:
        """transformers' encoder and the remote one with ``use_rope: true`` rotate queries and keys: our own
        projector type, run on our own graph (:mod:`rope_encoder`); the remote one without, libmtmd's ``glma``."""
        if self.layout == HF or self.full.get("use_rope", False) is True:
            return RopeEncoderProjector(self, remote=self.layout == REMOTE)
        return GlmaProjector(self)


class GlmaProjector(Projector):
    """The Whisper encoder and MLP adapter as libmtmd's ``glma`` projector (clip.cpp's loader, whisper-enc.cpp)."""

    projector_type = "glma"
    f32_tensors = ("a.position_embd.weight", "a.conv1d.1.bias", "a.conv1d.2.bias", "v.boi", "v.eoi")

    def __init__(self, family: GlmAsr):
        super().__init__(family)
        full = family.full
        if full.get("use_rope", False) is not False:  # true is RopeEncoderProjector's; anything else is no boolean
            raise UnsupportedModelError(
                f"use_rope={shown(full.get('use_rope'))}: the encoder rotates queries and keys, which libmtmd's glma "
                "graph (learned positions, no rotary) cannot compute", family.config_path)
        wc = full.get("whisper_config")
        if not isinstance(wc, dict):
            raise family.bad("'whisper_config' must be an object (the audio encoder's config)")
        self.wc = wc
        for key, want in (("adapter_type", "mlp"), ("mlp_adapter_act", "gelu")):
            if full.get(key, want) != want:
                raise UnsupportedModelError(f"{key}={shown(full.get(key))} is not supported (libmtmd's glma takes "
                                            f"{want!r})", family.config_path)
        if wc.get("activation_function", "gelu") != "gelu":
            raise UnsupportedModelError(f"whisper_config.activation_function={shown(wc.get('activation_function'))}"
                                        " is not supported (libmtmd's glma takes 'gelu')", family.config_path)
        self.d = self._int("d_model")
        self.n_layer = self._int("encoder_layers")
        self.n_head = self._int("encoder_attention_heads")
        self.n_ff = self._int("encoder_ffn_dim")
        self.n_mel = self._int("num_mel_bins")
        self.n_pos = self._int("max_source_positions")
        self.stack = full.get("merge_factor", 2)
        if type(self.stack) is not int or not 1 <= self.stack <= 64:
            raise family.bad(f"'merge_factor' must be an integer in 1..64, got {shown(self.stack)}")
        if self.d % self.n_head:
            raise family.bad(f"whisper_config: d_model ({self.d}) is not a multiple of encoder_attention_heads "
                             f"({self.n_head})")
        if self.n_pos < WHISPER_POSITIONS:
            raise family.bad(f"whisper_config.max_source_positions is {self.n_pos}: libmtmd encodes 30 s chunks, "
                             f"{WHISPER_POSITIONS} positions")
        if WHISPER_POSITIONS % self.stack:
            raise family.bad(f"'merge_factor' {self.stack} does not divide the {WHISPER_POSITIONS} positions of a "
                             "30 s chunk")
        held = family.held_indices(r"audio_encoder\.whisper\.layers\.(\d+)\.")
        if len(held) < self.n_layer:
            raise family.bad(f"whisper_config.encoder_layers is {self.n_layer} but the checkpoint holds "
                             f"{len(held)} encoder layers")

    def _int(self, key: str) -> int:
        value = self.wc.get(key)
        if type(value) is not int or not 1 <= value <= 1 << 20:
            raise self.family.bad(f"whisper_config.{key} must be a positive integer, got {shown(value)}")
        return value

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        w.add_bool(KEY_HAS_VISION, False)
        w.add_bool(KEY_HAS_AUDIO, True)
        w.add_uint32("clip.audio.embedding_length", self.d)
        w.add_uint32("clip.audio.feed_forward_length", self.n_ff)
        w.add_uint32("clip.audio.block_count", self.n_layer)
        w.add_uint32("clip.audio.attention.head_count", self.n_head)
        w.add_uint32("clip.audio.projection_dim", self.family.hp.n_embd)
        w.add_float32("clip.audio.attention.layer_norm_epsilon", 1e-5)
        w.add_uint32("clip.audio.num_mel_bins", self.n_mel)
        w.add_uint32("clip.audio.projector.stack_factor", self.stack)

    def tensors(self) -> list[OutTensor]:
        d, ff, out = self.d, self.n_ff, self.family.hp.n_embd
        enc, ad = "audio_encoder.whisper.", "audio_encoder."

        def pair(name: str, source: str, shape: tuple[int, ...], bias: bool = True) -> list[OutTensor]:
            plan = [OutTensor(f"{name}.weight", shape, (f"{source}.weight",))]
            return plan + ([OutTensor(f"{name}.bias", shape[:1], (f"{source}.bias",))] if bias else [])

        plan: list[OutTensor] = []
        for i, (src, inp) in enumerate((("conv1", self.n_mel), ("conv2", d)), 1):
            # the bias is added to the conv's (frames, channels) output: one column, (channels, 1) in numpy order
            plan += [OutTensor(f"a.conv1d.{i}.weight", (d, inp, 3), (f"{enc}{src}.weight",)),
                     OutTensor(f"a.conv1d.{i}.bias", (d, 1), (f"{enc}{src}.bias",), _column)]
        plan.append(OutTensor("a.position_embd.weight", (self.n_pos, d), (enc + "embed_positions.weight",)))
        for i in range(self.n_layer):
            src, dst = f"{enc}layers.{i}.", f"a.blk.{i}."
            plan += pair(dst + "ln1", src + "self_attn_layer_norm", (d,))
            plan += pair(dst + "attn_q", src + "self_attn.q_proj", (d, d))
            plan += pair(dst + "attn_k", src + "self_attn.k_proj", (d, d), bias=False)
            plan += pair(dst + "attn_v", src + "self_attn.v_proj", (d, d))
            plan += pair(dst + "attn_out", src + "self_attn.out_proj", (d, d))
            plan += pair(dst + "ln2", src + "final_layer_norm", (d,))
            plan += pair(dst + "ffn_up", src + "fc1", (ff, d))
            plan += pair(dst + "ffn_down", src + "fc2", (d, ff))
        plan += pair("mm.a.norm_pre", ad + "layer_norm", (d,))
        plan += pair("mm.a.mlp.1", ad + "adapting.0", (2 * out, d * self.stack))
        plan += pair("mm.a.mlp.2", ad + "adapting.2", (out, 2 * out))
        table = ad + "audio_bos_eos_token.weight"
        plan.append(OutTensor("v.boi", (1, out), (table,), _row(0)))
        plan.append(OutTensor("v.eoi", (1, out), (table,), _row(1)))
        return plan

    def check_shapes(self, plan: list[OutTensor]) -> None:
        super().check_shapes(plan)
        table = "audio_encoder.audio_bos_eos_token.weight"
        shape = tuple(self.ckpt.info(table).shape)
        if shape != (2, self.family.hp.n_embd):
            raise InputError(f"tensor {table!r} is {shape}, expected (2, {self.family.hp.n_embd})",
                             self.ckpt.file_of(table))


def _column(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return arrays[0].reshape(-1, 1)


def _row(i: int):
    def build(arrays: Sequence[np.ndarray]) -> np.ndarray:
        return arrays[0][i:i + 1]
    return build


CONVERTER = GlmAsr

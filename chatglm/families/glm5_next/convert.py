"""The converter of ``Glm5NextForConditionalGeneration`` (GLM-5.3-Flash): llama.cpp's ``glm5-next`` architecture.

Per layer (transformers' modeling_glm5_next.py): the ``hc_mult`` (4) residual streams are collapsed by a
hyper-connection (``hc_attn_*``: an RMS-normed projection of all streams gives pre/post weights and a Sinkhorn-
normalised mixing matrix) → RMSNorm → attention → expanded back into the streams; the same around the MLP
(``hc_ffn_*``). Attention is either

- linear (``layer_types`` ``linear_attention``): Kimi delta attention. q/k/v projections each through a causal
  depthwise conv (``q_conv1d`` ...) and SiLU, a per-channel forget gate (``f_a_proj``/``f_b_proj`` + ``dt_bias``,
  decay ``A_log``: llama.cpp takes ``ssm_a`` = -exp(A_log)), a per-head beta (``b_proj``), a gated RMSNorm output
  (``g_a_proj``/``g_b_proj``, ``o_norm``). GGUF ``head_count_kv`` 0 marks these layers;
- latent (``indexed_attention``): nope-only MLA (``qk_rope_head_dim`` 0; ``kv_b_proj`` split into llama.cpp's
  ``attn_k_b``/``attn_v_b``), attending only to the tokens a DSA indexer selects: whole k-pools of ``index_kpool``
  tokens (their keys pooled by a learned softmax, ``index_kpool_compress_gate``/``_ape``) plus the incomplete tail.
  ``indexer_types`` ``shared`` layers reuse the previous full layer's selection and hold no indexer. ``head_count_kv``
  1 (the latent is stored as one key head).

The MLP is dense for the leading ``mlp_layer_types`` ``dense`` layers, else a sigmoid-routed mixture of experts with
a shared expert; every SwiGLU clamps gate and up at ``swiglu_limit``. After the last layer the streams are averaged.

config.json: transformers saves the text settings in ``text_config`` with flat ``linear_*`` keys; published files may
have them at the top level with a nested ``linear_attn_config``, and ``first_k_dense_replace``: both are read. Weights:
``model.language_model.`` (transformers) or ``model.`` prefixes. The vision tower (``model.visual.*``) is the
``glm5v`` projector (``vision.py``, on GLM-4.1V's writer in ``chatglm/families/glm4v``); the language model
also loads and chats alone. The ``num_nextn_predict_layers`` NextN (MTP) layers
after the last one are kept as ``blk.{L}.nextn.*`` (a latent-attention layer with a full indexer; llama.cpp's NextN
block has no hyper-connections), for speculative decoding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import gguf
import numpy as np

from chatglm.convert.config_types import is_number, shown
from chatglm.convert.family import Family, OutTensor, check_shape, stack_experts
from chatglm.convert.hf_layout import HFGlmFamily, template_format
from chatglm.convert.vocab_bpe import chat_template_of
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.glm4_moe.convert import write_expert_metadata
from chatglm.families.glm5_next import FAMILY
from chatglm.families.glm5_next.vision import Glm5vProjector
from chatglm.limits import MAX_EXPERTS, MAX_NORM_EPS

T = gguf.MODEL_TENSOR
ARCH = FAMILY.arch
LINEAR, LATENT = "linear_attention", "indexed_attention"
HC_MULT = 4  # llama.cpp: GGML_ASSERT(hc_mult == 4) in load_arch_hparams
# GGUF keys and tensor names gguf-py 0.19 predates (llama.cpp's llama-arch.cpp spells them so).
KEY_KPOOL = "attention.indexer.kpool"
KEY_KPOOL_TAIL = "attention.indexer.kpool_select_tail"
KEY_INDEXER_TYPES = "attention.indexer.types"
KEY_HC = ("hyper_connection.count", "hyper_connection.sinkhorn_iterations", "hyper_connection.epsilon")
KEY_KDA_HEAD_DIM, KEY_KDA_LOWER_BOUND = "kda.head_dim", "kda.gate_lower_bound"
HC_TENSORS = ("hc_attn_fn", "hc_attn_base", "hc_attn_scale", "hc_ffn_fn", "hc_ffn_base", "hc_ffn_scale")
KPOOL_GATE, KPOOL_APE = "indexer_compressor_gate", "indexer_compressor_ape"
# flat transformers key -> (nested linear_attn_config key, transformers' default)
LINEAR_KEYS = {"linear_head_dim": ("head_dim", 128), "linear_num_heads": ("num_heads", 64),
               "linear_conv_kernel_dim": ("short_conv_kernel_size", 4)}


@dataclass(frozen=True)
class NextHparams:
    n_layer: int  # block_count: trunk + NextN (what llama.cpp's quantizer counts)
    n_trunk: int
    n_nextn: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int  # of layer 0 (what llama-quantize's n_gqa() sees)
    n_vocab: int
    n_ctx: int
    eps: float
    tied: bool
    layer_kinds: tuple[str, ...]
    indexer_full: tuple[bool, ...]
    n_dense: int
    q_lora: int
    kv_lora: int
    nope: int
    v_dim: int
    kda_dim: int
    d_conv: int
    lower_bound: float | None
    idx_heads: int
    idx_dim: int
    topk: int
    kpool: int
    tail: bool
    hc_iters: int
    hc_eps: float
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_ff_exp: int
    scale: float
    norm_topk: bool
    swiglu_limit: float | None

    def latent(self, bid: int) -> bool:
        return bid >= self.n_trunk or self.layer_kinds[bid] == LATENT


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The text model's settings: ``text_config`` over the top level (files saved flat have only the latter)."""
    inner = config.get("text_config")
    top = {k: v for k, v in config.items() if k not in ("text_config", "vision_config")}
    return {**top, **inner} if isinstance(inner, dict) else top



def _neg_exp(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return -np.exp(arrays[0].astype(np.float32).reshape(-1))  # llama.cpp's ssm_a: -exp(A_log)


def _conv4(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return arrays[0].reshape(1, arrays[0].shape[0], 1, -1)  # (d_inner, 1, kernel) -> llama.cpp's 4-D layout


def _split_kv_b(n_head: int, nope: int, v_dim: int, part: str):
    def build(arrays: Sequence[np.ndarray]) -> np.ndarray:
        kv_b = arrays[0].reshape(n_head, nope + v_dim, -1)  # (head, nope + v, kv_lora)
        if part == "k":
            return np.ascontiguousarray(kv_b[:, :nope].transpose(0, 2, 1))  # (head, kv_lora, nope)
        return np.ascontiguousarray(kv_b[:, nope:])  # (head, v, kv_lora)
    return build


class Glm5Next(HFGlmFamily):
    name = FAMILY.variants[0]
    arch = ARCH
    default_bias = False

    def __init__(self, ckpt):
        Family.__init__(self, ckpt)
        self.config = text_config(ckpt.config)
        names = ckpt.names()
        self.prefix = "model.language_model." if any(n.startswith("model.language_model.") for n in names) \
            else "model."
        act = self.config.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported (GLM uses 'silu')", self.config_path)
        self.hp = self.next_hparams()
        first = self.hp.n_trunk
        layers = re.escape(self.prefix) + r"layers\."
        self.ignored_sources = tuple(layers + rf"{i}\.hc_(attn|ffn)_\w+" for i in range(first, self.hp.n_layer))
        self.check_layer_kinds()
        self.check_expert_tensors()
        self.chat_format = self.detect_chat_format(chat_template_of(ckpt.dir / "tokenizer_config.json"))

    def detect_chat_format(self, template: str) -> str:
        return template_format(template, FAMILY.chat_formats[0])

    # -- config ---------------------------------------------------------------------------------------------------
    def src(self, bid: int | None, rest: str) -> str:
        return f"{self.prefix}{rest}" if bid is None else f"{self.prefix}layers.{bid}.{rest}"

    def cfg_list(self, key: str, n: int, allowed: set, default: list) -> list:
        value = self.config.get(key)
        if value is None:
            return default
        if not isinstance(value, list) or len(value) != n or any(v not in allowed for v in value):
            raise self.bad(f"{key!r} must list one of {sorted(allowed)} for each of the {n} layers, "
                           f"got {shown(value)}")
        return value

    def cfg_optional_float(self, key: str, value: Any) -> float | None:
        if value is None:
            return None
        if not is_number(value):
            raise self.bad(f"{key!r} must be a number or null, got {shown(value)}")
        return float(value)

    def linear_settings(self) -> tuple[int, int, int, float | None]:
        """(head_dim, num_heads, conv kernel, gate lower bound): flat keys (transformers) or linear_attn_config."""
        nested = self.config.get("linear_attn_config")
        if nested is not None and not isinstance(nested, dict):
            raise self.bad(f"'linear_attn_config' must be an object, got {shown(nested)}")
        nested = nested or {}
        values = []
        for flat, (inner, default) in LINEAR_KEYS.items():
            if flat in self.config and inner in nested and self.config[flat] != nested[inner]:
                raise self.bad(f"{flat!r} ({shown(self.config[flat])}) disagrees with linear_attn_config."
                               f"{inner} ({shown(nested[inner])})")
            value = nested.get(inner, self.config.get(flat, default))
            if type(value) is not int or value < 1:
                raise self.bad(f"{flat!r} must be a positive integer, got {shown(value)}")
            values.append(value)
        lower = self.cfg_optional_float("linear_lower_bound", self.config.get("linear_lower_bound", -5.0))
        if "gate_lower_bound" in nested:
            lower = self.cfg_optional_float("linear_attn_config.gate_lower_bound", nested["gate_lower_bound"])
        if lower is None and nested.get("safe_gate", True) is True and "linear_attn_config" in self.config:
            lower = -5.0  # transformers: a safe gate without a bound gets -5
        return values[0], values[1], values[2], lower


    def indexer_full(self, n_trunk: int, kinds: list[str]) -> tuple[bool, ...]:
        freq = max(self.config.get("index_topk_freq") or 1, 1)
        offset = self.config.get("index_skip_topk_offset", 2)
        if type(freq) is not int or type(offset) is not int:
            raise self.bad(f"'index_topk_freq' and 'index_skip_topk_offset' must be integers, got {shown(freq)} "
                           f"and {shown(offset)}")
        default = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n_trunk)]
        types = self.cfg_list("indexer_types", n_trunk, {"full", "shared"}, default)
        latent = [i for i, k in enumerate(kinds) if k == LATENT]
        if latent and types[latent[0]] != "full":  # llama.cpp: GGML_ASSERT(prev_sel != nullptr)
            raise self.bad(f"the first latent-attention layer ({latent[0]}) has indexer_types 'shared'; a shared "
                           "layer reuses an earlier full layer's selection, and there is none")
        return tuple(t == "full" for t in types)

    def next_hparams(self) -> NextHparams:
        n_embd = self.cfg_int("hidden_size")
        embedding = self.src(None, "embed_tokens.weight")
        self.check_rows("hidden_size", n_embd, embedding, 1, "columns")
        n_trunk = self.cfg_int("num_hidden_layers")
        n_nextn = self.cfg_int("num_nextn_predict_layers", default=0, minimum=0, maximum=n_trunk - 1)
        self.check_layers("num_hidden_layers", n_trunk, re.escape(self.prefix) + r"layers\.(\d+)\.", n_nextn,
                          "num_nextn_predict_layers")
        n_vocab = self.cfg_int("vocab_size")
        self.check_rows("vocab_size", n_vocab, embedding, 0, "rows")
        n_head = self.cfg_int("num_attention_heads")
        if self.config.get("num_key_value_heads", n_head) != n_head:
            raise self.bad(f"'num_key_value_heads' ({shown(self.config['num_key_value_heads'])}) must equal "
                           f"num_attention_heads ({n_head}) for latent attention")
        if self.config.get("q_lora_rank") is None:
            raise UnsupportedModelError("q_lora_rank is null; GLM-5.3-Flash's latent attention needs it",
                                        self.config_path)
        rope = self.config.get("qk_rope_head_dim", 0)
        if rope != 0:
            raise UnsupportedModelError(f"qk_rope_head_dim={shown(rope)} is not supported: llama.cpp's glm5-next "
                                        "latent attention is nope-only (0)", self.config_path)
        hc = self.cfg_int("hc_mult", default=HC_MULT)
        if hc != HC_MULT:
            raise UnsupportedModelError(f"hc_mult={hc} is not supported: llama.cpp's glm5-next runs {HC_MULT} "
                                        "hyper-connection streams", self.config_path)
        kpool = self.cfg_int("index_kpool", default=16)
        topk = self.cfg_int("index_topk")
        if kpool < 2:
            raise UnsupportedModelError(f"index_kpool={kpool} is not supported: llama.cpp's glm5-next needs pools "
                                        "of 2 or more tokens", self.config_path)
        if topk % kpool:
            raise self.bad(f"'index_topk' ({topk}) is not a multiple of index_kpool ({kpool})")
        if not self.cfg_bool("index_kpool_always_select_tail", True):
            raise UnsupportedModelError("index_kpool_always_select_tail=false is not supported: the first tokens of "
                                        "a sequence would select no key, and llama.cpp's attention gives NaN there",
                                        self.config_path)
        kda_dim, kda_heads, d_conv, lower = self.linear_settings()
        if kda_heads != n_head:
            raise UnsupportedModelError(f"linear_num_heads ({kda_heads}) differs from num_attention_heads "
                                        f"({n_head}); llama.cpp's glm5-next uses one head count for both",
                                        self.config_path)
        if d_conv < 2:
            raise UnsupportedModelError(f"linear_conv_kernel_dim={d_conv}: llama.cpp's short convolution needs a "
                                        "kernel of 2 or more", self.config_path)
        kinds = self.cfg_list("layer_types", n_trunk, {LINEAR, LATENT, "full_attention"},
                              [LATENT if i % 4 == 3 else LINEAR for i in range(n_trunk)])
        kinds = [LATENT if k == "full_attention" else k for k in kinds]
        if self.cfg_bool("attention_bias", False):
            raise UnsupportedModelError("attention_bias=true is not supported (llama.cpp's glm5-next has no "
                                        "attention biases)", self.config_path)
        for key in ("n_group", "topk_group"):
            if self.config.get(key, 1) != 1:
                raise UnsupportedModelError(f"grouped expert routing ({key}={shown(self.config[key])}) is not "
                                            "supported (GLM-5.3-Flash uses 1)", self.config_path)
        n_expert = self.cfg_int("n_routed_experts", maximum=MAX_EXPERTS)
        used = self.cfg_int("num_experts_per_tok")
        if used > n_expert:
            raise self.bad(f"inconsistent expert counts: num_experts_per_tok={used} > n_routed_experts={n_expert}")
        limit = self.cfg_optional_float("swiglu_limit", self.config.get("swiglu_limit", 10.0))
        if limit is not None and limit <= 0:
            raise self.bad(f"'swiglu_limit' must be positive or null, got {shown(limit)}")
        return NextHparams(
            n_layer=n_trunk + n_nextn, n_trunk=n_trunk, n_nextn=n_nextn, n_embd=n_embd,
            n_ff=self.cfg_int("intermediate_size"), n_head=n_head, n_head_kv=int(kinds[0] == LATENT),
            n_vocab=n_vocab, n_ctx=self.cfg_int("max_position_embeddings", default=8192),
            eps=self.cfg_float("rms_norm_eps", 1e-5, maximum=MAX_NORM_EPS),
            tied=self.cfg_bool("tie_word_embeddings", False) and "lm_head.weight" not in set(self.ckpt.names()),
            layer_kinds=tuple(kinds),
            indexer_full=self.indexer_full(n_trunk, kinds), n_dense=self.leading_dense(n_trunk, default=3),
            q_lora=self.cfg_int("q_lora_rank"), kv_lora=self.cfg_int("kv_lora_rank"),
            nope=self.cfg_int("qk_nope_head_dim"), v_dim=self.cfg_int("v_head_dim"),
            kda_dim=kda_dim, d_conv=d_conv, lower_bound=lower,
            idx_heads=self.cfg_int("index_n_heads"), idx_dim=self.cfg_int("index_head_dim"), topk=topk,
            kpool=kpool, tail=True,
            hc_iters=self.cfg_int("hc_sinkhorn_iters", default=20), hc_eps=self.cfg_float("hc_eps", 1e-6),
            n_expert=n_expert, n_expert_used=used, n_expert_shared=self.cfg_int("n_shared_experts", default=1),
            n_ff_exp=self.cfg_int("moe_intermediate_size"),
            scale=self.cfg_float("routed_scaling_factor", default=2.5),
            norm_topk=self.cfg_bool("norm_topk_prob", True), swiglu_limit=limit,
        )

    # -- declared layer kinds against the tensors present --------------------------------------------------------
    def check_layer_kinds(self) -> None:
        """Each layer's tensors are those of the attention kind and indexer mode config.json gives it."""
        names = set(self.ckpt.names())
        hp = self.hp
        for bid in range(hp.n_layer):
            latent = self.src(bid, "self_attn.q_a_proj.weight") in names
            linear = self.src(bid, "self_attn.q_proj.weight") in names
            kind = "NextN (latent)" if bid >= hp.n_trunk else f"{hp.layer_kinds[bid]!r}"
            if latent != hp.latent(bid) or linear == hp.latent(bid):
                held = "latent-attention (q_a_proj)" if latent else "linear-attention (q_proj)" if linear else "no"
                raise InputError(f"layer {bid} is {kind} in config.json (layer_types) but holds {held} attention "
                                 "tensors", self.ckpt.dir)
            has_indexer = self.src(bid, "self_attn.indexer.wk.weight") in names
            wants = hp.latent(bid) and (bid >= hp.n_trunk or hp.indexer_full[bid])
            if has_indexer != wants:
                mode = "a full" if wants else "no" if not hp.latent(bid) else "a shared (no)"
                raise InputError(f"layer {bid} should have {mode} indexer (config.json indexer_types) but "
                                 f"{'lacks' if wants else 'holds'} self_attn.indexer tensors", self.ckpt.dir)

    def check_expert_tensors(self) -> None:
        pattern = re.compile(re.escape(self.prefix) + r"layers\.(\d+)\.mlp\.experts\.(\d+)\.")
        found: dict[int, set[int]] = {}
        for name in self.ckpt.names():
            m = pattern.match(name)
            if m:
                found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        for bid, experts in sorted(found.items()):
            if experts != set(range(self.hp.n_expert)):
                raise InputError(f"inconsistent expert counts: layer {bid} has {len(experts)} experts "
                                 f"({min(experts)}..{max(experts)}), config.json says n_routed_experts="
                                 f"{self.hp.n_expert}", self.ckpt.dir)

    # -- GGUF metadata --------------------------------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        hp = self.hp
        key = f"{ARCH}.{{}}".format
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_feed_forward_length(hp.n_ff)
        w.add_block_count(hp.n_layer)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv([int(hp.latent(bid)) for bid in range(hp.n_layer)])
        w.add_vocab_size(hp.n_vocab)
        w.add_layer_norm_rms_eps(hp.eps)
        w.add_layer_norm_eps(1e-6)  # the indexer's key LayerNorm (transformers: eps 1e-6)
        if hp.n_nextn:
            w.add_uint32(key("nextn_predict_layers"), hp.n_nextn)
        # linear attention
        w.add_ssm_conv_kernel(hp.d_conv)
        w.add_uint32(key(KEY_KDA_HEAD_DIM), hp.kda_dim)
        if hp.lower_bound is not None:
            w.add_float32(key(KEY_KDA_LOWER_BOUND), hp.lower_bound)
        # nope-only latent attention: the cache holds the latent (key and value length kv_lora_rank)
        w.add_q_lora_rank(hp.q_lora)
        w.add_kv_lora_rank(hp.kv_lora)
        w.add_rope_dimension_count(0)
        w.add_key_length(hp.kv_lora)
        w.add_value_length(hp.kv_lora)
        w.add_uint32(key("attention.key_length_mla"), hp.nope)
        w.add_uint32(key("attention.value_length_mla"), hp.v_dim)
        # the k-pool indexer
        w.add_uint32(key("attention.indexer.head_count"), hp.idx_heads)
        w.add_uint32(key("attention.indexer.key_length"), hp.idx_dim)
        w.add_uint32(key("attention.indexer.top_k"), hp.topk)
        w.add_uint32(key(KEY_KPOOL), hp.kpool)
        w.add_bool(key(KEY_KPOOL_TAIL), hp.tail)
        w.add_array(key(KEY_INDEXER_TYPES), list(hp.indexer_full))
        # hyper-connections
        w.add_uint32(key(KEY_HC[0]), HC_MULT)
        w.add_uint32(key(KEY_HC[1]), hp.hc_iters)
        w.add_float32(key(KEY_HC[2]), hp.hc_eps)
        # experts
        write_expert_metadata(w, hp)
        if hp.swiglu_limit is not None:
            w.add_array(key("swiglu_clamp_exp"), [hp.swiglu_limit] * hp.n_layer)
            w.add_array(key("swiglu_clamp_shexp"), [hp.swiglu_limit] * hp.n_layer)

    # -- tensors --------------------------------------------------------------------------------------------------
    def put(self, name: str, shape: tuple[int, ...], source: str, build=None) -> list[OutTensor]:
        """GGUF ``name`` from one source tensor (``source`` relative to the language model's prefix)."""
        sources = (f"{self.prefix}{source}",)
        return [OutTensor(name, shape, sources) if build is None else OutTensor(name, shape, sources, build)]

    def tensors(self) -> list[OutTensor]:
        hp = self.hp
        plan = self.put("token_embd.weight", (hp.n_vocab, hp.n_embd), "embed_tokens.weight")
        for bid in range(hp.n_layer):
            plan += self.layer_tensors(bid)
        plan += self.put("output_norm.weight", (hp.n_embd,), "norm.weight")
        head = OutTensor("output.weight", (hp.n_vocab, hp.n_embd),
                         (f"{self.prefix}embed_tokens.weight" if hp.tied else "lm_head.weight",))
        return plan + [head]

    def layer_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        p, s = f"blk.{bid}.", f"layers.{bid}."
        plan = self.put(f"{p}attn_norm.weight", (hp.n_embd,), s + "input_layernorm.weight")
        plan += self.put(f"{p}ffn_norm.weight", (hp.n_embd,), s + "post_attention_layernorm.weight")
        if bid < hp.n_trunk:
            mix = (2 + HC_MULT) * HC_MULT
            for name in HC_TENSORS:
                shape = {"fn": (mix, HC_MULT * hp.n_embd), "base": (mix,), "scale": (3,)}[name.rsplit("_", 1)[1]]
                plan += self.put(f"{p}{name}.weight", shape, s + name)
        plan += self.latent_tensors(bid) if hp.latent(bid) else self.linear_tensors(bid)
        plan += self.dense_tensors(bid) if bid < hp.n_dense else self.expert_tensors(bid)
        if bid >= hp.n_trunk:
            plan += self.nextn_tensors(bid)
        return plan

    def linear_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        p, s = f"blk.{bid}.", f"layers.{bid}.self_attn."
        inner, e, d = hp.kda_dim * hp.n_head, hp.n_embd, hp.kda_dim
        plan: list[OutTensor] = []
        for x in "qkv":
            plan += self.put(f"{p}attn_{x}.weight", (inner, e), s + f"{x}_proj.weight")
            plan += self.put(f"{p}ssm_conv1d_{x}.weight", (1, inner, 1, hp.d_conv), s + f"{x}_conv1d.weight",
                             _conv4)
        plan += self.put(f"{p}ssm_f_a.weight", (d, e), s + "f_a_proj.weight")
        plan += self.put(f"{p}ssm_f_b.weight", (inner, d), s + "f_b_proj.weight")
        plan += self.put(f"{p}ssm_beta.weight", (hp.n_head, e), s + "b_proj.weight")
        plan += self.put(f"{p}ssm_a", (hp.n_head,), s + "A_log", _neg_exp)
        plan += self.put(f"{p}ssm_dt.bias", (inner,), s + "dt_bias")
        plan += self.put(f"{p}ssm_g_a.weight", (d, e), s + "g_a_proj.weight")
        plan += self.put(f"{p}ssm_g_b.weight", (inner, d), s + "g_b_proj.weight")
        plan += self.put(f"{p}ssm_norm.weight", (d,), s + "o_norm.weight")
        return plan + self.put(f"{p}attn_output.weight", (e, inner), s + "o_proj.weight")

    def latent_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        p, s = f"blk.{bid}.", f"layers.{bid}.self_attn."
        e, h = hp.n_embd, hp.n_head
        plan = self.put(f"{p}attn_q_a.weight", (hp.q_lora, e), s + "q_a_proj.weight")
        plan += self.put(f"{p}attn_q_a_norm.weight", (hp.q_lora,), s + "q_a_layernorm.weight")
        plan += self.put(f"{p}attn_q_b.weight", (h * hp.nope, hp.q_lora), s + "q_b_proj.weight")
        plan += self.put(f"{p}attn_kv_a_mqa.weight", (hp.kv_lora, e), s + "kv_a_proj_with_mqa.weight")
        plan += self.put(f"{p}attn_kv_a_norm.weight", (hp.kv_lora,), s + "kv_a_layernorm.weight")
        plan += self.put(f"{p}attn_k_b.weight", (h, hp.kv_lora, hp.nope), s + "kv_b_proj.weight",
                         _split_kv_b(h, hp.nope, hp.v_dim, "k"))
        plan += self.put(f"{p}attn_v_b.weight", (h, hp.v_dim, hp.kv_lora), s + "kv_b_proj.weight",
                         _split_kv_b(h, hp.nope, hp.v_dim, "v"))
        plan += self.put(f"{p}attn_output.weight", (e, h * hp.v_dim), s + "o_proj.weight")
        if bid >= hp.n_trunk or hp.indexer_full[bid]:
            plan += self.indexer_tensors(bid)
        return plan

    def indexer_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        p, s = f"blk.{bid}.", f"layers.{bid}.self_attn.indexer."
        d = hp.idx_dim
        plan = self.put(f"{p}indexer.k_norm.weight", (d,), s + "k_norm.weight")
        plan += self.put(f"{p}indexer.k_norm.bias", (d,), s + "k_norm.bias")
        plan += self.put(f"{p}indexer.proj.weight", (hp.idx_heads, hp.n_embd), s + "weights_proj.weight")
        plan += self.put(f"{p}indexer.attn_k.weight", (d, hp.n_embd), s + "wk.weight")
        plan += self.put(f"{p}indexer.attn_q_b.weight", (hp.idx_heads * d, hp.q_lora), s + "wq_b.weight")
        plan += self.put(f"{p}{KPOOL_GATE}.weight", (d, hp.n_embd), s + "index_kpool_compress_gate")
        return plan + self.put(f"{p}{KPOOL_APE}.weight", (hp.kpool, d), s + "index_kpool_compress_ape")

    def dense_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        p, s = f"blk.{bid}.", f"layers.{bid}.mlp."
        plan = self.put(f"{p}ffn_gate.weight", (hp.n_ff, hp.n_embd), s + "gate_proj.weight")
        plan += self.put(f"{p}ffn_up.weight", (hp.n_ff, hp.n_embd), s + "up_proj.weight")
        return plan + self.put(f"{p}ffn_down.weight", (hp.n_embd, hp.n_ff), s + "down_proj.weight")

    def expert_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        p, s = f"blk.{bid}.", f"layers.{bid}.mlp."
        n_sh, fe, e = hp.n_ff_exp * hp.n_expert_shared, hp.n_ff_exp, hp.n_embd
        plan = self.put(f"{p}ffn_gate_inp.weight", (hp.n_expert, e), s + "gate.weight")
        plan += self.put(f"{p}exp_probs_b.bias", (hp.n_expert,), s + "gate.e_score_correction_bias")
        for kind, proj, shape in (("gate", "gate_proj", (fe, e)), ("up", "up_proj", (fe, e)),
                                  ("down", "down_proj", (e, fe))):
            sources = tuple(self.src(bid, f"mlp.experts.{x}.{proj}.weight") for x in range(hp.n_expert))
            plan.append(OutTensor(f"{p}ffn_{kind}_exps.weight", (hp.n_expert, *shape), sources, stack_experts))
        plan += self.put(f"{p}ffn_gate_shexp.weight", (n_sh, e), s + "shared_experts.gate_proj.weight")
        plan += self.put(f"{p}ffn_up_shexp.weight", (n_sh, e), s + "shared_experts.up_proj.weight")
        return plan + self.put(f"{p}ffn_down_shexp.weight", (e, n_sh), s + "shared_experts.down_proj.weight")

    def nextn_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        p, s, e = f"blk.{bid}.nextn.", f"layers.{bid}.", hp.n_embd
        plan = self.put(f"{p}eh_proj.weight", (e, 2 * e), s + "eh_proj.weight")
        plan += self.put(f"{p}enorm.weight", (e,), s + "enorm.weight")
        plan += self.put(f"{p}hnorm.weight", (e,), s + "hnorm.weight")
        names = set(self.ckpt.names())
        optional = (("embed_tokens", (hp.n_vocab, e), "embed_tokens.weight"),
                    ("shared_head_head", (hp.n_vocab, e), "shared_head.head.weight"),
                    ("shared_head_norm", (e,), "shared_head.norm.weight"))
        for name, shape, source in optional:
            if self.src(bid, source) in names:
                plan += self.put(f"{p}{name}.weight", shape, s + source)
        return plan

    def check_shapes(self, plan: list[OutTensor]) -> None:
        super().check_shapes(plan)
        hp = self.hp
        for t in plan:
            if t.build is stack_experts:
                for source in t.sources:
                    check_shape(self, source, t.shape[1:])
            elif t.name.endswith("attn_k_b.weight"):
                check_shape(self, t.sources[0], (hp.n_head * (hp.nope + hp.v_dim), hp.kv_lora))
            elif t.name.endswith("ssm_a"):
                check_shape(self, t.sources[0], (hp.n_head,))
            elif t.build is _conv4:
                check_shape(self, t.sources[0], (hp.kda_dim * hp.n_head, 1, hp.d_conv))

    def projector(self) -> Glm5vProjector:
        """The vision tower (``model.visual.*``): libmtmd's ``glm5v``."""
        return Glm5vProjector(self)


CONVERTER = Glm5Next

"""The converter of ``Glm4MoeLiteForCausalLM`` (GLM-4.7-Flash): llama.cpp's ``deepseek2`` architecture.

Per layer (transformers' modeling_glm4_moe_lite.py): RMSNorm → multi-head latent attention → residual → RMSNorm
(``post_attention_layernorm``, llama.cpp's ``ffn_norm``) → GLM-4.5's MLP (dense in the leading layers, else sigmoid-
routed experts with a score-correction bias and a shared expert) → residual.

Attention, per token: q = q_b(RMSNorm(q_a(x))) (or q_proj(x) when ``q_lora_rank`` is null), each head
[nope | rope] of ``qk_nope_head_dim`` + ``qk_rope_head_dim``; kv_a_proj_with_mqa(x) = [c | k_rope], c the
``kv_lora_rank``-wide latent (RMSNorm'd), k_rope one rope head shared by all heads; kv_b_proj(c) gives each head's
[k_nope | v]. Scores use 1/sqrt(nope + rope). llama.cpp runs it absorbed, as multi-query attention over the cache of
[c | k_rope]: ``head_count_kv`` 1, ``key_length`` = kv_lora_rank + rope, ``value_length`` = kv_lora_rank, the per-head
sizes in ``key_length_mla``/``value_length_mla``, and ``kv_b_proj`` split per head into ``attn_k_b`` (k_nope rows,
transposed: (head, kv_lora_rank, nope)) and ``attn_v_b`` (v rows: (head, v, kv_lora_rank)).

Rope: transformers rotates consecutive pairs of the rope part when ``rope_interleave`` is true (its default, and the
published files'), which is llama.cpp's rope type NORM that deepseek2 uses; with ``rope_interleave`` false it rotates
halves (NEOX), and the rope rows of q and of k_rope are reordered here into pairs.

transformers normalises the q and kv latents (``q_a_layernorm``, ``kv_a_layernorm``) with eps 1e-6, not
``rms_norm_eps``; llama.cpp has one eps for every norm. On the tiny test models that alone is the ~1e-5 relative
logit difference (5.9e-7 with the eps aligned, measured), as it is for llama.cpp's own converter.

Routing is sigmoid whatever config.json says (transformers' router always is; llama.cpp's deepseek2 defaults to softmax
without ``expert_gating_func``). Dense leading layers come from ``mlp_layer_types`` (transformers) or
``first_k_dense_replace`` (published files); both must agree. MTP layers are kept (``chatglm/convert/nextn.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import gguf
import numpy as np

from chatglm.convert.config_types import is_number, shown
from chatglm.convert.family import OutTensor, check_shape
from chatglm.convert.hf_layout import HF_LAYER, HF_TENSORS, template_format
from chatglm.errors import UnsupportedModelError
from chatglm.families import glm4_moe
from chatglm.families.glm4_moe.convert import Glm4Moe
from chatglm.families.glm4_moe_lite import FAMILY
from chatglm.limits import FLOAT32_MAX, MAX_NORM_EPS, UINT32_MAX

T = gguf.MODEL_TENSOR
ATTN = HF_LAYER + "self_attn."


@dataclass(frozen=True)
class MlaHparams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    q_lora: int  # 0: no q LoRA (q_proj)
    kv_lora: int
    nope: int
    rope: int
    v_dim: int
    n_vocab: int
    n_ctx: int
    eps: float
    rope_base: float
    interleaved: bool
    tied: bool

    @property
    def qk_dim(self) -> int:
        return self.nope + self.rope

    @property
    def n_head_kv(self) -> int:
        return 1  # as llama.cpp runs it: multi-query attention over the compressed cache


def _pairs(n: int) -> np.ndarray:
    """Row order turning rotate-half (i, i + n/2) rope pairs into consecutive ones (2i, 2i + 1)."""
    return np.stack([np.arange(n // 2), np.arange(n // 2) + n // 2], axis=1).reshape(-1)


def write_mla_metadata(w: gguf.GGUFWriter, hp, n_block: int, qk_dim: int) -> None:
    """The sizes llama.cpp's latent-attention archs read (deepseek2, glm-dsa): MLA stored as MQA, one KV head whose
    key is [latent | rope] (``key_length``) and whose value is the latent; per head, once decompressed, ``qk_dim``
    (nope + rope) and ``v_dim``."""
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_block_count(n_block)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(hp.eps)
    w.add_rope_freq_base(hp.rope_base)
    w.add_rope_dimension_count(hp.rope)
    w.add_vocab_size(hp.n_vocab)
    w.add_q_lora_rank(hp.q_lora)
    w.add_kv_lora_rank(hp.kv_lora)
    w.add_key_length(hp.kv_lora + hp.rope)
    w.add_value_length(hp.kv_lora)
    w.add_key_length_mla(qk_dim)
    w.add_value_length_mla(hp.v_dim)


class Glm4MoeLite(Glm4Moe):
    name = FAMILY.variants[0]
    arch = FAMILY.arch

    def detect_chat_format(self, template: str) -> str:
        return template_format(template, glm4_moe.FAMILY.chat_formats[1])  # no template: GLM-4.7's format

    def hparams(self) -> MlaHparams:
        n_embd = self.cfg_int("hidden_size")
        self.check_rows("hidden_size", n_embd, f"{HF_TENSORS[T.TOKEN_EMBD]}.weight", 1, "columns")
        n_head = self.cfg_int("num_attention_heads", maximum=n_embd)
        q_lora = self.config.get("q_lora_rank")
        q_lora = 0 if q_lora is None else self.cfg_int("q_lora_rank")
        kv_lora = self.cfg_int("kv_lora_rank")
        nope, rope = self.cfg_int("qk_nope_head_dim"), self.cfg_int("qk_rope_head_dim")
        v_dim = self.cfg_int("v_head_dim")
        if rope % 2:
            raise self.bad(f"qk_rope_head_dim ({rope}) must be even")
        if n_head * max(nope + rope, v_dim) > UINT32_MAX:
            raise self.bad(f"num_attention_heads x head size ({n_head} x {max(nope + rope, v_dim)}) is too large")
        if self.cfg_bool("attention_bias", False):
            raise UnsupportedModelError("attention_bias=true is not supported (llama.cpp's deepseek2 has no "
                                        "attention biases)", self.config_path)
        n_layer = self.cfg_int("num_hidden_layers")
        self.check_layers("num_hidden_layers", n_layer, r"model\.layers\.(\d+)\.", *self.trailing_layers())
        n_vocab = self.cfg_int("vocab_size")
        self.check_rows("vocab_size", n_vocab, f"{HF_TENSORS[T.TOKEN_EMBD]}.weight", 0, "rows")
        return MlaHparams(
            n_layer=n_layer, n_embd=n_embd, n_ff=self.cfg_int("intermediate_size", maximum=UINT32_MAX // 2),
            n_head=n_head, q_lora=q_lora, kv_lora=kv_lora, nope=nope, rope=rope, v_dim=v_dim, n_vocab=n_vocab,
            n_ctx=self.cfg_int("max_position_embeddings", default=8192),
            eps=self.cfg_float("rms_norm_eps", 1e-5, maximum=MAX_NORM_EPS), rope_base=self.rope_theta(),
            interleaved=self.cfg_bool("rope_interleave", True), tied=self.cfg_bool("tie_word_embeddings", False),
        )

    def rope_theta(self) -> float:
        """rope_theta of the default rope over the whole rope part (only that is supported)."""
        params = self.config.get("rope_parameters")
        values = params if params is not None else self.config
        scaling = params if params is not None else self.config.get("rope_scaling")
        kind = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
        if kind != "default":
            raise UnsupportedModelError(f"rope type {shown(kind)} is not supported (only the default rope)",
                                        self.config_path)
        factor = values.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise UnsupportedModelError(f"partial_rotary_factor={shown(factor)} is not supported (GLM-4.7-Flash "
                                        "rotates all of qk_rope_head_dim)", self.config_path)
        theta = values.get("rope_theta", 10000.0)
        if not is_number(theta) or not 0 < theta <= FLOAT32_MAX:
            raise self.bad(f"'rope_theta' must be a positive number, got {shown(theta)}")
        return float(theta)

    def moe_hparams(self, base):
        hp = super().moe_hparams(base)
        if hp.n_nextn > 1:  # llama.cpp's deepseek2 MTP graph asserts a single block
            raise UnsupportedModelError(f"num_nextn_predict_layers={hp.n_nextn} is not supported (llama.cpp's "
                                        "deepseek2 runs one MTP layer)", self.config_path)
        if hp.n_nextn and not base.q_lora:
            raise UnsupportedModelError("MTP layers without q_lora_rank are not supported (llama.cpp's deepseek2 "
                                        "MTP graph needs attn_q_a)", self.config_path)
        return hp

    # -- GGUF -----------------------------------------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        write_mla_metadata(w, self.hp, self.n_block, self.hp.qk_dim)
        self.write_moe_metadata(w)

    def block_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        qk_rows, rope_rows = self.q_rows(), self.kv_a_rows()
        plan = self.out(T.ATTN_NORM, bid, (hp.n_embd,))
        if hp.q_lora:
            plan += self.out(T.ATTN_Q_A, bid, (hp.q_lora, hp.n_embd), ATTN + "q_a_proj")
            plan += self.out(T.ATTN_Q_A_NORM, bid, (hp.q_lora,), ATTN + "q_a_layernorm")
            plan.append(self.rows(T.ATTN_Q_B, bid, (hp.n_head * hp.qk_dim, hp.q_lora), ATTN + "q_b_proj", qk_rows))
        else:
            plan.append(self.rows(T.ATTN_Q, bid, (hp.n_head * hp.qk_dim, hp.n_embd), ATTN + "q_proj", qk_rows))
        plan.append(self.rows(T.ATTN_KV_A_MQA, bid, (hp.kv_lora + hp.rope, hp.n_embd), ATTN + "kv_a_proj_with_mqa",
                              rope_rows))
        plan += self.out(T.ATTN_KV_A_NORM, bid, (hp.kv_lora,), ATTN + "kv_a_layernorm")
        kv_b = (f"{ATTN.format(bid=bid)}kv_b_proj.weight",)
        plan.append(OutTensor(f"{gguf.TENSOR_NAMES[T.ATTN_K_B].format(bid=bid)}.weight",
                              (hp.n_head, hp.kv_lora, hp.nope), kv_b, self.k_b))
        plan.append(OutTensor(f"{gguf.TENSOR_NAMES[T.ATTN_V_B].format(bid=bid)}.weight",
                              (hp.n_head, hp.v_dim, hp.kv_lora), kv_b, self.v_b))
        plan += self.out(T.ATTN_OUT, bid, (hp.n_embd, hp.n_head * hp.v_dim), ATTN + "o_proj")
        return plan + self.out(T.FFN_NORM, bid, (hp.n_embd,), HF_LAYER + "post_attention_layernorm")

    # -- layout changes -------------------------------------------------------------------------------------------
    def q_rows(self) -> np.ndarray | None:
        """Row order of q: each head's rope rows in consecutive pairs (None: unchanged)."""
        hp = self.hp
        if hp.interleaved:
            return None
        head = np.concatenate([np.arange(hp.nope), hp.nope + _pairs(hp.rope)])
        return (np.arange(hp.n_head)[:, None] * hp.qk_dim + head[None, :]).reshape(-1)

    def kv_a_rows(self) -> np.ndarray | None:
        hp = self.hp
        return None if hp.interleaved else np.concatenate([np.arange(hp.kv_lora), hp.kv_lora + _pairs(hp.rope)])

    def rows(self, kind: T, bid: int, shape: tuple[int, ...], source: str, order: np.ndarray | None) -> OutTensor:
        tensor = self.out(kind, bid, shape, source)[0]
        if order is not None:
            tensor.build = lambda arrays: arrays[0][order]
        return tensor

    def _kv_b(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        hp = self.hp
        return arrays[0].reshape(hp.n_head, hp.nope + hp.v_dim, hp.kv_lora)  # (head, k_nope rows | v rows, latent)

    def k_b(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(self._kv_b(arrays)[:, :self.hp.nope, :].transpose(0, 2, 1))

    def v_b(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(self._kv_b(arrays)[:, self.hp.nope:, :])

    def check_shapes(self, plan: list[OutTensor]) -> None:
        """Beyond the copies and stacked experts: reordered q/kv_a rows, and kv_b_proj (split into k_b and v_b)."""
        super().check_shapes(plan)
        hp = self.hp
        for t in plan:
            if t.build in (self.k_b, self.v_b):
                check_shape(self, t.sources[0], (hp.n_head * (hp.nope + hp.v_dim), hp.kv_lora))
            elif len(t.sources) == 1 and not t.is_copy:
                check_shape(self, t.sources[0], t.shape)

CONVERTER = Glm4MoeLite

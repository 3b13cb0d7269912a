"""The converter of ``GlmMoeDsaForCausalLM`` (GLM-5, 5.1, 5.2, 5.3): llama.cpp's ``glm-dsa`` architecture.

Per layer (transformers' modeling_glm_moe_dsa.py): RMSNorm → multi-head latent attention → residual → RMSNorm
(``post_attention_layernorm``, llama.cpp's ``ffn_norm``) → MLP → residual.

- Attention: q = q_b(RMSNorm(q_a(x))); the latent kv = RMSNorm(kv_a(x)[:kv_lora_rank]) and one shared rope key
  kv_a(x)[kv_lora_rank:]; ``kv_b_proj`` expands the latent into per-head nope keys and values. llama.cpp stores it
  the DeepSeek-2 way, as MQA over the latent (``head_count_kv`` 1, ``key_length`` kv_lora_rank + rope dims,
  ``value_length`` kv_lora_rank) with ``kv_b_proj`` split into ``attn_k_b`` (transposed: absorbed into q) and
  ``attn_v_b``. The rope dims rotate in interleaved pairs (llama.cpp rope type NORM), so nothing is permuted.
- Lightning indexer (DeepSeek sparse attention) on the layers ``indexer_types`` marks "full": its own q (from the
  q latent), one key (LayerNorm with bias), per-head weights; ReLU scores pick ``index_topk`` keys per query.
  "shared" layers have no indexer and reuse the previous full layer's pick (llama.cpp asserts the first is full).
- MLP: the first ``first_k_dense_replace`` layers (``mlp_layer_types`` "dense") a SwiGLU; the others GLM-4.5's
  mixture of experts (sigmoid router with score-correction bias, ``routed_scaling_factor``, shared experts).
  Sigmoid gating is written because the family is sigmoid-routed, not read from an optional ``scoring_func``.

The ``num_nextn_predict_layers`` MTP layers after the trunk are kept (for speculative decoding) as ``blk.{L}``:
the full decoder layer plus ``nextn.eh_proj``, ``enorm``, ``hnorm``, ``shared_head_norm`` (and ``embed_tokens`` /
``shared_head_head`` when the checkpoint has them), with ``block_count`` L + n and ``nextn_predict_layers`` n.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import gguf
import numpy as np

from chatglm.convert.config_types import shown
from chatglm.convert.family import OutTensor, check_shape
from chatglm.convert.hf_layout import HF_LAYER, HFGlmFamily, template_format
from chatglm.convert.nextn import nextn_tensors, write_nextn
from chatglm.errors import UnsupportedModelError
from chatglm.families import glm4_moe
from chatglm.families.glm4_moe.convert import Glm4Moe, MoeHparams, write_expert_metadata
from chatglm.families.glm4_moe_lite.convert import write_mla_metadata
from chatglm.families.glm_moe_dsa import FAMILY

T = gguf.MODEL_TENSOR
ATTN = HF_LAYER + "self_attn."
INDEXER = ATTN + "indexer."
INDEXER_TYPES = ("full", "shared")
INDEXER_TYPES_KEY = "{arch}.attention.indexer.types"  # llama-arch.cpp LLM_KV_ATTENTION_INDEXER_TYPES


@dataclass(frozen=True)
class DsaHparams:
    moe: MoeHparams
    n_layer: int  # GGUF blocks: the trunk and the MTP layers (block_count)
    n_trunk: int  # num_hidden_layers
    q_lora: int
    kv_lora: int
    nope: int
    rope: int
    v_dim: int
    index_heads: int
    index_dim: int
    index_topk: int
    index_full: tuple[bool, ...]  # per trunk layer: runs its own indexer

    n_head_kv = 1  # MLA as llama.cpp stores it: MQA over the latent

    def __getattr__(self, name: str):  # n_embd, n_head, n_expert, ... come from the MoE hyperparameters
        return getattr(self.moe, name)


def split_kv_b(n_head: int, nope: int, v_dim: int, part: str):
    """kv_b_proj (n_head x (nope + v), kv_lora) → attn_k_b (n_head, kv_lora, nope), attn_v_b (n_head, v, kv_lora)."""
    def build(arrays: Sequence[np.ndarray]) -> np.ndarray:
        kv = arrays[0].reshape(n_head, nope + v_dim, -1)
        return np.ascontiguousarray(kv[:, :nope, :].transpose(0, 2, 1) if part == "k" else kv[:, nope:, :])
    build.__qualname__ = f"split_kv_b_{part}"
    return build


class GlmMoeDsa(Glm4Moe):
    name = FAMILY.variants[0]
    arch = FAMILY.arch

    def __init__(self, ckpt):
        HFGlmFamily.__init__(self, ckpt)
        self.hp = self.dsa_hparams(self.moe_hparams(self.hp))
        self.check_expert_tensors()

    @property
    def n_block(self) -> int:
        return self.hp.n_layer  # DsaHparams.n_layer already counts the MTP layers

    def detect_chat_format(self, template: str) -> str:
        return template_format(template, glm4_moe.FAMILY.chat_formats[1])  # no template: GLM-4.7's format

    # -- config ---------------------------------------------------------------------------------------------------
    def dense_layers(self, n_layer: int) -> int:
        return self.leading_dense(n_layer, default=3)  # transformers' GlmMoeDsaConfig default

    def indexer_full(self, n_layer: int) -> tuple[bool, ...]:
        """Which layers run the indexer: ``indexer_types``, else ``index_topk_pattern`` ("F"/"S"), else the
        ``index_topk_freq`` / ``index_skip_topk_offset`` schedule (all full by default), as transformers reads them."""
        types = self.config.get("indexer_types")
        key = "indexer_types"
        if types is None and self.config.get("index_topk_pattern") is not None:
            pattern, key = self.config["index_topk_pattern"], "index_topk_pattern"
            letters = {"F": "full", "S": "shared"}
            types = [letters.get(c, c) for c in pattern] if isinstance(pattern, str) else pattern
        if types is None:
            freq = self.cfg_int("index_topk_freq", default=1)
            offset = self.cfg_int("index_skip_topk_offset", default=2, minimum=0)
            key = "index_topk_freq / index_skip_topk_offset"
            types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(n_layer)]
        if not isinstance(types, list) or len(types) != n_layer or not all(t in INDEXER_TYPES for t in types):
            raise self.bad(f"{key!r} must give 'full' or 'shared' for each of the {n_layer} layers, got "
                           f"{shown(types)}")
        if types[0] != "full":  # llama.cpp: GGML_ASSERT(prev_top_k != nullptr) on a shared first layer
            raise self.bad(f"{key!r} starts with a 'shared' layer; the first layer must run the indexer ('full')")
        return tuple(t == "full" for t in types)

    def dsa_hparams(self, moe: MoeHparams) -> DsaHparams:
        q_lora = self.config.get("q_lora_rank")
        if q_lora is None:
            raise UnsupportedModelError("q_lora_rank is null: glm-dsa needs the low-rank query (its indexer reads "
                                        "the q latent)", self.config_path)
        rope_params = self.config.get("rope_parameters") or {}
        factor = rope_params.get("partial_rotary_factor", self.config.get("partial_rotary_factor", 1.0))
        if factor != 1.0:
            raise UnsupportedModelError(f"partial_rotary_factor={shown(factor)} is not supported (GLM-5 rotates all "
                                        "qk_rope_head_dim dims)", self.config_path)
        hp = DsaHparams(
            moe=moe, n_layer=moe.n_layer + moe.n_nextn, n_trunk=moe.n_layer,
            q_lora=self.cfg_int("q_lora_rank"), kv_lora=self.cfg_int("kv_lora_rank"),
            nope=self.cfg_int("qk_nope_head_dim"), rope=self.cfg_int("qk_rope_head_dim"),
            v_dim=self.cfg_int("v_head_dim"), index_heads=self.cfg_int("index_n_heads"),
            index_dim=self.cfg_int("index_head_dim"), index_topk=self.cfg_int("index_topk"),
            index_full=self.indexer_full(moe.n_layer),
        )
        if hp.rope % 2:
            raise self.bad(f"'qk_rope_head_dim' must be even (rope rotates pairs), got {hp.rope}")
        if hp.rope > hp.index_dim:  # llama.cpp: GGML_ASSERT(n_rot <= n_embd_indexer_head)
            raise self.bad(f"'index_head_dim' ({hp.index_dim}) is smaller than qk_rope_head_dim ({hp.rope}); the "
                           "indexer's heads hold the rope dims first")
        if hp.index_dim < 64 or hp.index_dim & (hp.index_dim - 1):
            # llama.cpp rotates indexer q and k with a Hadamard matrix of the largest power of two (>= 64) dividing
            # index_head_dim and GGML_ASSERTs when that is not index_head_dim itself.
            raise self.bad(f"'index_head_dim' must be a power of two, at least 64 (llama.cpp's Hadamard rotation "
                           f"of the indexer), got {hp.index_dim}")
        self.check_rows("kv_lora_rank + qk_rope_head_dim", hp.kv_lora + hp.rope,
                        ATTN.format(bid=0) + "kv_a_proj_with_mqa.weight", 0, "rows")
        return hp

    # -- GGUF -----------------------------------------------------------------------------------------------------
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        hp = self.hp
        write_mla_metadata(w, hp, hp.n_layer, hp.nope + hp.rope)  # GLM-4.7-Flash's latent attention
        write_expert_metadata(w, hp)
        w.add_indexer_head_count(hp.index_heads)
        w.add_indexer_key_length(hp.index_dim)
        w.add_indexer_top_k(hp.index_topk)
        # written always: without it llama.cpp guesses the pattern from the context length
        w.add_array(INDEXER_TYPES_KEY.format(arch=self.arch), list(hp.index_full))
        write_nextn(w, hp.n_nextn)

    def tensors(self) -> list[OutTensor]:
        hp = self.hp
        plan = self.embedding_tensors()
        names = set(self.ckpt.names())
        for bid in range(hp.n_layer):
            mtp = bid >= hp.n_trunk
            indexer = (f"{INDEXER.format(bid=bid)}wk.weight" in names) if mtp else hp.index_full[bid]
            plan += self.mla_tensors(bid, indexer)
            plan += self.out(T.FFN_NORM, bid, (hp.n_embd,), HF_LAYER + "post_attention_layernorm")
            plan += self.dense_tensors(bid) if bid < hp.n_dense else self.expert_tensors(bid)
            if mtp:
                plan += nextn_tensors(self, bid, hp.n_embd, hp.n_vocab)
        return plan + self.head_tensors()

    def mla_tensors(self, bid: int, indexer: bool) -> list[OutTensor]:
        hp = self.hp
        e, heads, kv_b = hp.n_embd, hp.n_head, f"{ATTN.format(bid=bid)}kv_b_proj.weight"
        plan = self.out(T.ATTN_NORM, bid, (e,))
        plan += self.out(T.ATTN_Q_A, bid, (hp.q_lora, e), ATTN + "q_a_proj")
        plan += self.out(T.ATTN_Q_A_NORM, bid, (hp.q_lora,), ATTN + "q_a_layernorm")
        plan += self.out(T.ATTN_Q_B, bid, (heads * (hp.nope + hp.rope), hp.q_lora), ATTN + "q_b_proj")
        plan += self.out(T.ATTN_KV_A_MQA, bid, (hp.kv_lora + hp.rope, e), ATTN + "kv_a_proj_with_mqa")
        plan += self.out(T.ATTN_KV_A_NORM, bid, (hp.kv_lora,), ATTN + "kv_a_layernorm")
        for kind, part, shape in ((T.ATTN_K_B, "k", (heads, hp.kv_lora, hp.nope)),
                                  (T.ATTN_V_B, "v", (heads, hp.v_dim, hp.kv_lora))):
            plan.append(OutTensor(f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.weight", shape, (kv_b,),
                                  split_kv_b(heads, hp.nope, hp.v_dim, part)))
        plan += self.out(T.ATTN_OUT, bid, (e, heads * hp.v_dim), ATTN + "o_proj")
        if indexer:
            plan += self.out(T.INDEXER_K_NORM, bid, (hp.index_dim,), INDEXER + "k_norm", bias=True)
            plan += self.out(T.INDEXER_PROJ, bid, (hp.index_heads, e), INDEXER + "weights_proj")
            plan += self.out(T.INDEXER_ATTN_K, bid, (hp.index_dim, e), INDEXER + "wk")
            plan += self.out(T.INDEXER_ATTN_Q_B, bid, (hp.index_heads * hp.index_dim, hp.q_lora), INDEXER + "wq_b")
        return plan

    def check_shapes(self, plan: list[OutTensor]) -> None:
        super().check_shapes(plan)
        hp = self.hp
        for bid in range(hp.n_layer):
            check_shape(self, f"{ATTN.format(bid=bid)}kv_b_proj.weight",
                        (hp.n_head * (hp.nope + hp.v_dim), hp.kv_lora))


CONVERTER = GlmMoeDsa

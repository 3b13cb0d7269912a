"""Every tensor llama.cpp's loaders create for the GLM architectures, with the shape its hyperparameters give.

Read from ``load_arch_tensors`` of src/models/chatglm.cpp, glm4.cpp, glm4-moe.cpp, deepseek2.cpp, glm-dsa.cpp and
glm5-next.cpp and ``create_tensor_qkv`` in llama-model.cpp (llama-cpp-python 0.3.36). Shapes are in ggml order (ne[0], the row
length, first). The table is built per layer, so its size is O(block_count) with block_count already bounded by
LLAMA_MAX_LAYERS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Collection

import gguf

from chatglm.schema.llama_names import ARCH_GLM5_NEXT

if TYPE_CHECKING:
    from chatglm.runtime.validate import HParams

Shape = tuple[int, ...]
Spec = dict[str, tuple[Shape, bool]]  # name -> (shape, required)


def _qkv(hp: "HParams", p: str, names: Collection[str], required: bool) -> Spec:
    """create_tensor_qkv: a fused attn_qkv (optional bias) or separate q, k, v (optional biases)."""
    e, q, k, v = hp.n_embd, hp.head_k * hp.n_head, hp.head_k * hp.n_head_kv, hp.head_v * hp.n_head_kv
    split = {f"{p}attn_{n}.bias": ((d,), False) for n, d in (("q", q), ("k", k), ("v", v))}
    fused = {f"{p}attn_qkv.weight": ((e, q + k + v), required), f"{p}attn_qkv.bias": ((q + k + v,), False)}
    if f"{p}attn_qkv.weight" in names:
        return {**fused, **split}
    if not required:  # a skipped (NextN) layer: any of the forms may be there, none must
        return {**fused, **split, **{f"{p}attn_{n}.weight": ((e, d), False) for n, d in (("q", q), ("k", k), ("v", v))}}
    return {**split, **{f"{p}attn_{n}.weight": ((e, d), True) for n, d in (("q", q), ("k", k), ("v", v))}}


def _nextn(hp: "HParams", p: str, required: bool) -> Spec:
    e, v = hp.n_embd, hp.n_vocab
    return {f"{p}nextn.eh_proj.weight": ((2 * e, e), required), f"{p}nextn.enorm.weight": ((e,), required),
            f"{p}nextn.hnorm.weight": ((e,), required), f"{p}nextn.embed_tokens.weight": ((e, v), False),
            f"{p}nextn.shared_head_head.weight": ((e, v), False), f"{p}nextn.shared_head_norm.weight": ((e,), False)}


def _chatglm_layer(hp: "HParams", il: int, names: Collection[str]) -> Spec:
    p, e, ff = f"blk.{il}.", hp.n_embd, hp.n_ff
    return {f"{p}attn_norm.weight": ((e,), True), **_qkv(hp, p, names, True),
            f"{p}attn_output.weight": ((e, e), True), f"{p}ffn_norm.weight": ((e,), True),
            f"{p}ffn_up.weight": ((e, 2 * ff), True), f"{p}ffn_down.weight": ((ff, e), True)}


def _llama_layer(hp: "HParams", il: int, names: Collection[str]) -> Spec:
    """src/llama-model.cpp LLM_ARCH_LLAMA (GLM-ASR's language model): q/k/v (optional biases), SwiGLU."""
    p, e, ff = f"blk.{il}.", hp.n_embd, hp.n_ff
    return {f"{p}attn_norm.weight": ((e,), True), **_qkv(hp, p, names, True),
            f"{p}attn_output.weight": ((hp.head_k * hp.n_head, e), True), f"{p}attn_output.bias": ((e,), False),
            f"{p}ffn_norm.weight": ((e,), True), f"{p}ffn_gate.weight": ((e, ff), True),
            f"{p}ffn_down.weight": ((ff, e), True), f"{p}ffn_up.weight": ((e, ff), True)}


def _glm4_layer(hp: "HParams", il: int, names: Collection[str]) -> Spec:
    # NextN layers are TENSOR_SKIP: their tensors are still required (attention may take any form)
    p, e, ff = f"blk.{il}.", hp.n_embd, hp.n_ff
    spec = {f"{p}attn_norm.weight": ((e,), True), **_qkv(hp, p, names, il < hp.n_layer),
            f"{p}attn_output.weight": ((hp.head_k * hp.n_head, e), True),
            f"{p}post_attention_norm.weight": ((e,), True), f"{p}ffn_norm.weight": ((e,), True),
            f"{p}ffn_down.weight": ((ff, e), True), f"{p}ffn_up.weight": ((e, 2 * ff), True),
            f"{p}post_ffw_norm.weight": ((e,), True)}
    return {**spec, **_nextn(hp, p, True)} if il >= hp.n_layer else spec


def _glm4moe_layer(hp: "HParams", il: int, names: Collection[str]) -> Spec:
    p, e, ff, ne = f"blk.{il}.", hp.n_embd, hp.n_ff, hp.n_expert
    if il < hp.n_layer:  # trunk tensors are optional in an MTP-only file (NextN layers but no blk.0)
        required = not (hp.n_nextn and "blk.0.attn_norm.weight" not in names)
    else:  # MTP tensors are optional in a trunk-only file
        required = f"blk.{hp.n_layer}.nextn.eh_proj.weight" in names
    spec = {f"{p}attn_norm.weight": ((e,), required), **_qkv(hp, p, names, required),
            f"{p}attn_output.weight": ((hp.head_k * hp.n_head, e), required),
            f"{p}attn_q_norm.weight": ((hp.head_k,), False), f"{p}attn_k_norm.weight": ((hp.head_k,), False),
            f"{p}post_attention_norm.weight": ((e,), required)}
    if il >= hp.n_dense_lead:
        fe, fs = hp.n_ff_exp, hp.n_ff_exp * hp.n_expert_shared
        spec.update({f"{p}ffn_gate_inp.weight": ((e, ne), required), f"{p}exp_probs_b.bias": ((ne,), required),
                     f"{p}ffn_gate_exps.weight": ((e, fe, ne), required),
                     f"{p}ffn_down_exps.weight": ((fe, e, ne), required),
                     f"{p}ffn_up_exps.weight": ((e, fe, ne), required)})
        if hp.n_expert_shared:
            spec.update({f"{p}ffn_gate_shexp.weight": ((e, fs), required),
                         f"{p}ffn_down_shexp.weight": ((fs, e), required),
                         f"{p}ffn_up_shexp.weight": ((e, fs), required)})
    else:
        spec.update({f"{p}ffn_gate.weight": ((e, ff), required), f"{p}ffn_down.weight": ((ff, e), required),
                     f"{p}ffn_up.weight": ((e, ff), required)})
    return {**spec, **_nextn(hp, p, required)} if il >= hp.n_layer else spec


def _glm_dsa_layer(hp: "HParams", il: int, names: Collection[str]) -> Spec:
    """src/models/glm-dsa.cpp: MLA (q and kv latents, k_b/v_b split), the DSA indexer (llama.cpp marks it optional;
    a full trunk layer without it would multiply by a null tensor, so it is required there), GLM-4.5's experts."""
    mla, p, e, ff, ne = hp.mla, f"blk.{il}.", hp.n_embd, hp.n_ff, hp.n_expert
    if il < hp.n_layer:  # as glm4moe: trunk optional in an MTP-only file, MTP optional in a trunk-only one
        required = not (hp.n_nextn and "blk.0.attn_norm.weight" not in names)
    else:
        required = f"blk.{hp.n_layer}.nextn.eh_proj.weight" in names
    nope, h, d, q = mla.head_k_mla - mla.n_rot, hp.n_head, mla.index_dim, mla.q_lora
    spec = {f"{p}attn_norm.weight": ((e,), required), f"{p}attn_q_a_norm.weight": ((q,), required),
            f"{p}attn_kv_a_norm.weight": ((mla.kv_lora,), required), f"{p}attn_q_a.weight": ((e, q), required),
            f"{p}attn_q_b.weight": ((q, h * mla.head_k_mla), required),
            f"{p}attn_kv_a_mqa.weight": ((e, mla.kv_lora + mla.n_rot), required),
            f"{p}attn_k_b.weight": ((nope, mla.kv_lora, h), required),
            f"{p}attn_v_b.weight": ((mla.kv_lora, mla.head_v_mla, h), required),
            f"{p}attn_output.weight": ((h * mla.head_v_mla, e), required), f"{p}ffn_norm.weight": ((e,), required)}
    indexer = required and il < hp.n_layer and mla.index_full[il]
    spec.update({f"{p}indexer.k_norm.weight": ((d,), False), f"{p}indexer.k_norm.bias": ((d,), False),
                 f"{p}indexer.proj.weight": ((e, mla.index_heads), indexer),
                 f"{p}indexer.attn_k.weight": ((e, d), indexer),
                 f"{p}indexer.attn_q_b.weight": ((q, mla.index_heads * d), indexer)})
    if il >= hp.n_dense_lead:
        fe, fs = hp.n_ff_exp, hp.n_ff_exp * hp.n_expert_shared
        spec.update({f"{p}ffn_gate_inp.weight": ((e, ne), required), f"{p}exp_probs_b.bias": ((ne,), False),
                     f"{p}ffn_gate_exps.weight": ((e, fe, ne), required),
                     f"{p}ffn_down_exps.weight": ((fe, e, ne), required),
                     f"{p}ffn_up_exps.weight": ((e, fe, ne), required),
                     f"{p}ffn_gate_shexp.weight": ((e, fs), required), f"{p}ffn_down_shexp.weight": ((fs, e), required),
                     f"{p}ffn_up_shexp.weight": ((e, fs), required)})
    else:
        spec.update({f"{p}ffn_gate.weight": ((e, ff), required), f"{p}ffn_down.weight": ((ff, e), required),
                     f"{p}ffn_up.weight": ((e, ff), required)})
    return {**spec, **_nextn(hp, p, required)} if il >= hp.n_layer else spec


def _deepseek2_layer(hp: "HParams", il: int, names: Collection[str]) -> Spec:
    """deepseek2.cpp with MLA (key_length_mla/value_length_mla set): q through a LoRA pair (or attn_q when
    q_lora_rank is 0), the compressed kv_a_mqa, kv_b split per head into k_b and v_b. Its FFN and NextN tensors
    are glm4moe's, with the same trunk-only / MTP-only rules."""
    mla, p, e, h = hp.mla, f"blk.{il}.", hp.n_embd, hp.n_head
    if il < hp.n_layer:
        required = not (hp.n_nextn and "blk.0.attn_norm.weight" not in names)
    else:
        required = f"blk.{hp.n_layer}.nextn.eh_proj.weight" in names
    nope, kv, q_rows = mla.head_k_mla - mla.n_rot, mla.kv_lora, h * mla.head_k_mla
    spec: Spec = {f"{p}attn_norm.weight": ((e,), required), f"{p}attn_kv_a_norm.weight": ((kv,), required)}
    if mla.q_lora:
        spec.update({f"{p}attn_q_a_norm.weight": ((mla.q_lora,), required),
                     f"{p}attn_q_a.weight": ((e, mla.q_lora), required),
                     f"{p}attn_q_b.weight": ((mla.q_lora, q_rows), required)})
    else:
        spec[f"{p}attn_q.weight"] = ((e, q_rows), required)
    spec.update({f"{p}attn_kv_a_mqa.weight": ((e, kv + mla.n_rot), required),
                 f"{p}attn_k_b.weight": ((nope, kv, h), required),
                 f"{p}attn_v_b.weight": ((kv, mla.head_v_mla, h), required),
                 f"{p}attn_output.weight": ((h * mla.head_v_mla, e), required), f"{p}ffn_norm.weight": ((e,), required)})
    moe = _glm4moe_layer(hp, il, names)
    spec.update({k: v for k, v in moe.items() if any(part in k for part in _DEEPSEEK2_FROM_GLM4MOE)})
    return spec


_DEEPSEEK2_FROM_GLM4MOE = (".ffn_gate", ".ffn_up", ".ffn_down", ".exp_probs_b.", ".nextn.")
def _glm5next_layer(hp: "HParams", il: int, names: Collection[str]) -> Spec:
    """src/models/glm5-next.cpp: hyper-connections (trunk only), then a linear (KDA) or a nope-only latent layer
    with its k-pool indexer (shared layers hold none; the NextN block always has one), then dense or expert MLP."""
    p, e, h, trunk = f"blk.{il}.", hp.n_embd, hp.n_head, il < hp.n_layer
    spec: Spec = {f"{p}attn_norm.weight": ((e,), True), f"{p}ffn_norm.weight": ((e,), True)}
    if trunk:
        mix = (2 + hp.hc_mult) * hp.hc_mult
        for part in ("attn", "ffn"):
            spec.update({f"{p}hc_{part}_fn.weight": ((hp.hc_mult * e, mix), True),
                         f"{p}hc_{part}_base.weight": ((mix,), True), f"{p}hc_{part}_scale.weight": ((3,), True)})
    inner, d = hp.kda_dim * h, hp.kda_dim
    if trunk and hp.recurrent[il]:
        for x in "qkv":
            # 4-D, as llama.cpp's converter writes it (its loader also takes a 3-D one, which we do not write)
            spec[f"{p}ssm_conv1d_{x}.weight"] = ((hp.d_conv, 1, inner, 1), True)
            spec[f"{p}attn_{x}.weight"] = ((e, inner), True)
            spec[f"{p}attn_{x}.bias"] = ((inner,), False)
        spec.update({f"{p}ssm_f_a.weight": ((e, d), True), f"{p}ssm_f_b.weight": ((d, inner), True),
                     f"{p}ssm_beta.weight": ((e, h), True), f"{p}ssm_a": ((h,), True),
                     f"{p}ssm_dt.bias": ((inner,), True), f"{p}ssm_g_a.weight": ((e, d), True),
                     f"{p}ssm_g_b.weight": ((d, inner), True), f"{p}ssm_norm.weight": ((d,), True),
                     f"{p}attn_output.weight": ((inner, e), True)})
    else:
        ql, kl, nope, v = hp.mla.q_lora, hp.mla.kv_lora, hp.mla.head_k_mla, hp.mla.head_v_mla
        spec.update({f"{p}attn_q_a_norm.weight": ((ql,), True), f"{p}attn_kv_a_norm.weight": ((kl,), True),
                     f"{p}attn_q_a.weight": ((e, ql), True), f"{p}attn_q_b.weight": ((ql, h * nope), True),
                     f"{p}attn_kv_a_mqa.weight": ((e, kl), True), f"{p}attn_k_b.weight": ((nope, kl, h), True),
                     f"{p}attn_v_b.weight": ((kl, v, h), True), f"{p}attn_output.weight": ((h * v, e), True)})
        full = not trunk or hp.mla.index_full[il]
        di, hi = hp.mla.index_dim, hp.mla.index_heads
        spec.update({f"{p}indexer.k_norm.weight": ((di,), full), f"{p}indexer.k_norm.bias": ((di,), full),
                     f"{p}indexer.proj.weight": ((e, hi), full), f"{p}indexer.attn_k.weight": ((e, di), full),
                     f"{p}indexer.attn_q_b.weight": ((ql, hi * di), full),
                     f"{p}indexer_compressor_gate.weight": ((e, di), full),
                     f"{p}indexer_compressor_ape.weight": ((di, hp.kpool), full)})
    if il < hp.n_dense_lead:
        spec.update({f"{p}ffn_gate.weight": ((e, hp.n_ff), True), f"{p}ffn_down.weight": ((hp.n_ff, e), True),
                     f"{p}ffn_up.weight": ((e, hp.n_ff), True)})
    else:
        ne, fe, fs = hp.n_expert, hp.n_ff_exp, hp.n_ff_exp * hp.n_expert_shared
        spec.update({f"{p}ffn_gate_inp.weight": ((e, ne), True), f"{p}exp_probs_b.bias": ((ne,), True),
                     f"{p}ffn_gate_exps.weight": ((e, fe, ne), True), f"{p}ffn_down_exps.weight": ((fe, e, ne), True),
                     f"{p}ffn_up_exps.weight": ((e, fe, ne), True), f"{p}ffn_gate_shexp.weight": ((e, fs), True),
                     f"{p}ffn_down_shexp.weight": ((fs, e), True), f"{p}ffn_up_shexp.weight": ((e, fs), True)})
    return spec if trunk else {**spec, **_nextn(hp, p, True)}


@dataclass(frozen=True)
class LlamaArch:
    """What llama.cpp's loader of one of its architectures builds and requires (llama.cpp's facts, keyed by its own
    architecture names from gguf-py; which of our families writes which architecture is their descriptors' business)."""

    layer: Callable[["HParams", int, Collection[str]], Spec]  # the tensors of block ``il``
    square_attention: bool = False  # attn_output is n_embd x n_embd: head_count x key_length must be n_embd
    experts: bool = False  # expert layers required (others must have none)
    reads_nextn: bool = True  # NextN (MTP) blocks after the trunk are loaded
    mla: bool = False  # multi-head latent attention stored as MQA: the MLA keys are read, key and value lengths differ
    indexer: bool = False  # DeepSeek sparse attention's lightning indexer (glm-dsa)
    mtp_expert_block: bool = False  # its MTP graph asserts one NextN block with an expert FFN (glm4moe, deepseek2)


_ARCH = gguf.MODEL_ARCH_NAMES
GLM5_NEXT = ARCH_GLM5_NEXT
LLAMA_ARCHS: dict[str, LlamaArch] = {
    _ARCH[gguf.MODEL_ARCH.CHATGLM]: LlamaArch(_chatglm_layer, square_attention=True, reads_nextn=False),
    _ARCH[gguf.MODEL_ARCH.GLM4]: LlamaArch(_glm4_layer),
    _ARCH[gguf.MODEL_ARCH.GLM4_MOE]: LlamaArch(_glm4moe_layer, experts=True, mtp_expert_block=True),
    _ARCH[gguf.MODEL_ARCH.DEEPSEEK2]: LlamaArch(_deepseek2_layer, experts=True, mla=True, mtp_expert_block=True),
    _ARCH[gguf.MODEL_ARCH.GLM_DSA]: LlamaArch(_glm_dsa_layer, experts=True, mla=True, indexer=True),
    GLM5_NEXT: LlamaArch(_glm5next_layer, experts=True),
    _ARCH[gguf.MODEL_ARCH.LLAMA]: LlamaArch(_llama_layer, reads_nextn=False),
}


def expected_tensors(hp: "HParams", names: Collection[str]) -> Spec:
    """name -> (shape, required) for every tensor the arch's loader may create; ``names`` are the file's tensors
    (the loader picks the fused or separate attention form, and MTP-only or trunk-only files, by what is there)."""
    e, v = hp.n_embd, hp.n_vocab
    spec: Spec = {"token_embd.weight": ((e, v), True), "output_norm.weight": ((e,), True),
                  "output.weight": ((e, v), False)}
    arch = LLAMA_ARCHS[hp.arch]
    layer = arch.layer
    n_layers = hp.n_layer_all if arch.reads_nextn else hp.n_layer  # chatglm's loader reads no NextN layers
    for il in range(n_layers):
        spec.update(layer(hp, il, names))
    return spec

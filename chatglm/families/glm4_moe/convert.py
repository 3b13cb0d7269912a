"""The converter of ``Glm4MoeForCausalLM`` (GLM-4.5, GLM-4.5-Air, GLM-4.6): llama.cpp's ``glm4moe`` architecture.

Per layer (transformers' modeling_glm4_moe.py): RMSNorm → attention (split q/k/v with bias, optional per-head q/k
RMSNorm, rotate-half rope over the first ``partial_rotary_factor`` of each head: llama.cpp rope type NEOX) → residual
→ RMSNorm (``post_attention_layernorm``) → MLP → residual. The first ``first_k_dense_replace`` layers have a dense
SwiGLU MLP (separate gate/up/down); the others a mixture of experts: a sigmoid router with a score-correction bias
used only to pick the top-k experts, the picked scores (renormalised if ``norm_topk_prob``) times
``routed_scaling_factor``, plus one always-on shared expert. Experts are stored one tensor each and stacked here into
llama.cpp's 3-D ``ffn_*_exps`` (expert, rows, cols).

Checkpoints carry ``num_nextn_predict_layers`` extra layers after the last one (multi-token prediction, used only for
speculative decoding). They are kept as llama.cpp keeps them (``chatglm/convert/nextn.py``): blocks L.. with their
``nextn.*`` tensors, ``block_count`` = L + n, ``nextn_predict_layers`` = n; the trunk's logits do not change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

from chatglm.convert.family import OutTensor, check_shape, stack_experts
from chatglm.convert.glm_hparams import write_hparams
from chatglm.convert.hf_layout import HF_LAYER, HFGlmFamily, HFHparams, template_format
from chatglm.convert.nextn import NEXTN_KEY, nextn_count, nextn_tensors, write_nextn
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.glm4_moe import FAMILY
from chatglm.limits import MAX_EXPERTS

T = gguf.MODEL_TENSOR
MLP = HF_LAYER + "mlp."


@dataclass(frozen=True)
class MoeHparams:
    base: HFHparams
    n_expert: int
    n_expert_used: int
    n_expert_shared: int
    n_ff_exp: int
    n_dense: int
    n_nextn: int
    scale: float
    norm_topk: bool
    qk_norm: bool

    def __getattr__(self, name: str):  # n_layer, n_head, ... come from the shared HF hyperparameters
        return getattr(self.base, name)



def write_expert_metadata(w: gguf.GGUFWriter, hp) -> None:
    """GLM-4.5's mixture of experts as llama.cpp reads it (glm4moe, deepseek2, glm-dsa, glm5-next alike): counts,
    leading dense layers, sigmoid routing (always written: llama.cpp's default is softmax for some archs), scaling."""
    w.add_expert_count(hp.n_expert)
    w.add_expert_used_count(hp.n_expert_used)
    w.add_expert_shared_count(hp.n_expert_shared)
    w.add_expert_feed_forward_length(hp.n_ff_exp)
    w.add_leading_dense_block_count(hp.n_dense)
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(hp.scale)
    w.add_expert_weights_norm(hp.norm_topk)


class Glm4Moe(HFGlmFamily):
    name = FAMILY.variants[0]
    arch = FAMILY.arch
    default_bias = False

    def __init__(self, ckpt):
        super().__init__(ckpt)
        self.hp = self.moe_hparams(self.hp)
        self.check_expert_tensors()

    def detect_chat_format(self, template: str) -> str:
        return template_format(template, FAMILY.chat_formats[0])

    def trailing_layers(self) -> tuple[int, str]:
        return self.cfg_int(NEXTN_KEY, default=0, minimum=0), NEXTN_KEY

    @property
    def n_block(self) -> int:
        """GGUF blocks: the trunk's layers, then the MTP layers."""
        return self.hp.n_layer + self.hp.n_nextn

    def dense_layers(self, n_layer: int) -> int:
        """How many leading layers have a dense MLP (transformers' default: one)."""
        return self.leading_dense(n_layer, default=1)

    def moe_hparams(self, base: HFHparams) -> MoeHparams:
        n_expert = self.cfg_int("n_routed_experts", maximum=MAX_EXPERTS)
        held = len(self.held_indices(r"model\.layers\.\d+\.mlp\.experts\.(\d+)\."))
        if n_expert > held:
            raise self.bad(f"'n_routed_experts' is {n_expert} but the checkpoint holds {held} experts per layer")
        alias = self.config.get("num_local_experts")
        if alias is not None and alias != n_expert:
            raise self.bad(f"inconsistent expert counts: n_routed_experts={n_expert}, num_local_experts={alias!r}")
        used = self.cfg_int("num_experts_per_tok")
        if used > n_expert:
            raise self.bad(f"inconsistent expert counts: num_experts_per_tok={used} > n_routed_experts={n_expert}")
        n_dense = self.dense_layers(base.n_layer)
        n_nextn = nextn_count(self, base.n_layer)
        for key in ("n_group", "topk_group"):
            if self.config.get(key, 1) != 1 or type(self.config.get(key, 1)) is not int:
                raise UnsupportedModelError(f"grouped expert routing ({key}={self.config[key]!r}) is not "
                                            "supported (GLM-4.5 uses 1)", self.config_path)
        return MoeHparams(
            base=base, n_expert=n_expert, n_expert_used=used,
            n_expert_shared=self.cfg_int("n_shared_experts", default=1),
            n_ff_exp=self.cfg_int("moe_intermediate_size"), n_dense=n_dense, n_nextn=n_nextn,
            scale=self.cfg_float("routed_scaling_factor", default=1.0),
            norm_topk=self.cfg_bool("norm_topk_prob", True),
            qk_norm=self.cfg_bool("use_qk_norm", False),
        )

    def check_expert_tensors(self) -> None:
        """Each expert layer holds exactly n_routed_experts experts (a clearer error than a list of leftovers)."""
        pattern = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")
        found: dict[int, set[int]] = {}
        for name in self.ckpt.names():
            m = pattern.match(name)
            if m and int(m.group(1)) < self.n_block:
                found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
        for bid, experts in sorted(found.items()):
            if experts != set(range(self.hp.n_expert)):
                raise InputError(f"inconsistent expert counts: layer {bid} has experts {min(experts)}..{max(experts)} "
                                 f"({len(experts)} of them), config.json says n_routed_experts={self.hp.n_expert}",
                                 self.ckpt.dir)

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        write_hparams(w, self.hp, n_rot=self.hp.n_rot, n_block=self.n_block)
        self.write_moe_metadata(w)

    def write_moe_metadata(self, w: gguf.GGUFWriter) -> None:
        """Experts, routing and MTP layers: what llama.cpp's glm4moe and deepseek2 read alike."""
        write_nextn(w, self.hp.n_nextn)
        write_expert_metadata(w, self.hp)

    def tensors(self) -> list[OutTensor]:
        hp = self.hp
        plan = self.embedding_tensors()
        for bid in range(self.n_block):
            plan += self.block_tensors(bid)
            plan += self.dense_tensors(bid) if bid < hp.n_dense else self.expert_tensors(bid)
            if bid >= hp.n_layer:
                plan += nextn_tensors(self, bid, hp.n_embd, hp.n_vocab)
        return plan + self.head_tensors()

    def block_tensors(self, bid: int) -> list[OutTensor]:
        """Attention and the norms around it (the MLP follows)."""
        hp = self.hp
        plan = self.attention_tensors(bid)
        if hp.qk_norm:
            plan += self.out(T.ATTN_Q_NORM, bid, (hp.head_dim,), HF_LAYER + "self_attn.q_norm")
            plan += self.out(T.ATTN_K_NORM, bid, (hp.head_dim,), HF_LAYER + "self_attn.k_norm")
        return plan + self.out(T.ATTN_POST_NORM, bid, (hp.n_embd,), HF_LAYER + "post_attention_layernorm")

    def dense_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        plan = self.out(T.FFN_GATE, bid, (hp.n_ff, hp.n_embd), MLP + "gate_proj")
        plan += self.out(T.FFN_UP, bid, (hp.n_ff, hp.n_embd), MLP + "up_proj")
        return plan + self.out(T.FFN_DOWN, bid, (hp.n_embd, hp.n_ff), MLP + "down_proj")

    def expert_tensors(self, bid: int) -> list[OutTensor]:
        hp = self.hp
        n_sh = hp.n_ff_exp * hp.n_expert_shared
        plan = self.out(T.FFN_GATE_INP, bid, (hp.n_expert, hp.n_embd), MLP + "gate")
        source = f"{MLP.format(bid=bid)}gate.e_score_correction_bias"
        plan.append(OutTensor(f"{gguf.TENSOR_NAMES[T.FFN_EXP_PROBS_B].format(bid=bid)}.bias", (hp.n_expert,),
                              (source,)))
        for kind, proj, shape in ((T.FFN_GATE_EXP, "gate_proj", (hp.n_ff_exp, hp.n_embd)),
                                  (T.FFN_UP_EXP, "up_proj", (hp.n_ff_exp, hp.n_embd)),
                                  (T.FFN_DOWN_EXP, "down_proj", (hp.n_embd, hp.n_ff_exp))):
            sources = tuple(f"{MLP.format(bid=bid)}experts.{x}.{proj}.weight" for x in range(hp.n_expert))
            name = f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.weight"
            plan.append(OutTensor(name, (hp.n_expert, *shape), sources, stack_experts))
        plan += self.out(T.FFN_GATE_SHEXP, bid, (n_sh, hp.n_embd), MLP + "shared_experts.gate_proj")
        plan += self.out(T.FFN_UP_SHEXP, bid, (n_sh, hp.n_embd), MLP + "shared_experts.up_proj")
        return plan + self.out(T.FFN_DOWN_SHEXP, bid, (hp.n_embd, n_sh), MLP + "shared_experts.down_proj")

    def check_shapes(self, plan: list[OutTensor]) -> None:
        super().check_shapes(plan)
        for t in plan:
            if t.build is stack_experts:
                for source in t.sources:
                    check_shape(self, source, t.shape[1:])


CONVERTER = Glm4Moe

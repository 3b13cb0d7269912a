"""The converter of ``Glm4ForCausalLM`` checkpoints (GLM-4-9B/32B-0414, GLM-Z1): llama.cpp's ``glm4`` architecture,
with a norm after attention (``post_self_attn_layernorm``) and after the MLP (``post_mlp_layernorm``). Config,
tokenizer and the shared tensors are :class:`~chatglm.convert.hf_layout.HFGlmFamily`'s.
"""

from __future__ import annotations

import gguf

from chatglm.convert.family import OutTensor
from chatglm.convert.hf_layout import HF_LAYER, HFGlmFamily
from chatglm.convert.ptuning import TransformersPrefix
from chatglm.families.glm4_0414 import FAMILY

T = gguf.MODEL_TENSOR
GLM4_0414, GLM_Z1 = FAMILY.variants  # variants and chat formats have the same names


class Glm4HF(TransformersPrefix, HFGlmFamily):
    """``Glm4ForCausalLM`` (GLM-4-0414, GLM-Z1): llama.cpp ``glm4``, with post-attention and post-MLP norms."""

    name = GLM4_0414
    arch = FAMILY.arch

    def detect_chat_format(self, template: str) -> str:
        """GLM-Z1's template opens the reply with ``<think>``; GLM-4-0414's does not."""
        if "<|assistant|>\n<think>" in template:
            self.name = GLM_Z1
            return GLM_Z1
        return GLM4_0414

    def tensors(self) -> list[OutTensor]:
        hp = self.hp
        plan = self.embedding_tensors()
        for bid in range(hp.n_layer):
            plan += self.attention_tensors(bid)
            plan += self.out(T.ATTN_POST_NORM, bid, (hp.n_embd,), HF_LAYER + "post_self_attn_layernorm")
            plan += self.out(T.FFN_NORM, bid, (hp.n_embd,), HF_LAYER + "post_attention_layernorm")
            plan += self.out(T.FFN_UP, bid, (2 * hp.n_ff, hp.n_embd), HF_LAYER + "mlp.gate_up_proj")
            plan += self.out(T.FFN_DOWN, bid, (hp.n_embd, hp.n_ff), HF_LAYER + "mlp.down_proj")
            plan += self.out(T.FFN_POST_NORM, bid, (hp.n_embd,), HF_LAYER + "post_mlp_layernorm")
        return plan + self.head_tensors()


CONVERTER = Glm4HF

"""The converter of ``GlmForCausalLM`` checkpoints (glm-4-9b-chat-hf, glm-4-9b-hf, GLM-Edge 1.5B/4B chat, GLM-Edge-V
2B/5B): ChatGLM's graph in transformers' names, llama.cpp's ``chatglm`` architecture with split q/k/v. Config,
tokenizer and the shared tensors are :class:`~chatglm.convert.hf_layout.HFGlmFamily`'s. A checkpoint with a
``vision_config`` (GLM-Edge-V) also has its tower written as the projector beside the model (``vision.py``).
"""

from __future__ import annotations

import gguf

from chatglm.convert.family import OutTensor
from chatglm.convert.hf_layout import HF_LAYER, HFGlmFamily
from chatglm.convert.ptuning import TransformersPrefix
from chatglm.errors import UnsupportedModelError
from chatglm.families.glm4 import FAMILY as THUDM_GLM4
from chatglm.families.glm4_hf import FAMILY
from chatglm.families.glm4_hf.vision import IGNORED, GlmEdgeVisionProjector

T = gguf.MODEL_TENSOR
HF_VARIANT, EDGE_VARIANT, EDGE_V_VARIANT = FAMILY.variants
EDGE_FORMAT, EDGE_V_FORMAT = FAMILY.chat_formats
GLM4_FORMAT = THUDM_GLM4.chat_formats[0]  # glm-4-9b-chat-hf keeps the THUDM checkpoint's chat format


class GlmHF(TransformersPrefix, HFGlmFamily):
    """``GlmForCausalLM``: ChatGLM's graph in transformers' names (llama.cpp ``chatglm``)."""

    name = HF_VARIANT
    arch = FAMILY.arch
    ignored_sources = IGNORED

    def __init__(self, ckpt):
        self.vision = "vision_config" in ckpt.config  # GLM-Edge-V (read by detect_chat_format)
        super().__init__(ckpt)
        hp = self.hp
        if hp.head_dim * hp.n_head != hp.n_embd:
            raise UnsupportedModelError(f"llama.cpp's chatglm graph needs num_attention_heads x head_dim "
                                        f"= hidden_size ({hp.n_head} x {hp.head_dim} != {hp.n_embd})",
                                        self.config_path)

    def detect_chat_format(self, template: str) -> str:
        """glm-4-9b-chat-hf keeps GLM-4's ``[gMASK]<sop>`` template; GLM-Edge's template has no prefix."""
        if self.vision:
            self.name = EDGE_V_VARIANT
            return EDGE_V_FORMAT
        if template.strip() and "[gMASK]" not in template:
            self.name = EDGE_VARIANT
            return EDGE_FORMAT
        return GLM4_FORMAT

    def tensors(self) -> list[OutTensor]:
        hp = self.hp
        plan = self.embedding_tensors()
        for bid in range(hp.n_layer):
            plan += self.attention_tensors(bid)
            plan += self.out(T.FFN_NORM, bid, (hp.n_embd,), HF_LAYER + "post_attention_layernorm")
            plan += self.out(T.FFN_UP, bid, (2 * hp.n_ff, hp.n_embd), HF_LAYER + "mlp.gate_up_proj")
            plan += self.out(T.FFN_DOWN, bid, (hp.n_embd, hp.n_ff), HF_LAYER + "mlp.down_proj")
        return plan + self.head_tensors()

    def projector(self) -> GlmEdgeVisionProjector | None:
        return GlmEdgeVisionProjector(self) if self.vision else None


CONVERTER = GlmHF

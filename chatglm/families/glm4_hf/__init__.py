"""``GlmForCausalLM``: GLM-4-9B -hf (chat and base), GLM-Edge 1.5B/4B chat and GLM-Edge-V 2B/5B, in transformers'
layout; llama.cpp's ``chatglm`` architecture with split q/k/v. GLM-Edge-V's vision tower (``vision_config``,
``model.vision.*``) is the projector beside it, libmtmd's GLM_EDGE (``clip.projector_type`` ``adapter``).

``convert.py``: the converter. ``vision.py``: GLM-Edge-V's projector writer. ``chat.py``: the ``glm-edge`` and
``glm-edge-v`` formats (the -hf checkpoints use GLM-4's ``glm4``) and the projector check.
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect, MediaProjector

FAMILY = Descriptor(
    name="glm4_hf",
    title="GLM-4-9B-chat-hf, GLM-Edge, GLM-Edge-V",
    arch="chatglm",
    engine=ENGINE_LLAMA,
    detect=Detect("glm", ("GlmForCausalLM",)),
    variants=("glm4-hf", "glm-edge", "glm-edge-v"),
    chat_formats=("glm-edge", "glm-edge-v"),
    special_tokens=("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>"),
    vocabulary="tokenizer.json (byte-level BPE)",
    # the image's chunk (boi, its embeddings, eoi) stands where the template writes its run of <|begin_of_image|>
    projectors=(MediaProjector("adapter", "image", "adapter.linear.dense_4h_to_h.weight", "<|begin_of_image|>"),),
)

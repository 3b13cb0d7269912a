"""``GlmForCausalLM``: GLM-4-9B -hf (chat and base) and GLM-Edge 1.5B/4B chat, in transformers' layout; llama.cpp's
``chatglm`` architecture with split q/k/v.

``convert.py``: the converter. ``chat.py``: the ``glm-edge`` format (the -hf checkpoints use GLM-4's ``glm4``).
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect

FAMILY = Descriptor(
    name="glm4_hf",
    title="GLM-4-9B-chat-hf, GLM-Edge",
    arch="chatglm",
    engine=ENGINE_LLAMA,
    detect=Detect("glm", ("GlmForCausalLM",)),
    variants=("glm4-hf", "glm-edge"),
    chat_formats=("glm-edge",),
    special_tokens=("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>"),
    vocabulary="tokenizer.json (byte-level BPE)",
)

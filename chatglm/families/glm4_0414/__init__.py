"""``Glm4ForCausalLM``: GLM-4-9B/32B-0414 and GLM-Z1 (thinking), llama.cpp's ``glm4`` architecture (norms after
attention and after the MLP).

``convert.py``: the converter. ``chat.py``: the ``glm4-0414`` and ``glm4-z1`` formats.
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect

FAMILY = Descriptor(
    name="glm4_0414",
    title="GLM-4-0414, GLM-Z1",
    arch="glm4",
    engine=ENGINE_LLAMA,
    detect=Detect("glm4", ("Glm4ForCausalLM",)),
    variants=("glm4-0414", "glm4-z1"),
    chat_formats=("glm4-0414", "glm4-z1"),
    format_guesses=(((), "glm4-0414"),),
    special_tokens=("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>", "<think>", "</think>"),
    vocabulary="tokenizer.json (byte-level BPE)",
)

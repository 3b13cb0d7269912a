"""``Glm4MoeForCausalLM``: GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7, llama.cpp's ``glm4moe`` architecture (mixture
of experts).

``convert.py``: the converter (experts stacked, next-token-prediction layers kept for speculative decoding).
``chat.py``: the ``glm45`` format with its XML tool calls and thinking.
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect

FAMILY = Descriptor(
    name="glm4_moe",
    title="GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7",
    arch="glm4moe",
    engine=ENGINE_LLAMA,
    detect=Detect("glm4_moe", ("Glm4MoeForCausalLM",)),
    variants=("glm4.5",),
    chat_formats=("glm45", "glm47"),
    format_guesses=(((), "glm45"),),
    special_tokens=("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>",
                    "</arg_key>", "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>", "/nothink"),
    vocabulary="tokenizer.json (byte-level BPE)",
    template_fingerprints=(("b1e56a48a6c16b1c", "glm45"),  # GLM-4.6 (as llama.cpp keeps it)
                           ("d63ad536c3c81880", "glm47")),  # GLM-4.7
)

"""``Glm4MoeLiteForCausalLM``: GLM-4.7-Flash (30B-A3B), llama.cpp's ``deepseek2`` architecture: multi-head latent
attention (MLA, stored as multi-query attention over the compressed cache) with GLM-4.5's mixture of experts.

``convert.py``: the converter (``kv_b_proj`` split into ``attn_k_b``/``attn_v_b``, experts stacked, MTP layers kept).
``chat.py``: no formats of its own yet; the converter names GLM-4.5's ``glm45`` format.
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect

FAMILY = Descriptor(
    name="glm4_moe_lite",
    title="GLM-4.7-Flash",
    arch="deepseek2",
    engine=ENGINE_LLAMA,
    detect=Detect("glm4_moe_lite", ("Glm4MoeLiteForCausalLM",)),
    variants=("glm4.7-flash",),
    chat_formats=(),
    format_guesses=(((), "glm47"),),  # GLM-4.7's (chatglm/families/glm4_moe), for GGUFs that name no format
    special_tokens=("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>",
                    "</arg_key>", "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>", "/nothink"),
    vocabulary="tokenizer.json (byte-level BPE)",
)

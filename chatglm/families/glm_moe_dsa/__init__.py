"""``GlmMoeDsaForCausalLM``: GLM-5, GLM-5.1, GLM-5.2, GLM-5.3, llama.cpp's ``glm-dsa`` architecture.

Multi-head latent attention (stored as MQA, as llama.cpp's DeepSeek-2 family), DeepSeek sparse attention's lightning
indexer (each "full" layer picks ``index_topk`` keys per query, "shared" layers reuse the previous full layer's
pick), GLM-4.5's sigmoid-routed experts with one shared expert, and the next-token-prediction (MTP) layer kept as
``blk.{L}.nextn.*`` for speculative decoding.

``convert.py``: the converter. ``chat.py``: no formats of its own yet (the GGUF names GLM-4.5's ``glm45``).
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect

FAMILY = Descriptor(
    name="glm_moe_dsa",
    title="GLM-5, GLM-5.1, GLM-5.2, GLM-5.3",
    arch="glm-dsa",
    engine=ENGINE_LLAMA,
    detect=Detect("glm_moe_dsa", ("GlmMoeDsaForCausalLM",)),
    variants=("glm5",),
    chat_formats=(),
    format_guesses=(((), "glm47"),),  # GLM-4.7's (chatglm/families/glm4_moe): GLM-5 writes prompts as GLM-4.7 does
    special_tokens=("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>",
                    "</arg_key>", "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>", "/nothink"),
    vocabulary="tokenizer.json (byte-level BPE)",
)

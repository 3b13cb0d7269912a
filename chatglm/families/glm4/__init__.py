"""GLM-4-9B (base, chat, chat-1m) in the THUDM remote-code layout: ChatGLM3's weights and config.json with a tiktoken
``tokenizer.model``; llama.cpp's ``chatglm`` architecture.

``convert.py``: the converter (ChatGLM3's tensor map, the tiktoken vocabulary). ``chat.py``: the ``glm4`` format
(also the format of the -hf checkpoints), its JSON tool calls.
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect

FAMILY = Descriptor(
    name="glm4",
    title="GLM-4-9B, GLM-4-9B-chat, GLM-4-9B-chat-1m",
    arch="chatglm",
    engine=ENGINE_LLAMA,
    # ChatGLM2/3's config: the converter tells them apart by the format of tokenizer.model.
    detect=Detect("chatglm", ("ChatGLMModel", "ChatGLMForConditionalGeneration"),
                  has_keys=("padded_vocab_size", "multi_query_attention")),
    variants=("glm4",),
    chat_formats=("glm4",),
    format_guesses=((("<|endoftext|>", "<|user|>"), "glm4"),),
    special_tokens=("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                    "<|assistant|>", "<|observation|>", "<|begin_of_image|>"),
    vocabulary="tiktoken ranks in tokenizer.model, special tokens in tokenizer_config.json",
)

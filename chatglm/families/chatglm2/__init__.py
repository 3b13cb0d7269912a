"""ChatGLM2-6B (and -32k, -int4), ChatGLM3-6B (base, chat, -32k, -128k) and CodeGeeX2-6B: the second generation in
the THUDM layout, llama.cpp's ``chatglm`` architecture with a SentencePiece ``tokenizer.model``.

``convert.py``: the converter. ``chat.py``: the ``[Round N]`` format of ChatGLM2/CodeGeeX2 and ChatGLM3's role-token
format with its tool calls.
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect

FAMILY = Descriptor(
    name="chatglm2",
    title="ChatGLM2-6B, ChatGLM3-6B, CodeGeeX2-6B",
    arch="chatglm",
    engine=ENGINE_LLAMA,
    detect=Detect("chatglm", ("ChatGLMModel", "ChatGLMForConditionalGeneration"),
                  has_keys=("padded_vocab_size", "multi_query_attention")),
    variants=("chatglm2", "chatglm3"),
    chat_formats=("chatglm2", "chatglm3"),
    format_guesses=((("<|user|>",), "chatglm3"), ((), "chatglm2")),
    special_tokens=("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>"),
    vocabulary="SentencePiece tokenizer.model, special tokens appended",
)

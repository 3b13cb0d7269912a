"""ChatGLM-6B, the first generation (THUDM/chatglm-6b, final 130528-token release and the first 150528 one; the
-int4/-int8 checkpoints are dequantized): our own ``chatglm1`` GGUF architecture, run by our ggml graph.

``convert.py``: the converter (2D-position layout, ice_text vocabulary). ``chat.py``: the ``[Round N]`` 问/答 format.
"""

from chatglm.families.descriptor import ENGINE_GLM1, Descriptor, Detect

FAMILY = Descriptor(
    name="chatglm1",
    title="ChatGLM-6B",
    arch="chatglm1",
    engine=ENGINE_GLM1,
    detect=Detect("chatglm", (), has_keys=("position_encoding_2d", "inner_hidden_size"),
                  lacks_keys=("padded_vocab_size",)),
    variants=("chatglm1",),
    chat_formats=("chatglm1",),
    format_guesses=(((), "chatglm1"),),
    special_tokens=("[MASK]", "[gMASK]", "<sop>", "<eop>"),
    # The model attends bidirectionally to everything before <sop>: scored text must come after it.
    causal_prefix=("[gMASK]", "<sop>"),
    vocabulary="ice_text.model (SentencePiece; image tokens first, blank and byte pieces)",
)

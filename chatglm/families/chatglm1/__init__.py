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

# GGUF metadata keys of our own, written by convert.py and read by the GLM-1 engine (the standard ones come from
# GGUFWriter helpers).
KEY_SPM_MODEL = f"{FAMILY.arch}.tokenizer.sentencepiece_model"  # uint8[]: the (completed) ice_text.model
KEY_IMAGE_TOKENS = f"{FAMILY.arch}.tokenizer.image_tokens"  # u32: ids below it are <image_N>
KEY_MAX_BLANK = f"{FAMILY.arch}.tokenizer.max_blank_length"  # u32: longest <|blank_N|> piece
KEY_GMASK = f"{FAMILY.arch}.gmask_token_id"
KEY_END = f"{FAMILY.arch}.end_token_id"  # "</s>"

"""GGUF metadata keys of our own. The standard ones (``general.*``, ``tokenizer.ggml.*``, ``<arch>.*``) are
gguf-py's :class:`gguf.Keys`; these are the ones llama.cpp does not define."""

from __future__ import annotations

# Written into every converted model (glm.converter into LoRA adapters too).
FAMILY = "glm.family"  # str: the converter family, e.g. "chatglm3"
CHAT_FORMAT = "glm.chat_format"  # str: the prompt format the runtime uses, e.g. "glm4-0414"
CONVERTER = "glm.converter"  # str: "chatglm <version>[ <what was merged>]"

# The GLM-1 engine's own architecture (first-generation ChatGLM-6B), which llama.cpp does not know.
GLM1_ARCH = "chatglm1"
GLM1_SPM_MODEL = f"{GLM1_ARCH}.tokenizer.sentencepiece_model"  # uint8[]: the (completed) ice_text.model
GLM1_IMAGE_TOKENS = f"{GLM1_ARCH}.tokenizer.image_tokens"  # u32: ids below it are <image_N>
GLM1_MAX_BLANK = f"{GLM1_ARCH}.tokenizer.max_blank_length"  # u32: longest <|blank_N|> piece
GLM1_GMASK = f"{GLM1_ARCH}.gmask_token_id"  # u32: [gMASK]
GLM1_END = f"{GLM1_ARCH}.end_token_id"  # u32: "</s>"

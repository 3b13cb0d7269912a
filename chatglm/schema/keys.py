"""GGUF metadata keys of our own. The standard ones (``general.*``, ``tokenizer.ggml.*``, ``<arch>.*``) are
gguf-py's :class:`gguf.Keys`; these are the ones llama.cpp does not define."""

from __future__ import annotations

# Written into every converted model (glm.converter into LoRA adapters too).
FAMILY = "glm.family"  # str: the converter family, e.g. "chatglm3"
CHAT_FORMAT = "glm.chat_format"  # str: the prompt format the runtime uses, e.g. "glm4-0414"
JINJA_CHAT_FORMAT = "jinja"  # glm.chat_format value: render the file's tokenizer.chat_template (sandboxed)
STOP_TOKEN_IDS = "glm.stop_token_ids"  # u32[]: generation_config.json's (and config.json's) eos ids; a reply ends at any
CONVERTER = "glm.converter"  # str: "chatglm <version>[ <what was merged>]"

# Keys of the GLM-1 engine's own architecture (first-generation ChatGLM-6B), which llama.cpp does not know.
GLM1_SPM_MODEL = "chatglm1.tokenizer.sentencepiece_model"  # uint8[]: the (completed) ice_text.model
GLM1_IMAGE_TOKENS = "chatglm1.tokenizer.image_tokens"  # u32: ids below it are <image_N>
GLM1_MAX_BLANK = "chatglm1.tokenizer.max_blank_length"  # u32: longest <|blank_N|> piece
GLM1_GMASK = "chatglm1.gmask_token_id"  # u32: [gMASK]
GLM1_END = "chatglm1.end_token_id"  # u32: "</s>"

# P-Tuning v2 (a trained prefix of keys and values in front of every layer's attention; see convert/ptuning.py).
PTUNING_PRE_SEQ_LEN = "glm.ptuning.pre_seq_len"  # u32: prefix entries per layer
PTUNING_LAYOUT = "glm.ptuning.layout"  # u32[4]: the prefix array's shape (n_layer, 2, pre_seq_len, n_head_kv * head_dim)
PTUNING_PREFIX = "glm.ptuning.prefix"  # f32[]: (n_layer, 2 (key, value), pre_seq_len, n_head_kv * head_dim), C order;
# keys as the published PrefixEncoder gives them: never rotated (rotary embedding applies to the new tokens only)
PTUNING_FIRST_POSITION = "glm.ptuning.first_position"  # u32: the published position of the first token after the
# prefix: absent or 0 (THUDM's remote code), or pre_seq_len (transformers' classes under PEFT prefix tuning)
PTUNING_PREFIX_TYPE = "glm.ptuning.prefix_type"  # str, "f16" when the prefix is stored as f16 (u16[] of IEEE half
# bits: GGUF metadata has no f16 type); absent or "f32": f32[]

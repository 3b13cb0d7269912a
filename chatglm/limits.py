"""What llama.cpp's loaders accept, from the llama.cpp that llama-cpp-python 0.3.36 vendors.

Both sides check against these before anything native runs: the converter on config.json, the runtime on a GGUF's
metadata. A value past one of them makes llama.cpp abort (GGML_ASSERT) or throw, which kills the process.
"""

from __future__ import annotations

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS (llama-hparams.h): per-layer arrays are std::array of this size
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS (llama-hparams.h): GGML_ASSERT(n_expert <= LLAMA_MAX_EXPERTS)
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # LLAMA_ROPE_SCALING_TYPES (llama-model.cpp)

# -- command-line ranges (the outputs/CLI engineer's block) ------------------------------------------------------
MAX_THREADS = 512  # GGML_MAX_N_THREADS (ggml.h): thread pools are sized by it
MAX_CONTEXT = 1 << 24  # 16M tokens, 16x the longest GLM context (GLM-4-9B-chat-1m); llama.cpp keeps n_ctx in uint32
MAX_GPU_LAYERS = 1 << 20  # -ngl above a model's layer count means "all" (llama.cpp clamps it)
MAX_SEED = (1 << 32) - 1  # llama.cpp seeds are uint32
MAX_LORA_SCALE = 1000.0  # a LoRA update scaled past this overflows f16 weights long before

# -- converter: what a GGUF value of each type holds, and config.json sanity (h16-config) ---------------------------
UINT32_MAX = 2**32 - 1
FLOAT32_MAX = 3.4028234663852886e38  # FLT_MAX: a larger finite number packs as inf (or fails struct.pack)
MAX_NORM_EPS = 1.0  # a norm epsilon of 1 or more swamps the activations: a typo, not a model

# -- runtime (GGUF validation, contexts): read from llama-context.cpp / llama-vocab.cpp ------------------------------
LLAMA_MAX_CONTEXT = 2**31 - 256  # cparams.n_ctx is a uint32 padded up to 256 (GGML_PAD) and positions are int32 (llama_pos)
MAX_TENSORS = 1 << 16  # our bound on a GGUF's tensor table (GLM-4.5 355B has ~1,800; 512 layers x 64 would fit)
MAX_KEYS = 1 << 16  # our bound on a GGUF's metadata keys (real files have ~40)
VOCAB_MODELS = ("llama", "gpt2")  # tokenizer.ggml.model values of GLM GGUFs: SentencePiece (SPM) and byte-level BPE
EMPTY_TOKEN = "[EMPTY_{}]"  # llama-vocab.cpp renames an empty token text to this before indexing texts
# ggml types a weight matrix may not have: integer and f64 types and the activation-only Q8_1/Q8_K have no CPU matmul
WEIGHT_TYPES_REFUSED = {9: "Q8_1", 15: "Q8_K", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}
VECTOR_TYPE = 0  # F32: ggml's CPU binary ops (norm weights, biases) take no f16/bf16/quantized second operand
EXPERT_GATING_FUNCS = range(5)  # llama_expert_gating_func_type: another value is GGML_ABORT in build_moe_ffn
# general.name substrings for which llama-vocab.cpp .at()s fixed token texts (its per-model attribute quirks)
NAME_QUIRKS = {("phi-3", "phi3"): ("</s>", "<unk>", "<s>", "<|endoftext|>")}

# -- chat templates (h18-chat) ----------------------------------------------------------------------------------------
MAX_CHAT_TEMPLATE = 1 << 20  # bytes of a chat template, converter and runtime (published GLM templates: 3-11 KB)
MAX_STOP_TOKENS = 64  # eos ids taken from generation_config.json / config.json (published GLMs list 3)

# -- media given to libmtmd (h19-vc): checked on the bytes before stb_image or miniaudio sees them ------------------
MAX_MEDIA_BYTES = 32 << 20  # one image or audio file (a 12-megapixel phone JPEG is 3-6 MB)
MAX_IMAGE_SIDE = 16384  # pixels per side; stb_image's own bound is 1 << 24 (STBI_MAX_DIMENSIONS)
MAX_IMAGE_PIXELS = 1 << 26  # 8192 x 8192: stb_image decodes to 8-bit RGB, 192 MiB at this size
MAX_AUDIO_SECONDS = 600.0  # miniaudio decodes the whole file to f32 PCM at the projector's rate before chunking
MAX_MEDIA_PER_REQUEST = 16  # images and audio clips in one chat request

# -- server (issue #19): the request body, which carries images and audio inline as base64 ---------------------------
MAX_BODY_MIB = 32  # the default body limit (`serve --max-body`): a few phone photos (3-6 MB, 4/3 more as base64)
MAX_BODY_MIB_SETTING = 1024  # the most --max-body takes (16 files of 32 MiB are 683 MiB as base64)

"""What llama.cpp's loaders accept, from the llama.cpp that llama-cpp-python 0.3.36 vendors.

Both sides check against these before anything native runs: the converter on config.json, the runtime on a GGUF's
metadata. A value past one of them makes llama.cpp abort (GGML_ASSERT) or throw, which kills the process.
"""

from __future__ import annotations

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS (llama-hparams.h): per-layer arrays are std::array of this size
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS (llama-hparams.h): GGML_ASSERT(n_expert <= LLAMA_MAX_EXPERTS)
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # LLAMA_ROPE_SCALING_TYPES (llama-model.cpp)

# -- converter: what a GGUF value of each type holds, and config.json sanity (h16-config) ---------------------------
UINT32_MAX = 2**32 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
FLOAT32_MAX = 3.4028234663852886e38  # FLT_MAX: a larger finite number packs as inf (or fails struct.pack)
MAX_NORM_EPS = 1.0  # a norm epsilon of 1 or more swamps the activations: a typo, not a model

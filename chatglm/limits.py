"""What llama.cpp's loaders accept, from the llama.cpp that llama-cpp-python 0.3.36 vendors.

Both sides check against these before anything native runs: the converter on config.json, the runtime on a GGUF's
metadata. A value past one of them makes llama.cpp abort (GGML_ASSERT) or throw, which kills the process.
"""

from __future__ import annotations

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS (llama-hparams.h): per-layer arrays are std::array of this size
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS (llama-hparams.h): GGML_ASSERT(n_expert <= LLAMA_MAX_EXPERTS)
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # LLAMA_ROPE_SCALING_TYPES (llama-model.cpp)

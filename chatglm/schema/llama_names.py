"""llama.cpp's names that the gguf-py we depend on (0.19) predates: spelled here once, as llama-arch.cpp of the
llama.cpp that llama-cpp-python 0.3.36 vendors spells them. Both sides read them; drop an entry when gguf-py has it.
"""

from __future__ import annotations

ARCH_GLM5_NEXT = "glm5-next"  # LLM_ARCH_GLM5_NEXT (GLM-5.3-Flash)

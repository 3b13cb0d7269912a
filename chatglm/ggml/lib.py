"""Loads the libggml that the pinned llama-cpp-python ships, once, and gives its handles.

Other modules in this package declare the functions they bind (argtypes and restype for every one) on these handles.
Loading goes through llama_cpp itself first, so the process holds exactly one copy of ggml.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

from chatglm.errors import ChatGLMError

_EXT = {"darwin": ".dylib", "win32": ".dll"}.get(sys.platform, ".so")


def _lib_dir() -> Path:
    import llama_cpp  # noqa: F401  (loads libllama, which loads libggml*)

    return Path(llama_cpp.__file__).parent / "lib"


def _open(stem: str) -> ctypes.CDLL:
    directory = _lib_dir()
    names = [f"lib{stem}{_EXT}", f"{stem}{_EXT}"]
    for name in names:
        path = directory / name
        if path.exists():
            return ctypes.CDLL(str(path), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    raise ChatGLMError(f"llama-cpp-python ships no {names[0]} in {directory}; reinstall llama-cpp-python")


@functools.cache
def base() -> ctypes.CDLL:
    """libggml-base: tensors, op builders, quantization, gguf."""
    return _open("ggml-base")


@functools.cache
def cpu() -> ctypes.CDLL:
    """libggml-cpu: CPU backend and graph compute."""
    return _open("ggml-cpu")


@functools.cache
def ggml() -> ctypes.CDLL:
    """libggml: backend registry (ggml_backend_* device functions)."""
    return _open("ggml")

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
    for path in [*_held(directory, f"lib{stem}{_EXT}"), *(directory / name for name in names)]:
        if path.exists():
            return ctypes.CDLL(str(path), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
    raise ChatGLMError(f"llama-cpp-python ships no {names[0]} in {directory}; reinstall llama-cpp-python")


def _held(directory: Path, name: str) -> list[Path]:
    """The file of ``name`` (or of its versioned names, ``.so.0``) that the process already maps: libllama loads
    libggml by its SONAME, and a wheel may ship ``libggml-base.so`` and ``libggml-base.so.0`` as two copies, not
    links; opening the other copy would load a second ggml with its own state (its log would bypass our routing)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing to match
        return []
    fields = (line.split(maxsplit=5) for line in maps.splitlines())
    held = {Path(f[5]) for f in fields if len(f) == 6 and f[5].startswith("/")}
    return sorted(p for p in held if p.parent == directory and (p.name == name or p.name.startswith(name + ".")))


def bind(target: object, handle: ctypes.CDLL, table: dict, prefix: str) -> None:
    """Declare each function of ``table`` (C name -> (restype, argtypes)) from ``handle`` and set it on ``target``
    under its name less ``prefix``."""
    for name, (restype, argtypes) in table.items():
        fn = handle[name]
        fn.restype, fn.argtypes = restype, argtypes
        setattr(target, name.removeprefix(prefix), fn)


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

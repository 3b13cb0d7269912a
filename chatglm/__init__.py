"""chatglm: convert ChatGLM / GLM checkpoints to GGUF and chat with them.

    import chatglm
    model = chatglm.load("chatglm3-6b-q4_k_m.gguf", n_ctx=4096)
    print(model.chat([{"role": "user", "content": "你好"}]).content)

The names below are imported on first use, so ``import chatglm`` stays cheap for the command line.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "load": "chatglm.api",
    "Model": "chatglm.runtime.model",
    "ModelBusyError": "chatglm.runtime.model",
    "GenerationStats": "chatglm.runtime.model",
    "ChatSession": "chatglm.runtime.session",
    "Message": "chatglm.runtime.messages",
    "ToolCall": "chatglm.runtime.messages",
    "Media": "chatglm.runtime.media",
    "load_media": "chatglm.runtime.media",
    "SamplingParams": "chatglm.runtime.sampling",
    "ModelInfo": "chatglm.runtime.engine",
    "ChatGLMError": "chatglm.errors",
    "InputError": "chatglm.errors",
    "UnsupportedModelError": "chatglm.errors",
    "OutputError": "chatglm.errors",
    "ModelRuntimeError": "chatglm.errors",
    "ContextOverflowError": "chatglm.errors",
    "Cancelled": "chatglm.errors",
}
__all__ = ["Cancelled", "ChatGLMError", "ChatSession", "ContextOverflowError", "GenerationStats", "InputError", "Media",
           "Message", "Model", "ModelBusyError", "ModelInfo", "ModelRuntimeError", "OutputError", "SamplingParams",
           "ToolCall", "UnsupportedModelError", "__version__", "load", "load_media"]

if TYPE_CHECKING:  # pragma: no cover
    from chatglm.api import load
    from chatglm.errors import (Cancelled, ChatGLMError, ContextOverflowError, InputError, ModelRuntimeError,
                                OutputError, UnsupportedModelError)
    from chatglm.runtime.engine import ModelInfo
    from chatglm.runtime.media import Media, load_media
    from chatglm.runtime.messages import Message, ToolCall
    from chatglm.runtime.model import GenerationStats, Model, ModelBusyError
    from chatglm.runtime.sampling import SamplingParams
    from chatglm.runtime.session import ChatSession


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'chatglm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)

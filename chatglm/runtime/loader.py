"""Open a GGUF: validate it, describe it, and start the engine its architecture needs."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import gguf

from chatglm import families
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.descriptor import ENGINE_GLM1, ENGINE_LLAMA
from chatglm.gguf_file import GGUFHeader, read_header
from chatglm.runtime.engine import Engine, ModelInfo
from chatglm.runtime.memory import default_context
from chatglm.runtime.validate import check_kv_type, check_transformer

# Engine (a family descriptor's ``engine``) -> "module:class" of the engine that runs it.
ENGINES = {
    ENGINE_LLAMA: "chatglm.runtime.llama_engine:LlamaEngine",
    ENGINE_GLM1: "chatglm.runtime.glm1.engine:GLM1Engine",
}


def special_tokens(header: GGUFHeader) -> dict[str, int]:
    tokens = header.kv.get("tokenizer.ggml.tokens") or []
    types = header.array("tokenizer.ggml.token_type")
    wanted = families.special_tokens()  # the control tokens some chat format looks up by text
    found: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if text in wanted and (len(types) <= i or int(types[i]) in (gguf.TokenType.CONTROL,
                                                                      gguf.TokenType.USER_DEFINED)):
            found.setdefault(text, i)
    return found


def chat_format_of(header: GGUFHeader, special: dict[str, int]) -> str:
    """The GGUF's glm.chat_format; for files that name none, the best guess of the families of its arch."""
    fmt = header.get("glm.chat_format")
    if isinstance(fmt, str) and fmt:
        return fmt
    guess = families.guess_format(header.arch, special)
    if guess is None:
        raise UnsupportedModelError(f"GGUF architecture {header.arch!r}: no chat format fits its vocabulary",
                                    header.path)
    return guess


def describe(header: GGUFHeader, n_ctx: int = 0) -> ModelInfo:
    special = special_tokens(header)
    fmt = chat_format_of(header, special)
    n_ctx_train = int(header.arch_get("context_length", 0) or 0)
    return ModelInfo(
        path=header.path, arch=header.arch, family=str(header.get("glm.family") or fmt), chat_format=fmt,
        n_ctx=n_ctx, n_ctx_train=n_ctx_train, n_vocab=len(header.kv.get("tokenizer.ggml.tokens") or []),
        n_params=sum(_count(t.shape) for t in header.tensors.values()), size_bytes=header.file_size,
        description=str(header.get("general.name") or header.arch), special=special,
    )


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def open_engine(path: Path, *, n_ctx: Optional[int] = None, n_threads: Optional[int] = None, n_gpu_layers: int = 0,
                flash_attn: Optional[bool] = None, kv_type: str = "f16", on_progress=None) -> Engine:
    header = read_header(path)
    engine = families.arch_value(header.arch, "engine")
    if engine is None:
        raise UnsupportedModelError(f"GGUF architecture {header.arch!r} is not a GLM model this tool runs "
                                    f"(known: {', '.join(families.archs())})", path)
    if engine == ENGINE_LLAMA:
        check_transformer(header)
        check_kv_type(header, kv_type)
    target = ENGINES[engine]
    info = describe(header)
    if n_ctx is None:
        n_ctx = default_context(header, kv_type)
    if n_ctx < 1:
        raise InputError(f"context size must be positive, got {n_ctx}")
    if n_threads is None:
        from chatglm.runtime.llama_native import physical_cores

        n_threads = physical_cores()
    module, _, cls = target.partition(":")
    engine_cls = getattr(importlib.import_module(module), cls)
    return engine_cls(header, info, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                      flash_attn=flash_attn, kv_type=kv_type, on_progress=on_progress)

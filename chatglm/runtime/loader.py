"""Open a GGUF: validate it, describe it, and start the engine its architecture needs."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import gguf

from chatglm.errors import InputError, UnsupportedModelError
from chatglm.gguf_file import GGUFHeader, read_header
from chatglm.runtime.engine import Engine, ModelInfo
from chatglm.runtime.memory import default_context
from chatglm.runtime.validate import check_kv_type, check_transformer
from chatglm.schema import keys

# GGUF architecture -> "module:class" of the engine that runs it.
ENGINES = {
    "chatglm": "chatglm.runtime.llama_engine:LlamaEngine",
    "glm4": "chatglm.runtime.llama_engine:LlamaEngine",
    "glm4moe": "chatglm.runtime.llama_engine:LlamaEngine",
    "chatglm1": "chatglm.runtime.glm1.engine:GLM1Engine",
}
# Special tokens the chat formats use, looked up by text among the vocab's control tokens.
SPECIAL_TEXTS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<sop>", "<eop>", "<|endoftext|>", "<|system|>",
                 "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>", "<|begin_of_image|>",
                 "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
                 "<tool_response>", "</tool_response>", "/nothink")
DEFAULT_FORMAT = {"glm4": "glm4-0414", "glm4moe": "glm45", "chatglm1": "chatglm1"}


def special_tokens(header: GGUFHeader) -> dict[str, int]:
    tokens = header.kv.get("tokenizer.ggml.tokens") or []
    types = header.array("tokenizer.ggml.token_type")
    wanted = set(SPECIAL_TEXTS)
    found: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if text in wanted and (len(types) <= i or int(types[i]) in (gguf.TokenType.CONTROL,
                                                                      gguf.TokenType.USER_DEFINED)):
            found.setdefault(text, i)
    return found


def chat_format_of(header: GGUFHeader, special: dict[str, int]) -> str:
    fmt = header.get(keys.CHAT_FORMAT)
    if isinstance(fmt, str) and fmt:
        return fmt
    if header.arch in DEFAULT_FORMAT:
        return DEFAULT_FORMAT[header.arch]
    if "<|endoftext|>" in special and "<|user|>" in special:
        return "glm4"
    return "chatglm3" if "<|user|>" in special else "chatglm2"


def describe(header: GGUFHeader, n_ctx: int = 0) -> ModelInfo:
    special = special_tokens(header)
    fmt = chat_format_of(header, special)
    n_ctx_train = int(header.arch_get("context_length", 0) or 0)
    return ModelInfo(
        path=header.path, arch=header.arch, family=str(header.get(keys.FAMILY) or fmt), chat_format=fmt,
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
    target = ENGINES.get(header.arch)
    if target is None:
        raise UnsupportedModelError(
            f"GGUF architecture {header.arch!r} is not a GLM model this tool runs (known: {', '.join(ENGINES)})", path)
    if target.endswith(":LlamaEngine"):
        check_transformer(header)
        check_kv_type(header, kv_type)
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

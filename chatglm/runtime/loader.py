"""Open a GGUF: validate it, describe it, and start the engine its architecture needs."""

from __future__ import annotations

import importlib
import logging
from pathlib import Path
from typing import Callable, Optional, Sequence

import gguf
import numpy as np

from chatglm import families
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.descriptor import ENGINE_GLM1, ENGINE_LLAMA
from chatglm.gguf_file import ArrayRef, GGUFHeader, read_header
from chatglm.runtime.engine import Engine, ModelInfo
from chatglm.runtime.jinja_chat import JINJA_FORMAT
from chatglm.runtime.prompts import format_class
from chatglm.runtime.memory import check_fits, default_context
from chatglm.runtime.validate import check_context, check_kv_head, check_kv_type, check_transformer, resolve_flash_attn
from chatglm.schema import keys

log = logging.getLogger(__name__)

def _check_glm1(header: GGUFHeader) -> None:
    from chatglm.runtime.glm1.graph import GLM1Config
    from chatglm.runtime.glm1.weights import check_tensors

    check_tensors(header, GLM1Config.from_header(header))


# Engine (a family descriptor's ``engine``) -> "module:class" of the engine, and the validation it needs before any
# native code sees the file.
ENGINE_CLASSES = {ENGINE_LLAMA: "chatglm.runtime.llama_engine:LlamaEngine",
                  ENGINE_GLM1: "chatglm.runtime.glm1.engine:GLM1Engine"}
ENGINE_VALIDATORS: dict[str, Callable[[GGUFHeader], object]] = {ENGINE_LLAMA: check_transformer,
                                                                ENGINE_GLM1: _check_glm1}
# GGUF architecture -> the engine that runs it and its validation, for every architecture a family writes.
ENGINES = {arch: ENGINE_CLASSES[families.arch_value(arch, "engine")] for arch in families.archs()}
VALIDATORS = {arch: ENGINE_VALIDATORS[families.arch_value(arch, "engine")] for arch in families.archs()}


def not_runnable(header: GGUFHeader) -> Optional[str]:
    """Why this tool cannot run the file (an adapter, another architecture), or None when it can."""
    kind = header.get("general.type")
    if kind == "adapter":
        return (f"this is a {header.get('adapter.type') or 'LoRA'} adapter for {header.arch!r} models, not a model: "
                "give it with --lora beside its base model")
    if kind not in (None, "model"):
        return f"GGUF type {kind!r} is not a model this tool runs"
    if header.arch not in ENGINES:
        return f"GGUF architecture {header.arch!r} is not a GLM model this tool runs (known: {', '.join(ENGINES)})"
    owners = families.of_arch(header.arch)
    if all(f.shared_arch for f in owners) and header.get(keys.FAMILY) not in {v for f in owners for v in f.variants}:
        return (f"GGUF architecture {header.arch!r} is not a GLM model this tool runs (a {header.arch} file is run "
                f"only as {', '.join(f.title for f in owners)}, converted by chatglm: its {keys.FAMILY} names it)")
    return None


def validate(header: GGUFHeader) -> None:
    """Refuse, with one line, any file this tool cannot run or that its engine's loader would crash on."""
    problem = not_runnable(header)
    if problem:
        raise UnsupportedModelError(problem, header.path)
    VALIDATORS[header.arch](header)


def special_tokens(header: GGUFHeader) -> dict[str, int]:
    wanted = families.special_tokens()  # the control tokens some chat format looks up by text
    return {text: i for text, i in added_tokens(header, typed_only=False).items() if text in wanted}


def added_tokens(header: GGUFHeader, typed_only: bool = True) -> dict[str, int]:
    """The control and user-defined tokens (text -> first id); ``typed_only=False``: every token when the file has
    no token types."""
    tokens = _tokens(header)
    raw = header.get("tokenizer.ggml.token_type")
    types = np.asarray(header.array("tokenizer.ggml.token_type") if _numbers(raw) else [], dtype=np.int64)
    if not len(types) and typed_only:
        return {}
    n = min(len(types), len(tokens))
    marked = np.nonzero(np.isin(types[:n], (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)))[0]
    found: dict[str, int] = {}
    for i in (*marked.tolist(), *range(n, len(tokens))):  # tokens past the types array count as special
        if tokens[i]:
            found.setdefault(tokens[i], i)
    return found


def chat_template(header: GGUFHeader) -> str:
    template = header.get("tokenizer.chat_template")
    return template if isinstance(template, str) else ""


def stop_tokens(header: GGUFHeader, n_vocab: int) -> frozenset[int]:
    """The extra end-of-generation ids the converter kept (generation_config.json's eos list), within the vocab."""
    raw = header.get(keys.STOP_TOKEN_IDS)
    ids = header.array(keys.STOP_TOKEN_IDS) if _numbers(raw) else []
    return frozenset(int(t) for t in ids if 0 <= int(t) < n_vocab)


def _tokens(header: GGUFHeader) -> list:
    tokens = header.get("tokenizer.ggml.tokens")
    return tokens if isinstance(tokens, list) and all(isinstance(t, str) for t in tokens[:1]) else []


def _numbers(value) -> bool:
    return isinstance(value, ArrayRef) or (isinstance(value, list) and all(type(v) is int for v in value))


def chat_format_of(header: GGUFHeader, special: dict[str, int]) -> str:
    """The GGUF's glm.chat_format; for files that name none (other converters'), the builder that reproduces its
    chat template token for token, else the sandboxed Jinja path where its arch's formats render a checkpoint's
    Jinja template (GLM-4.5 and later), else the best guess of the families of its arch."""
    fmt = header.get(keys.CHAT_FORMAT)
    if isinstance(fmt, str) and fmt:
        return fmt
    template = chat_template(header)
    known = families.recognise_template(template)
    if known is not None and families.owner_of_format(known).arch == header.arch:
        return known
    guess = families.guess_format(header.arch, special)
    if template and guess is not None and format_class(guess).renders_template:
        return JINJA_FORMAT
    if guess is None:
        raise UnsupportedModelError(f"GGUF architecture {header.arch!r}: no chat format fits its vocabulary",
                                    header.path)
    return guess


def describe(header: GGUFHeader, n_ctx: int = 0) -> ModelInfo:
    """What the header says; for a file this tool does not run, no family or chat format is guessed."""
    special = special_tokens(header)
    fmt = chat_format_of(header, special) if not_runnable(header) is None else ""
    n_ctx_train = header.arch_get("context_length", 0)
    n_ctx_train = n_ctx_train if type(n_ctx_train) is int else 0
    n_vocab = len(_tokens(header))
    return ModelInfo(
        path=header.path, arch=header.arch, family=str(header.get(keys.FAMILY) or fmt or ""), chat_format=fmt,
        n_ctx=n_ctx, n_ctx_train=n_ctx_train, n_vocab=n_vocab,
        n_params=sum(_count(t.shape) for t in header.tensors.values()), size_bytes=header.file_size,
        description=str(header.get("general.name") or header.arch), special=special,
        eog=stop_tokens(header, n_vocab), chat_template=chat_template(header), added=added_tokens(header),
    )


def _count(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def open_engine(path: Path, *, n_ctx: Optional[int] = None, n_threads: Optional[int] = None, n_gpu_layers: int = 0,
                flash_attn: Optional[bool] = None, kv_type: str = "f16", on_progress=None,
                extra_memory: int = 0, n_batch: int = 512, rpc: Sequence = (),
                tensor_split: Sequence[float] = (), n_rollback: int = 0, load_mtp: bool = False) -> Engine:
    """The engine for the GGUF at ``path``. ``rpc``: RPC servers (``host:port`` texts or Endpoints) to split the
    model over, by ``tensor_split`` weights; such an engine runs in a worker process (``runtime/rpc_worker.py``).
    ``n_rollback``: how many tokens a recurrent state must be able to drop after an evaluation, ``load_mtp``: load
    the NextN layers too (speculative decoding, llama.cpp engine only)."""
    check_kv_type(kv_type)
    if flash_attn not in (None, True, False):
        raise InputError(f"flash_attn must be True, False or None, got {flash_attn!r}")
    if type(n_gpu_layers) is not int or n_gpu_layers < -1:
        raise InputError(f"n_gpu_layers must be an integer >= -1 (-1: all), got {n_gpu_layers!r}")
    header = read_header(path)
    validate(header)
    target = ENGINES[header.arch]
    options = {}
    if families.arch_value(header.arch, "engine") == ENGINE_LLAMA:
        options.update(n_rollback=n_rollback, load_mtp=load_mtp)
        flash_attn, note = resolve_flash_attn(kv_type, flash_attn)
        check_kv_head(header, kv_type)
        log.info("%s", note)
    if n_ctx is None:
        if rpc:  # the weights are on the servers: this machine's memory does not bound the context
            from chatglm.runtime.rpc import default_context as split_context

            n_ctx = split_context(header)
        else:
            n_ctx = default_context(header, kv_type)
    if n_threads is None:
        from chatglm.runtime.llama_native import physical_cores

        n_threads = physical_cores()
    check_context(n_ctx, n_batch, n_threads)
    if n_gpu_layers == 0 and not rpc:  # everything stays in host memory
        # a P-Tuning prefix takes its own cells beside the context (runtime/ptuning.py)
        n_prefix = header.get(keys.PTUNING_PRE_SEQ_LEN)
        check_fits(header, n_ctx + (n_prefix if type(n_prefix) is int and n_prefix > 0 else 0), kv_type,
                   flash_attn is not False, extra_memory)
    info = describe(header)
    if rpc:
        from chatglm.runtime.rpc_worker import remote_engine

        return remote_engine(header, info, rpc, tensor_split, n_ctx=n_ctx, n_threads=n_threads,
                             n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, kv_type=kv_type, on_progress=on_progress)
    module, _, cls = target.partition(":")
    engine_cls = getattr(importlib.import_module(module), cls)
    return engine_cls(header, info, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers,
                      flash_attn=flash_attn, kv_type=kv_type, on_progress=on_progress, n_batch=n_batch, **options)

"""Thin, checked helpers over llama-cpp-python's low-level bindings (``llama_cpp.llama_cpp``).

Backend initialisation and log routing happen once per process; llama.cpp's log goes to the ``llama.cpp`` logger
(debug level unless ``set_native_verbose(True)``), never straight to the terminal.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from chatglm import limits
from chatglm.errors import InputError, ModelRuntimeError
from chatglm.runtime.engine import ModelInfo, ProgressFn
from chatglm.runtime.memory import params_text
from chatglm.runtime.kv_types import KV_TYPES
from chatglm.runtime.validate import check_context, check_kv_type

native_log = logging.getLogger("llama.cpp")
_verbose = False
_LEVELS = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}


def set_native_verbose(flag: bool) -> None:
    """Show llama.cpp's own log at its real levels (``--verbose``); otherwise it is logged at debug level."""
    global _verbose
    _verbose = flag


@functools.cache
def lib():
    import llama_cpp.llama_cpp as ll

    ll.llama_backend_init()
    cb = ll.llama_log_callback(_route_log)
    ll.llama_log_set(cb, ctypes.c_void_p(0))
    _keep.append(cb)
    return ll


_keep: list = []  # ctypes callbacks that native code holds pointers to


@functools.cache
def mtmd_lib():
    """llama-cpp-python's libmtmd bindings, its log (and its helpers') routed as llama.cpp's is."""
    import llama_cpp.llama_cpp as ll
    from llama_cpp import mtmd_cpp

    lib()
    cb = ll.llama_log_callback(_route_log)
    mtmd_cpp.mtmd_log_set(cb, ctypes.c_void_p(0))
    mtmd_cpp.mtmd_helper_log_set(cb, ctypes.c_void_p(0))
    _keep.append(cb)
    return mtmd_cpp
ABORT_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)
NO_ABORT = ctypes.cast(None, ABORT_CALLBACK)  # a NULL callback: ggml checks nothing between graph nodes


_load_lock = threading.Lock()
_repacked: Optional[list[str]] = None  # names llama.cpp reports repacking while a model loads
_REPACK_LINE = "repack: repack tensor "


def _route_log(level: int, text: bytes, _user) -> None:
    message = text.decode("utf-8", errors="replace").rstrip("\n")
    if _repacked is not None and message.startswith(_REPACK_LINE):
        _repacked.append(message[len(_REPACK_LINE):].split(" ", 1)[0])
    if message:
        native_log.log(_LEVELS.get(level, logging.INFO) if _verbose else logging.DEBUG, "%s", message)


def physical_cores() -> int:
    """Physical cores available to this process (hyperthread siblings counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:
        return max(1, (os.cpu_count() or 2) // 2)
    seen = set()
    for cpu in cpus:
        try:
            seen.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            seen.add(str(cpu))
    return max(1, len(seen))


def load_model(path: Path, *, n_gpu_layers: int, on_progress: Optional[ProgressFn],
               on_repacked: Optional[Callable[[list[str]], None]] = None, devices: Sequence[int] = (),
               tensor_split: Sequence[float] = (), load_mtp: bool = False):
    """Load (memory-mapped) and return the model. ``on_repacked`` is called, during the load and at its end, with the
    names of the weights llama.cpp has finished copying into its CPU repack buffer since the last call, so that their
    mapped source pages can be released (``runtime/pages.py``) before the next ones are copied. ``devices`` (ggml
    device handles, e.g. RPC servers') take the offloaded layers instead of the local GPUs, weighed by
    ``tensor_split`` (at most one weight per device)."""
    global _repacked
    ll = lib()
    params = ll.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.load_mode = 1  # LLAMA_LOAD_MODE_MMAP
    if devices:  # both arrays are read during the load only
        device_list = (ctypes.c_void_p * (len(devices) + 1))(*devices, None)
        params.devices = ctypes.cast(device_list, ctypes.c_void_p).value
    if tensor_split:
        n_max = ll.llama_max_devices()
        if len(tensor_split) > min(n_max, len(devices) or n_max):
            raise InputError(f"--tensor-split gives {len(tensor_split)} weights for {len(devices) or n_max} devices")
        split = (ctypes.c_float * n_max)(*tensor_split)
        params.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
    params.load_mtp = load_mtp  # the NextN layers too (MTP drafting, runtime/speculative_mtp.py)
    handed = 0  # how many of the reported names were given to on_repacked

    def hand_over() -> None:
        nonlocal handed
        if on_repacked is not None and len(_repacked) > handed:
            on_repacked(_repacked[handed:])
            handed = len(_repacked)

    def report(fraction: float, _user) -> bool:
        # called (only while loading) before each tensor: every name reported so far is a finished copy
        hand_over()
        if on_progress is not None:
            on_progress(int(fraction * 1000), 1000)
        return True

    cb = ll.llama_progress_callback(report)
    params.progress_callback = cb
    with _load_lock:
        _repacked = []
        try:
            model = ll.llama_model_load_from_file(os.fsencode(path), params)
            if model:
                hand_over()
        finally:
            _repacked = None
    if not model:
        raise InputError("llama.cpp could not load this model (run with --verbose to see its log)", path)
    return model


def new_context(model, *, n_ctx: int, n_batch: int, n_threads: int, flash_attn: Optional[bool], kv_type: str,
                n_rs_seq: int = 0, ctx_type: int = 0, ctx_other=None):
    """A context for ``model``; ``n_rs_seq``: how many tokens a recurrent state can roll back (snapshots kept);
    ``ctx_type`` 1 with ``ctx_other`` the model's context: its MTP layer's context."""
    ll = lib()
    check_kv_type(kv_type)
    check_context(n_ctx, n_batch, n_threads)
    params = ll.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = n_batch
    params.n_ubatch = n_batch
    params.n_seq_max = 1
    params.n_rs_seq = n_rs_seq
    params.ctx_type = ctx_type
    if ctx_other is not None:
        params.ctx_other = ctx_other
    params.n_threads = n_threads
    params.n_threads_batch = n_threads
    params.flash_attn_type = {None: -1, False: 0, True: 1}[flash_attn]
    params.type_k = KV_TYPES[kv_type].ggml_type
    params.type_v = KV_TYPES[kv_type].ggml_type
    params.no_perf = True
    ctx = ll.llama_init_from_model(model, params)
    if not ctx:
        raise ModelRuntimeError(f"llama.cpp could not create a context of {n_ctx} tokens "
                                "(out of memory? run with --verbose to see its log)")
    return ctx


def fill_batch(batch, tokens: Sequence[int], n_past: int, *, logits_last: bool, logits_all: bool = False) -> None:
    n = len(tokens)
    batch.n_tokens = n
    for i, tok in enumerate(tokens):
        batch.token[i] = tok
        batch.pos[i] = n_past + i
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = logits_all
    if logits_last and n:
        batch.logits[n - 1] = True


def tokenize(vocab, data: bytes) -> list[int]:
    ll = lib()
    capacity = len(data) + 8
    buf = (ll.llama_token * capacity)()
    n = ll.llama_tokenize(vocab, data, len(data), buf, capacity, False, False)
    if n < 0:
        capacity = -n
        buf = (ll.llama_token * capacity)()
        n = ll.llama_tokenize(vocab, data, len(data), buf, capacity, False, False)
        if n < 0:
            raise ModelRuntimeError("tokenization failed")
    return list(buf[:n])


def token_to_piece(vocab, token: int) -> bytes:
    ll = lib()
    size = 32
    while True:
        buf = ctypes.create_string_buffer(size)
        n = ll.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n


def complete_info(info: ModelInfo, model, ctx) -> ModelInfo:
    ll = lib()
    desc = ctypes.create_string_buffer(128)
    ll.llama_model_desc(model, desc, len(desc))
    vocab = ll.llama_model_get_vocab(model)
    n_vocab = ll.llama_vocab_n_tokens(vocab)
    eog = {t for t in info.special.values() if 0 <= t < n_vocab and ll.llama_vocab_is_eog(vocab, t)}
    eog.add(ll.llama_vocab_eos(vocab))
    eog |= {t for t in info.eog if t < n_vocab}  # generation_config.json's eos ids, kept by the converter
    n_params = ll.llama_model_n_params(model)
    # llama.cpp names sizes it knows (6B, 9B) and writes "?B" for the rest: give the count from the tensors instead
    description = desc.value.decode("utf-8", errors="replace").replace("?B", params_text(n_params))
    return replace(info, n_ctx=ll.llama_n_ctx(ctx), n_ctx_train=ll.llama_model_n_ctx_train(model), n_vocab=n_vocab,
                   n_params=n_params, size_bytes=ll.llama_model_size(model), description=description,
                   eog=frozenset(t for t in eog if t >= 0))


class NativeSampler:
    """llama.cpp's own sampler chain (penalties, top-k, top-p, temperature, seeded draw), run in C.

    The repeat penalty sees the last ``repeat_last_n`` tokens already in the cache, prompt included, like the
    numpy sampler does.
    """

    def __init__(self, ctx, vocab, n_vocab: int, params, history: Sequence[int]):
        ll = lib()
        self._ctx = ctx
        self._chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if not self._chain:
            raise ModelRuntimeError("llama.cpp could not create a sampler")
        links = []
        if params.repeat_penalty != 1.0 and params.repeat_last_n:
            links.append(ll.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty,
                                                         0.0, 0.0))
        if params.greedy:
            links.append(ll.llama_sampler_init_greedy())
        else:
            if params.top_k:
                links.append(ll.llama_sampler_init_top_k(params.top_k))
            links.append(ll.llama_sampler_init_top_p(params.top_p, 1))
            links.append(ll.llama_sampler_init_temp(params.temperature))
            seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little")
            links.append(ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        for link in links:
            ll.llama_sampler_chain_add(self._chain, link)
        if params.repeat_penalty != 1.0:
            for token in history[-params.repeat_last_n:] if params.repeat_last_n else ():
                if token >= 0:  # a medium's positions hold no token
                    ll.llama_sampler_accept(self._chain, token)

    def __call__(self) -> int:
        # Samples from the last output's logits and records the token (for the repeat penalty).
        return lib().llama_sampler_sample(self._chain, self._ctx, -1)

    def at(self, i: int) -> int:
        """Sample from the logits of output ``i`` of the last batch (a drafted position), recording the token."""
        return lib().llama_sampler_sample(self._chain, self._ctx, i)

    def close(self) -> None:
        if self._chain:
            lib().llama_sampler_free(self._chain)
            self._chain = None


class ArgmaxSampler:
    """Greedy decoding without a repeat penalty: the first largest logit, as llama.cpp's greedy sampler picks it,
    read in place (the chain would first copy every logit into a candidate array: ~0.3 ms a token at a 65k
    vocabulary). The numpy view of the logits is kept while llama.cpp keeps them at the same address."""

    def __init__(self, ctx, n_vocab: int):
        self._ctx, self._n_vocab = ctx, n_vocab
        self._get = lib().llama_get_logits_ith
        self._row = ctypes.c_float * n_vocab
        self._address, self._view = 0, np.empty(0, dtype=np.float32)

    def __call__(self) -> int:
        return self.at(-1)

    def at(self, i: int) -> int:
        """The token of output ``i`` of the last batch (-1: the last output)."""
        ptr = self._get(self._ctx, i)
        if not ptr:
            raise ModelRuntimeError(f"no logits for output {i} of the last batch")
        address = ctypes.addressof(ptr.contents)
        if address != self._address:
            self._address, self._view = address, np.frombuffer(self._row.from_address(address), dtype=np.float32)
        logits = self._view
        token = int(logits.argmax())
        if logits[token] != logits[token]:  # a NaN: the greedy sampler skips them (and keeps a NaN first one)
            token = 0 if logits[0] != logits[0] else int(np.nanargmax(logits))
        return token

    def close(self) -> None:
        pass


def sampler_for(ctx, vocab, n_vocab: int, params, history: Sequence[int]):
    """The sampler for one generation: llama.cpp's chain, or in place for plain greedy decoding."""
    if params.greedy and (params.repeat_penalty == 1.0 or not params.repeat_last_n):
        return ArgmaxSampler(ctx, n_vocab)
    return NativeSampler(ctx, vocab, n_vocab, params, history)


def load_lora(model, path: Path, arch: str):
    """A llama.cpp LoRA adapter GGUF for ``model``, checked by us first."""
    from chatglm.gguf_file import read_header

    header = read_header(path)
    if header.get("general.type") != "adapter" or header.get("adapter.type") != "lora":
        raise InputError("not a LoRA adapter GGUF (write one with `chatglm lora`)", path)
    if header.arch != arch:
        raise InputError(f"adapter for a {header.arch!r} model, but this model is {arch!r}", path)
    for entry in header.tensors.values():  # llama.cpp checks names and shapes itself (and throws); not types
        if len(entry.shape) != 2 or entry.ggml_type in limits.WEIGHT_TYPES_REFUSED:
            raise InputError(f"adapter tensor {entry.name} must be a matrix of a float or quantized type", path)
    ll = lib()
    adapter = ll.llama_adapter_lora_init(model, os.fsencode(path))
    if not adapter:
        raise InputError("llama.cpp could not load this adapter for this model (tensor names or shapes differ; "
                         "run with --verbose to see its log)", path)
    return adapter


def set_loras(ctx, adapters: Sequence, scales: Sequence[float]) -> None:
    """Make exactly these adapters active on the context, each at its scale."""
    ll = lib()
    n = len(adapters)
    rc = ll.llama_set_adapters_lora(ctx, (ll.llama_adapter_lora_p_ctypes * n)(*adapters), n,
                                    (ctypes.c_float * n)(*scales))
    if rc != 0:
        raise ModelRuntimeError(f"llama.cpp could not attach the LoRA adapters (code {rc})")

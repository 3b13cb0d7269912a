"""The llama.cpp engine (GLM2/3/4 GGUFs) over llama-cpp-python's public low-level C API.

Owns one llama_model, one llama_context and one llama_batch, freed deterministically by ``close``. The decode loop is
the same one llama.cpp's own examples run: no Python work per token beyond filling one batch slot.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from chatglm import families
from chatglm.errors import Cancelled, ContextOverflowError, ModelRuntimeError
from chatglm.families.descriptor import ENGINE_LLAMA
from chatglm.gguf_file import GGUFHeader
from chatglm.runtime import llama_native as native
from chatglm.runtime import pages, ptuning
from chatglm.runtime.engine import Engine, ModelInfo, ProgressFn
from chatglm.runtime.validate import check_context

log = logging.getLogger(__name__)

# The architectures llama.cpp runs here: those of the families whose descriptor names its engine.
LLAMA_ARCHES = tuple(dict.fromkeys(f.arch for f in families.families() if f.engine == ENGINE_LLAMA))


class LlamaEngine(Engine):
    def __init__(self, header: GGUFHeader, info: ModelInfo, *, n_ctx: int, n_threads: int, n_gpu_layers: int = 0,
                 n_batch: int = 512, flash_attn: Optional[bool] = None, kv_type: str = "f16",
                 on_progress: Optional[ProgressFn] = None, devices: Sequence[int] = (),
                 tensor_split: Sequence[float] = (), n_rollback: int = 0, load_mtp: bool = False):
        super().__init__()
        ll = native.lib()
        check_context(n_ctx, n_batch, n_threads)
        self._cancel_event: Optional[threading.Event] = None
        self._model = self._ctx = self._batch = None
        self._loras: list = []
        self.n_threads, self.flash_attn, self.kv_type, self.mtp_loaded = n_threads, flash_attn, kv_type, load_mtp
        self.observer = None  # told of every evaluation and truncation (MTP drafting: runtime/speculative_mtp.py)
        # a P-Tuning prefix holds cells 0..P-1 of the cache, outside self.tokens; the tokens run at positions P...
        prefix = ptuning.read_prefix(header)
        self.n_prefix = 0 if prefix is None else prefix.shape[2]
        # the repacked weights' source pages would otherwise stay resident beside their copies
        releaser = pages.TensorPageReleaser(header)
        self._model = native.load_model(header.path, n_gpu_layers=n_gpu_layers, on_progress=on_progress,
                                        on_repacked=releaser, devices=devices, tensor_split=tensor_split,
                                        load_mtp=load_mtp)
        self.released_bytes = releaser.released
        if releaser.released:
            log.debug("released %.1f MiB of mapped pages held by repacked copies", releaser.released / 2**20)
        try:
            # every native handle is owned by this object from the moment it exists: on any failure close() frees
            # each one once and clears it, so nothing (not __del__ either) frees it again
            # a recurrent state rolls back only as far as llama.cpp keeps snapshots of it (speculative decoding)
            self._recurrent = bool(ll.llama_model_is_recurrent(self._model) or ll.llama_model_is_hybrid(self._model))
            self._ctx = native.new_context(self._model, n_ctx=n_ctx + self.n_prefix, n_batch=n_batch,
                                           n_threads=n_threads, flash_attn=flash_attn, kv_type=kv_type,
                                           n_rs_seq=n_rollback if self._recurrent else 0)
            # ggml calls an abort callback after every graph node (365 calls of ~0.4 µs a token of the ~1.3B ChatGLM3
            # shape): it is installed only while an evaluation can be cancelled (a prompt, a medium), not for steps
            self._abort_cb = native.ABORT_CALLBACK(self._should_abort)
            self._abort_armed = False
            self._vocab = ll.llama_model_get_vocab(self._model)
            self._mem = ll.llama_get_memory(self._ctx)
            # llama.cpp clamps n_batch to the n_ctx asked for and then pads n_ctx up to 256: chunk by what it kept
            # (a batch above it is a GGML_ASSERT in llama_decode)
            self.n_batch = min(n_batch, ll.llama_n_batch(self._ctx))
            self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
            self._n_vocab = ll.llama_vocab_n_tokens(self._vocab)
            self._pieces: dict[int, bytes] = {}
            # SentencePiece vocabularies with a dummy prefix: decoding drops the space it stands for (see detokenize)
            self._dummy_prefix = header.get("tokenizer.ggml.model") == "llama" \
                and header.get("tokenizer.ggml.add_space_prefix") is True
            self.info = native.complete_info(info, self._model, self._ctx)
            if prefix is not None:
                ptuning.install(ll, self._ctx, self._mem, self._batch, self.n_batch, prefix,
                                ptuning.rope_settings(header, prefix), native.fill_batch)
                self.info = replace(self.info, n_ctx=self.info.n_ctx - self.n_prefix, pre_seq_len=self.n_prefix)
        except BaseException:
            self.close()
            raise

    # -- what libmtmd (runtime/mtmd.py) evaluates media with -------------------------------------------------------
    @property
    def native_model(self):
        return self._model

    @property
    def native_context(self):
        return self._ctx

    def set_cancel(self, cancel: Optional[threading.Event]) -> None:
        """The event that aborts llama_decode calls made for this engine by others (libmtmd's helpers)."""
        self._cancel_event = cancel
        self._arm_abort(cancel is not None)

    def _arm_abort(self, armed: bool) -> None:
        """Install the abort callback (or none) on the context, when that changes."""
        if armed != self._abort_armed:
            callback = self._abort_cb if armed else native.NO_ABORT
            native.lib().llama_set_abort_callback(self._ctx, callback, None)
            self._abort_armed = armed

    def _should_abort(self, _data) -> bool:
        event = self._cancel_event
        return bool(event is not None and event.is_set())

    # -- tokenizer --------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        if not text:
            return []
        return native.tokenize(self._vocab, text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            if not 0 <= token < self._n_vocab:
                raise ModelRuntimeError(f"token id {token} is outside the vocabulary (0..{self._n_vocab - 1})")
            piece = self._pieces[token] = native.token_to_piece(self._vocab, token)
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens``, as the tokenizer's own decode gives it: for a SentencePiece vocabulary with a
        dummy prefix, the leading "\u2581" of the first piece with text is dropped (sentencepiece's decode does that;
        llama.cpp's token_to_piece keeps it as a space)."""
        data = b"".join(self.token_bytes(t) for t in tokens)
        if self._dummy_prefix and data[:1] == b" ":
            first = next(t for t in tokens if self.token_bytes(t))
            if native.lib().llama_vocab_get_text(self._vocab, first).startswith("\u2581".encode()):
                data = data[1:]
        return data.decode("utf-8", errors="replace")

    # -- evaluation -------------------------------------------------------------------------------------------
    def _truncate(self, n_keep: int) -> bool:
        # sequence 0, the only one used: llama.cpp's recurrent memory refuses seq_id -1 (linear-attention models)
        if not native.lib().llama_memory_seq_rm(self._mem, 0, self.n_prefix + n_keep, -1):
            return False
        del self.tokens[n_keep:]
        if self.observer is not None:
            self.observer.dropped(self.n_prefix + n_keep)
        return True

    def _drop_unsaved(self) -> None:
        """Forget what a failed or cancelled batch left in the cache (all of it, if the cache cannot roll back)."""
        if not self._truncate(len(self.tokens)):
            self._truncate(0)

    can_speculate = True

    @property
    def rollback_window(self) -> Optional[int]:
        return native.lib().llama_n_rs_seq(self._ctx) if self._recurrent else None

    def eval_all(self, tokens: Sequence[int]) -> None:
        if len(tokens) > self.n_batch:
            raise ModelRuntimeError(f"{len(tokens)} tokens to verify, more than the batch of {self.n_batch}")
        if len(self.tokens) + self.extra_cells + len(tokens) > self.info.n_ctx:
            raise ContextOverflowError(f"the context of {self.info.n_ctx} tokens is full")
        self._eval(tokens, logits_all=True)

    def _eval(self, tokens: Sequence[int], *, cancel: Optional[threading.Event] = None,
              progress: Optional[ProgressFn] = None, logits_all: bool = False) -> None:
        ll = native.lib()
        for tok in tokens:
            if not 0 <= tok < self._n_vocab:
                raise ModelRuntimeError(f"token id {tok} is outside the vocabulary (0..{self._n_vocab - 1})")
        total = len(tokens)
        self._cancel_event = cancel
        self._arm_abort(cancel is not None)
        try:
            for start in range(0, total, self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                pos0 = self.n_prefix + len(self.tokens)
                native.fill_batch(self._batch, chunk, pos0, logits_last=start + len(chunk) == total,
                                  logits_all=logits_all or self.observer is not None)
                rc = ll.llama_decode(self._ctx, self._batch)
                if rc == 2 or (cancel is not None and cancel.is_set()):
                    # llama.cpp keeps what it evaluated of an aborted batch only partly: drop the whole chunk.
                    self._drop_unsaved()
                    raise Cancelled("cancelled")
                if rc != 0:
                    self._drop_unsaved()
                    raise ModelRuntimeError(f"llama_decode failed with code {rc}"
                                            + (" (no room left in the KV cache)" if rc == 1 else ""))
                self.tokens.extend(chunk)
                self.n_evaluated += len(chunk)
                if self.observer is not None:
                    self.observer.evaluated(chunk, pos0)
                if progress:
                    progress(start + len(chunk), total)
        finally:
            self._cancel_event = None

    def apply_lora(self, adapters) -> None:
        if not adapters:
            return
        for path, _ in adapters:
            self._loras.append(native.load_lora(self._model, Path(path), self.info.arch))
        native.set_loras(self._ctx, self._loras, [float(scale) for _, scale in adapters])

    def sampler(self, params) -> "native.NativeSampler | native.ArgmaxSampler":
        return native.sampler_for(self._ctx, self._vocab, self._n_vocab, params, self.tokens)

    def logits(self) -> np.ndarray:
        ptr = native.lib().llama_get_logits_ith(self._ctx, -1)
        if not ptr:
            raise ModelRuntimeError("no logits available: nothing has been evaluated")
        return np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))

    def all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position (evaluated from an empty cache, in batches)."""
        ll = native.lib()
        self.reset()
        out = np.empty((len(tokens), self._n_vocab), dtype=np.float32)
        for start in range(0, len(tokens), self.n_batch):
            chunk = list(tokens[start:start + self.n_batch])
            native.fill_batch(self._batch, chunk, self.n_prefix + len(self.tokens), logits_last=True, logits_all=True)
            rc = ll.llama_decode(self._ctx, self._batch)
            if rc != 0:
                raise ModelRuntimeError(f"llama_decode failed with code {rc}")
            for i in range(len(chunk)):
                out[start + i] = np.ctypeslib.as_array(ll.llama_get_logits_ith(self._ctx, i), shape=(self._n_vocab,))
            self.tokens.extend(chunk)
            self.n_evaluated += len(chunk)
        return out

    def close(self) -> None:
        """Free the batch, adapters, context and model, each at most once (safe to call again, and after a failed
        ``__init__``)."""
        ll = native.lib()
        batch, self._batch = getattr(self, "_batch", None), None
        if batch is not None:
            ll.llama_batch_free(batch)
        loras, self._loras = getattr(self, "_loras", []), []
        for adapter in loras:
            ll.llama_adapter_lora_free(adapter)
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx:
            ll.llama_free(ctx)
        model, self._model = getattr(self, "_model", None), None
        if model:
            ll.llama_model_free(model)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

"""GLM-ASR's rotary encoders in a conversation: the ``chatglm_glmasr_rope`` projector instead of libmtmd.

:class:`AudioContext` is a :class:`~chatglm.runtime.mtmd.MediaContext` (the same prompts, placeholders and cache
reuse) whose media are encoded by our own graph (:mod:`.graph`) and evaluated as embedding batches (``llama_batch``
with ``embd``) at the placeholder's positions. A clip gives, per 30 s window, the embeddings of its audio frames (the
count transformers' processor writes placeholders for); the remote layout puts its begin/end-of-audio embeddings
around them.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Optional

import numpy as np

from chatglm.errors import Cancelled, InputError, ModelRuntimeError
from chatglm.gguf_file import read_header
from chatglm.runtime.glmasr import mel
from chatglm.runtime.glmasr.graph import AudioEncoder
from chatglm.runtime.glmasr.weights import check_header, load
from chatglm.runtime.media import Media
from chatglm.runtime.mtmd import PLACEHOLDER, MediaContext, ProjectorInfo

log = logging.getLogger(__name__)

MAX_WINDOWS = 21  # GlmAsrProcessor's max_audio_len of 655 s, in whole 30 s windows


def clip_samples(media: Media) -> np.ndarray:
    if media.kind != "audio":
        raise InputError(f"the GLM-ASR projector takes audio, not {media.kind}s", media.name)
    return mel.decode_wav(media.data, media.name)


class AudioContext(MediaContext):
    """Our encoder over a loaded llama.cpp engine (same interface as libmtmd's :class:`MediaContext`)."""

    def __init__(self, engine, info: ProjectorInfo, *, n_threads: int):
        self._attach(engine, info)
        self._encoder: Optional[AudioEncoder] = None
        self._weights = self._batch = None
        header = read_header(info.path)
        params = check_header(header, lambda problem: InputError(problem, info.path))
        try:
            self._weights = load(header, params)
            self._encoder = AudioEncoder(self._weights, n_threads)
            from chatglm.runtime.llama_native import lib

            self._batch = lib().llama_batch_init(engine.n_batch, params.n_out, 1)
        except BaseException:
            self.close()
            raise
        self.params = params

    # -- media -> embeddings --------------------------------------------------------------------------------------
    def _tokenize(self, media: Media) -> np.ndarray:
        """The clip's embeddings (tokens, n_out), computed here: prefill asks for them before evaluating."""
        return self.embeddings(media)

    def n_tokens(self, media: Media) -> tuple[int, int]:
        frames = mel.window_frames(len(clip_samples(media)), MAX_WINDOWS)
        n = sum(mel.n_tokens(f, self.params.stack) for f in frames)
        n += 2 if self.params.boa_eoa else 0
        return n, n

    def embeddings(self, media: Media) -> np.ndarray:
        p, enc = self.params, self._encoder
        if enc is None:
            raise ModelRuntimeError("the audio encoder is closed")
        windows = mel.windows(clip_samples(media), p.n_mel, MAX_WINDOWS)
        parts = [enc.encode(w.features)[:mel.n_tokens(w.frames, p.stack)] for w in windows]
        if p.boa_eoa:
            w = self._weights.host
            parts = [w["a.boa"][None], *parts, w["a.eoa"][None]]
        out = np.concatenate(parts)
        if not len(out):
            raise InputError("is too short to give any audio embedding", media.name)
        return out

    # -- prefill hooks ----------------------------------------------------------------------------------------
    def _n_embd(self, tokenized: np.ndarray) -> int:
        return len(tokenized)

    def _release(self, tokenized) -> None:
        pass

    def _eval_medium(self, embd: np.ndarray, cancel: Optional[threading.Event]) -> int:
        """Evaluate the embeddings at the cache's next positions, a batch at a time."""
        from chatglm.runtime.llama_native import lib

        ll, engine, batch = lib(), self.engine, self._batch
        n_past = len(engine.tokens)
        embd = np.ascontiguousarray(embd, dtype=np.float32)
        if embd.ndim != 2 or embd.shape[1] != self.params.n_out:
            raise ModelRuntimeError(f"audio embeddings of shape {embd.shape}, expected (n, {self.params.n_out})")
        engine.set_cancel(cancel)
        try:
            for start in range(0, len(embd), engine.n_batch):
                part = embd[start:start + engine.n_batch]
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                batch.n_tokens = len(part)
                ctypes.memmove(ctypes.cast(batch.embd, ctypes.c_void_p), part.ctypes.data, part.nbytes)
                for i in range(len(part)):
                    batch.pos[i] = engine.n_prefix + n_past + start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = start + i == len(embd) - 1
                rc = ll.llama_decode(engine.native_context, batch)
                if rc != 0:
                    raise Cancelled("cancelled") if rc == 2 else ModelRuntimeError(
                        f"llama_decode failed on the audio embeddings with code {rc}")
                engine.tokens.extend([PLACEHOLDER] * len(part))
        except BaseException:
            engine._truncate(n_past)
            raise
        finally:
            engine.set_cancel(None)
        engine.n_evaluated += len(embd)
        return len(embd)

    def close(self) -> None:
        batch, self._batch = getattr(self, "_batch", None), None
        if batch is not None:
            from chatglm.runtime.llama_native import lib

            lib().llama_batch_free(batch)
        for name in ("_encoder", "_weights"):
            part = getattr(self, name, None)
            setattr(self, name, None)
            if part is not None:
                part.close()

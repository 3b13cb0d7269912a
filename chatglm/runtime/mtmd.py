"""Images and audio through libmtmd (llama.cpp's multimodal library, ``llama_cpp.mtmd_cpp``).

A multimodal GGUF has its projector beside it (``mmproj-<stem>.gguf``, or a file named with ``--mmproj``). The
projector's header is read and checked by us first (architecture ``clip``, a projector type this tool knows, the
width of its output equal to the language model's ``embedding_length``): libmtmd asserts or aborts on mismatches,
so nothing reaches it unchecked. Prompts are the chat format's ids with one placeholder token per medium (the id the
checkpoint's template writes between the begin- and end-of-image tokens); :meth:`MediaContext.prefill` evaluates
the text between them with the engine and each medium as libmtmd's chunk (its embeddings, M-RoPE positions).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from chatglm.errors import Cancelled, ContextOverflowError, InputError, ModelRuntimeError
from chatglm.gguf_file import GGUFHeader, read_header
from chatglm.runtime.engine import ProgressFn
from chatglm.runtime.media import Media

log = logging.getLogger(__name__)

CLIP_ARCH = "clip"
MARKER = "<__chatglm_media__>"
PLACEHOLDER = -1  # what ``engine.tokens`` holds at a medium's positions (no prompt id equals it)


@dataclass(frozen=True)
class ProjectorKind:
    """What this tool knows of one libmtmd projector type: the modality, the tensor whose rows are the output width
    (``None``: the ``projection_dim`` key), and the token the chat template writes in place of each medium."""

    modality: str  # "image" or "audio"
    output: Optional[str]
    placeholder: str


PROJECTORS: dict[str, ProjectorKind] = {
    "glm4v": ProjectorKind("image", "mm.down.weight", "<|image|>"),
    "glm5v": ProjectorKind("image", "mm.down.weight", "<|image|>"),  # GLM-5.3-Flash's vision tower
}


@dataclass(frozen=True)
class ProjectorInfo:
    path: Path
    projector_type: str
    kind: ProjectorKind
    n_embd: int  # the width of the embeddings it gives the language model
    size_bytes: int
    image_size: int = 0
    patch_size: int = 0
    n_merge: int = 1


def mmproj_beside(model_path: Path) -> Path:
    return model_path.with_name(f"mmproj-{model_path.stem}.gguf")


def find_projector(model_path: Path, explicit: Optional[Path] = None) -> Optional[Path]:
    """The projector named with ``--mmproj``, or the one beside the model, or None."""
    if explicit is not None:
        return Path(explicit)
    beside = mmproj_beside(Path(model_path))
    return beside if beside.is_file() else None


def _uint(header: GGUFHeader, key: str, default: Optional[int] = None) -> int:
    value = header.get(key, default)
    if type(value) is not int or value <= 0:
        raise InputError(f"projector key {key} is missing or not a positive integer", header.path)
    return value


def check_projector(path: Path, model: Optional[GGUFHeader] = None) -> ProjectorInfo:
    """Read and check a projector file (against the language model's header when given), before libmtmd."""
    header = read_header(path)
    if header.arch != CLIP_ARCH:
        raise InputError(f"not a multimodal projector (GGUF architecture {header.arch!r}, expected 'clip')", path)
    ptype = header.get("clip.projector_type") or header.get("clip.vision.projector_type") \
        or header.get("clip.audio.projector_type")
    kind = PROJECTORS.get(str(ptype))
    if kind is None:
        raise InputError(f"projector type {ptype!r} is not supported (supported: {', '.join(PROJECTORS)})", path)
    prefix = "vision" if kind.modality == "image" else "audio"
    if header.get(f"clip.has_{prefix}_encoder") is not True:
        raise InputError(f"the {ptype} projector has no {prefix} encoder (clip.has_{prefix}_encoder)", path)
    n_embd = _uint(header, f"clip.{prefix}.projection_dim")
    if kind.output is not None:
        out = header.tensors.get(kind.output)
        if out is None or len(out.shape) != 2:
            raise InputError(f"projector lacks its output tensor {kind.output}", path)
        if out.shape[1] != n_embd:
            raise InputError(f"projector output {kind.output} is {out.shape[1]} wide but projection_dim says "
                             f"{n_embd}", path)
    info = ProjectorInfo(path, str(ptype), kind, n_embd, header.file_size,
                         image_size=header.get("clip.vision.image_size", 0) or 0,
                         patch_size=header.get("clip.vision.patch_size", 0) or 0,
                         n_merge=header.get("clip.vision.spatial_merge_size", 1) or 1)
    if model is not None:
        width = model.arch_get("embedding_length")
        if width != n_embd:
            raise InputError(f"this projector gives embeddings {n_embd} wide but the model {model.path.name} takes "
                             f"{width} (a projector of another model?)", path)
    return info


def image_tokens(info: ProjectorInfo, width: int, height: int) -> int:
    """Embeddings an image of ``width`` x ``height`` takes (an estimate for memory: the size libmtmd encodes it at)."""
    unit = max(1, info.patch_size * info.n_merge)
    return max(1, (width // unit) * (height // unit))


def _mtmd():
    from llama_cpp import mtmd_cpp

    return mtmd_cpp


class MediaContext:
    """libmtmd over a loaded llama.cpp engine: encodes media and evaluates prompts that hold them."""

    def __init__(self, engine, info: ProjectorInfo, *, n_threads: int):
        m = _mtmd()
        self.engine, self.info = engine, info
        self.placeholder_id = engine.info.added.get(info.kind.placeholder, engine.info.special.get(
            info.kind.placeholder))
        if self.placeholder_id is None:
            raise InputError(f"the model's vocabulary has no {info.kind.placeholder} token for the {info.projector_type} "
                             "projector", info.path)
        params = m.mtmd_context_params_default()
        params.use_gpu = False
        params.print_timings = False
        params.n_threads = n_threads
        params.warmup = False
        self._marker = MARKER.encode()
        params.media_marker = self._marker
        self._ctx = m.mtmd_init_from_file(str(info.path).encode(), engine.native_model, params)
        if not self._ctx:
            raise InputError("libmtmd could not load this projector", info.path)

    # -- media -> chunks ----------------------------------------------------------------------------------------
    def _tokenize(self, media: Media):
        """(chunks, index of the medium's chunk) for one medium: libmtmd decodes the bytes (its stb_image /
        miniaudio helpers) and tokenizes the marker alone."""
        m = _mtmd()
        buf = (ctypes.c_uint8 * len(media.data)).from_buffer_copy(media.data)
        bitmap = m.mtmd_helper_bitmap_init_from_buf(self._ctx, buf, len(media.data), False)
        if not bitmap:
            raise InputError(f"the {media.kind} could not be decoded", media.name)
        chunks = m.mtmd_input_chunks_init()
        try:
            text = m.mtmd_input_text(self._marker, len(self._marker), False, True)
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise InputError(f"libmtmd refused the {media.kind} (code {rc})", media.name)
            for i in range(m.mtmd_input_chunks_size(chunks)):
                if m.mtmd_input_chunk_get_type(m.mtmd_input_chunks_get(chunks, i)) != m.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    return chunks, i
            raise InputError(f"libmtmd made no chunk of the {media.kind}", media.name)
        except BaseException:
            m.mtmd_input_chunks_free(chunks)
            raise
        finally:
            m.mtmd_bitmap_free(bitmap)

    def n_tokens(self, media: Media) -> tuple[int, int]:
        """(embeddings, positions) the medium takes."""
        m = _mtmd()
        chunks, i = self._tokenize(media)
        try:
            chunk = m.mtmd_input_chunks_get(chunks, i)
            return m.mtmd_input_chunk_get_n_tokens(chunk), m.mtmd_input_chunk_get_n_pos(chunk)
        finally:
            m.mtmd_input_chunks_free(chunks)

    def embeddings(self, media: Media) -> np.ndarray:
        """The projector's output for one medium: (tokens, n_embd) float32."""
        m = _mtmd()
        chunks, i = self._tokenize(media)
        try:
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_encode_chunk(self._ctx, chunk) != 0:
                raise ModelRuntimeError(f"libmtmd failed to encode the {media.kind}")
            n = m.mtmd_input_chunk_get_n_tokens(chunk)
            ptr = m.mtmd_get_output_embd(self._ctx)
            return np.ctypeslib.as_array(ptr, shape=(n, self.info.n_embd)).copy()
        finally:
            m.mtmd_input_chunks_free(chunks)

    # -- prompts ------------------------------------------------------------------------------------------------
    def expanded_ids(self, ids: Sequence[int], media: Sequence[Media]) -> list[int]:
        """The prompt as the checkpoint's processor writes it: each placeholder repeated once per embedding."""
        self.check_placeholders(ids, media)
        out: list[int] = []
        it = iter(media)
        for t in ids:
            out += [t] * self.n_tokens(next(it))[0] if t == self.placeholder_id else [t]
        return out

    def check_placeholders(self, ids: Sequence[int], media: Sequence[Media]) -> None:
        n = sum(1 for t in ids if t == self.placeholder_id)
        if n != len(media):
            raise InputError(f"the prompt holds {n} {self.info.kind.placeholder} placeholders for {len(media)} "
                             f"{self.info.kind.modality}s (does the chat format place {self.info.kind.modality}s?)")

    def prefill(self, ids: Sequence[int], media: Sequence[Media], *, cancel: Optional[threading.Event] = None,
                progress: Optional[ProgressFn] = None) -> int:
        """Make the engine's cache hold ``ids`` with each placeholder replaced by its medium; returns the entries
        evaluated. The cached prefix before the first medium is kept."""
        m = _mtmd()
        engine = self.engine
        ids = list(ids)
        self.check_placeholders(ids, media)
        first = ids.index(self.placeholder_id) if media else len(ids)
        keep = min(engine.reusable(ids[:first]), len(ids) - 1)
        if engine._truncate(keep) is False:
            engine._truncate(0)
            keep = 0
        engine.tokens = ids[:keep]
        tokenized = [self._tokenize(x) for x in media]
        try:
            cells = len(ids) - len(media) + sum(m.mtmd_input_chunk_get_n_tokens(m.mtmd_input_chunks_get(c, i))
                                                for c, i in tokenized)
            if cells > engine.info.n_ctx:
                raise ContextOverflowError(f"the prompt with its {len(media)} media needs {cells} tokens, more than "
                                           f"the context of {engine.info.n_ctx}")
            done, todo = 0, ids[keep:]
            segment: list[int] = []
            chunk_of = iter(tokenized)
            for t in todo:
                if t != self.placeholder_id:
                    segment.append(t)
                    continue
                if segment:
                    engine._eval(segment, cancel=cancel)
                    done += len(segment)
                    segment = []
                chunks, i = next(chunk_of)
                done += self._eval_chunk(m.mtmd_input_chunks_get(chunks, i), cancel)
                if progress:
                    progress(done, cells)
            if segment:
                engine._eval(segment, cancel=cancel)
                done += len(segment)
            return done
        finally:
            for chunks, _ in tokenized:
                m.mtmd_input_chunks_free(chunks)

    def _eval_chunk(self, chunk, cancel: Optional[threading.Event]) -> int:
        m = _mtmd()
        engine = self.engine
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")
        n_past = len(engine.tokens)
        new_n_past = ctypes.c_int32(n_past)
        engine.set_cancel(cancel)
        try:
            rc = m.mtmd_helper_eval_chunk_single(self._ctx, engine.native_context, chunk, n_past, 0, engine.n_batch,
                                                 False, ctypes.byref(new_n_past))
        finally:
            engine.set_cancel(None)
        if rc != 0 or (cancel is not None and cancel.is_set()):
            engine._truncate(n_past)
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            raise ModelRuntimeError(f"libmtmd failed to evaluate a medium (code {rc})")
        engine.tokens.extend([PLACEHOLDER] * (new_n_past.value - n_past))
        n = m.mtmd_input_chunk_get_n_tokens(chunk)
        engine.n_evaluated += n
        return n

    def close(self) -> None:
        ctx, self._ctx = getattr(self, "_ctx", None), None
        if ctx:
            _mtmd().mtmd_free(ctx)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

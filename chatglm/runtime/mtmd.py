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

from chatglm import families
from chatglm.errors import Cancelled, ContextOverflowError, InputError, ModelRuntimeError
from chatglm.gguf_file import GGUFHeader, read_header
from chatglm.runtime.engine import ProgressFn
from chatglm.families.descriptor import MediaProjector
from chatglm.runtime.media import Media

log = logging.getLogger(__name__)

CLIP_ARCH = "clip"
MARKER = "<__chatglm_media__>"
AUDIO_POSITIONS = 1500  # an audio encoder's positions per 30 s window (3000 mel frames, a stride-2 conv)
PLACEHOLDER = -1  # what ``engine.tokens`` holds at a medium's positions (no prompt id equals it)


@dataclass(frozen=True)
class ProjectorInfo:
    path: Path
    projector_type: str
    kind: MediaProjector
    n_embd: int  # the width of the embeddings it gives the language model
    size_bytes: int
    image_size: int = 0
    patch_size: int = 0
    n_merge: int = 1
    n_embd_vision: int = 0
    n_head_vision: int = 0


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
    known = families.projectors()
    kind = known.get(str(ptype))
    if kind is None:
        raise InputError(f"projector type {ptype!r} is not supported (supported: {', '.join(known)})", path)
    prefix = "vision" if kind.modality == "image" else "audio"
    if header.get(f"clip.has_{prefix}_encoder") is not True:
        raise InputError(f"the {ptype} projector has no {prefix} encoder (clip.has_{prefix}_encoder)", path)
    n_embd = _uint(header, f"clip.{prefix}.projection_dim")
    out = header.tensors.get(kind.output)
    if out is None or len(out.shape) != 2:
        raise InputError(f"projector lacks its output tensor {kind.output}", path)
    if out.shape[1] != n_embd:
        raise InputError(f"projector output {kind.output} is {out.shape[1]} wide but projection_dim says {n_embd}",
                         path)
    check = getattr(families.part(families.projector_owner(str(ptype)), "chat"), "check_projector", None)
    if check is not None:
        check(header, lambda problem: InputError(problem, path))
    info = ProjectorInfo(path, str(ptype), kind, n_embd, header.file_size,
                         image_size=header.get("clip.vision.image_size", 0) or 0,
                         patch_size=header.get("clip.vision.patch_size", 0) or 0,
                         n_merge=header.get("clip.vision.spatial_merge_size", 1) or 1,
                         n_embd_vision=header.get(f"clip.{prefix}.embedding_length", 0) or 0,
                         n_head_vision=header.get(f"clip.{prefix}.attention.head_count", 0) or 0)
    if model is not None:
        width = model.arch_get("embedding_length")
        if width != n_embd:
            raise InputError(f"this projector gives embeddings {n_embd} wide but the model {model.path.name} takes "
                             f"{width} (a projector of another model?)", path)
    return info


def image_cost(info: ProjectorInfo, width: int, height: int) -> tuple[int, int]:
    """(embeddings, encoder patches) an image of ``width`` x ``height`` takes: an estimate for memory. The family that
    owns the projector type may say it (``image_cost`` in its chat module: a projector that resizes every image to
    one size, or adds begin/end embeddings); otherwise the image is cut in patches of its own size and merged."""
    owner = families.part(families.projector_owner(info.projector_type), "chat")
    hook = getattr(owner, "image_cost", None)
    if hook is not None:
        return hook(info, width, height)
    unit = max(1, info.patch_size * info.n_merge)
    tokens = max(1, (width // unit) * (height // unit))
    return tokens, tokens * info.n_merge ** 2


@dataclass(frozen=True)
class ProjectorEstimate:
    """The projector beside a model: its weights, the encoder's compute buffer for the largest image, and the image
    tokens (KV-cache entries) the images take."""

    path: str
    projector_type: str
    weights: int
    compute: int
    image_tokens: int

    @property
    def total(self) -> int:
        return self.weights + self.compute


def projector_estimate(model_path, mmproj=None, images=()) -> "ProjectorEstimate | None":
    """The estimate for the projector found beside ``model_path`` (or ``mmproj``), None when there is none.
    ``images``: (width, height) of the images to encode; none given: one image of the projector's own size."""
    path = find_projector(Path(model_path), Path(mmproj) if mmproj is not None else None)
    if path is None:
        return None
    info = check_projector(path)
    if info.kind.modality == "audio":  # a 30 s window at a time: 1500 positions, every head's scores at once
        n = AUDIO_POSITIONS
        compute = 4 * n * (16 * info.n_embd_vision + max(1, info.n_head_vision) * n)
        return ProjectorEstimate(str(path), info.projector_type, info.size_bytes, compute, 0)
    sizes = list(images) or [(info.image_size, info.image_size)]
    costs = [image_cost(info, w, h) for w, h in sizes]
    tokens = [t for t, _ in costs]
    patches = max(p for _, p in costs)
    # a ViT layer's activations (a few of n_embd per patch, float32) and one head's attention scores at a time
    compute = 4 * patches * (16 * info.n_embd_vision + max(1, info.n_head_vision) * patches)
    return ProjectorEstimate(str(path), info.projector_type, info.size_bytes, compute, sum(tokens))


def _image_bitmap(m, media: Media):
    """An image decoded by libmtmd's own stb_image into an RGB bitmap. Not through mtmd_helper_bitmap_init_from_buf:
    on a buffer stb_image cannot decode, that helper hands the bytes to an ``ffmpeg`` found on PATH (its video
    fallback), and no outside program may see a request's bytes."""
    lib = m._libmtmd
    load, free = lib.stbi_load_from_memory, lib.stbi_image_free
    load.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int),
                     ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    load.restype = ctypes.POINTER(ctypes.c_ubyte)
    free.argtypes, free.restype = [ctypes.c_void_p], None
    nx, ny, nc = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    pixels = load(media.data, len(media.data), ctypes.byref(nx), ctypes.byref(ny), ctypes.byref(nc), 3)
    if not pixels:
        return None
    try:
        return m.mtmd_bitmap_init(nx.value, ny.value, pixels)  # copies the pixels
    finally:
        free(pixels)


def _audio_bitmap(m, ctx, media: Media):
    """Audio decoded by libmtmd's helper (miniaudio; the bytes were checked to be WAV, MP3 or FLAC, which it takes
    before any fallback)."""
    buf = (ctypes.c_uint8 * len(media.data)).from_buffer_copy(media.data)
    return m.mtmd_helper_bitmap_init_from_buf(ctx, buf, len(media.data), False)


def _mtmd():
    from chatglm.runtime.llama_native import mtmd_lib

    return mtmd_lib()


class MediaContext:
    """libmtmd over a loaded llama.cpp engine: encodes media and evaluates prompts that hold them."""

    def __init__(self, engine, info: ProjectorInfo, *, n_threads: int):
        m = _mtmd()
        self._attach(engine, info)
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

    def _attach(self, engine, info: ProjectorInfo) -> None:
        """The engine, the projector and its placeholder id; nothing evaluated yet."""
        self.engine, self.info = engine, info
        self.placeholder_id = engine.info.added.get(info.kind.placeholder, engine.info.special.get(
            info.kind.placeholder))
        if self.placeholder_id is None:
            raise InputError(f"the model's vocabulary has no {info.kind.placeholder} token for the "
                             f"{info.projector_type} projector", info.path)
        # cache position -> (positions, embeddings, bytes) of each medium the cache holds
        self._evaluated: dict[int, tuple[int, int, bytes]] = {}

    # -- media -> chunks ----------------------------------------------------------------------------------------
    def _tokenize(self, media: Media):
        """(chunks, indices of the medium's chunks) for one medium: libmtmd decodes the bytes (its stb_image /
        miniaudio helpers) and tokenizes the marker alone. Audio gives one chunk per 30 s (a clip of 30 s or more
        several)."""
        m = _mtmd()
        bitmap = _image_bitmap(m, media) if media.kind == "image" else _audio_bitmap(m, self._ctx, media)
        if not bitmap:
            raise InputError(f"the {media.kind} could not be decoded", media.name)
        chunks = m.mtmd_input_chunks_init()
        try:
            text = m.mtmd_input_text(self._marker, len(self._marker), False, True)
            bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
            rc = m.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1)
            if rc != 0:
                raise InputError(f"libmtmd refused the {media.kind} (code {rc})", media.name)
            found = [i for i in range(m.mtmd_input_chunks_size(chunks))
                     if m.mtmd_input_chunk_get_type(m.mtmd_input_chunks_get(chunks, i)) != m.MTMD_INPUT_CHUNK_TYPE_TEXT]
            if found:
                return chunks, found
            raise InputError(f"libmtmd made no chunk of the {media.kind}", media.name)
        except BaseException:
            m.mtmd_input_chunks_free(chunks)
            raise
        finally:
            m.mtmd_bitmap_free(bitmap)

    def n_tokens(self, media: Media) -> tuple[int, int]:
        """(embeddings, positions) the medium takes."""
        m = _mtmd()
        chunks, found = self._tokenize(media)
        try:
            parts = [m.mtmd_input_chunks_get(chunks, i) for i in found]
            return (sum(m.mtmd_input_chunk_get_n_tokens(c) for c in parts),
                    sum(m.mtmd_input_chunk_get_n_pos(c) for c in parts))
        finally:
            m.mtmd_input_chunks_free(chunks)

    def embeddings(self, media: Media) -> np.ndarray:
        """The projector's output for one medium: (tokens, n_embd) float32."""
        m = _mtmd()
        chunks, found = self._tokenize(media)
        try:
            out = []
            for i in found:
                chunk = m.mtmd_input_chunks_get(chunks, i)
                if m.mtmd_encode_chunk(self._ctx, chunk) != 0:
                    raise ModelRuntimeError(f"libmtmd failed to encode the {media.kind}")
                n = m.mtmd_input_chunk_get_n_tokens(chunk)
                out.append(np.ctypeslib.as_array(m.mtmd_get_output_embd(self._ctx), shape=(n, self.info.n_embd)).copy())
            return np.concatenate(out)
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
        evaluated. What the cache already holds of them (text and the same media at the same places) stays."""
        engine = self.engine
        ids = list(ids)
        self.check_placeholders(ids, media)
        n_ids, n_pos, n_media = self._reusable(ids, media)
        if engine._truncate(n_pos) is False:
            engine._truncate(0)
            n_ids = n_pos = n_media = 0
        engine.tokens = engine.tokens[:n_pos]
        self._evaluated = {p: r for p, r in self._evaluated.items() if p < n_pos}
        engine.extra_cells = sum(r[1] - r[0] for r in self._evaluated.values())
        tokenized = [self._tokenize(x) for x in media[n_media:]]
        try:
            sizes = [r[1] for p, r in sorted(self._evaluated.items())] + [self._n_embd(t) for t in tokenized]
            cells = len(ids) - len(media) + sum(sizes)
            if cells > engine.info.n_ctx:
                raise ContextOverflowError(f"the prompt with its {len(media)} media needs {cells} tokens, more than "
                                           f"the context of {engine.info.n_ctx}")
            done = 0
            segment: list[int] = []
            todo = iter(zip(tokenized, media[n_media:]))
            for t in ids[n_ids:]:
                if t != self.placeholder_id:
                    segment.append(t)
                    continue
                if segment:
                    engine._eval(segment, cancel=cancel)
                    done += len(segment)
                    segment = []
                prepared, medium = next(todo)
                pos = len(engine.tokens)
                n = self._eval_medium(prepared, cancel)
                done += n
                self._evaluated[pos] = (len(engine.tokens) - pos, n, medium.data)
                engine.extra_cells += n - (len(engine.tokens) - pos)
                if progress:
                    progress(done, cells)
            if segment:
                engine._eval(segment, cancel=cancel)
                done += len(segment)
            return done
        finally:
            for t in tokenized:
                self._release(t)

    # what prefill does with one medium's _tokenize result: its embeddings, evaluating them, freeing it
    def _n_embd(self, tokenized) -> int:
        m = _mtmd()
        chunks, found = tokenized
        return sum(m.mtmd_input_chunk_get_n_tokens(m.mtmd_input_chunks_get(chunks, i)) for i in found)

    def _eval_medium(self, tokenized, cancel: Optional[threading.Event]) -> int:
        chunks, found = tokenized
        return sum(self._eval_chunk(_mtmd().mtmd_input_chunks_get(chunks, i), cancel) for i in found)

    def _release(self, tokenized) -> None:
        _mtmd().mtmd_input_chunks_free(tokenized[0])

    def _reusable(self, ids: list[int], media: Sequence[Media]) -> tuple[int, int, int]:
        """(ids, cache positions, media) of the prompt the cache already holds: the same text, and the same media
        at the same positions; at least the last id is left to evaluate (its logits)."""
        cached, i, j, k = self.engine.tokens, 0, 0, 0
        marks = [(0, 0, 0)]  # (i, j, k) after each id, to step back from
        while i < len(ids) and j < len(cached):
            if ids[i] == self.placeholder_id:
                record = self._evaluated.get(j)
                if record is None or record[2] != media[k].data or cached[j:j + record[0]] != [PLACEHOLDER] * record[0]:
                    break
                i, j, k = i + 1, j + record[0], k + 1
            elif ids[i] == cached[j]:
                i, j = i + 1, j + 1
            else:
                break
            marks.append((i, j, k))
        while marks[-1][0] >= len(ids):
            marks.pop()
        return marks[-1]

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

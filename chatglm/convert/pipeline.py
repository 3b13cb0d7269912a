"""The conversion pipeline: checkpoint folder → one GGUF, one tensor at a time, written atomically."""

from __future__ import annotations

import logging
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import gguf
import numpy as np

from chatglm import __version__
from chatglm.convert import qtypes
from chatglm.convert.chat_meta import write_chat_metadata
from chatglm.convert.gguf_writer import CheckedWriter, DataSection, Progress, TensorInfo, display_name, write_header
from chatglm.convert.checkpoint import Checkpoint, CheckpointView
from chatglm.convert.family import Family, OutTensor, check_complete, detect
from chatglm.convert.mmproj import (CLIP_ARCH, DEFAULT_MMPROJ_TYPE, KEY_PROJ_TYPE, MMPROJ_FTYPES, Projector, mmproj_path, mmproj_qtype,
                                    plan_projector, stored_type)
from chatglm.convert.lora import merged
from chatglm.convert.ptuning import check_prefix_type, has_prefix, load_prefix, open_ptuning, write_prefix
from chatglm.convert.thudm_quant import dequantized
from chatglm.convert.threads import quant_threads
from chatglm.errors import InputError
from chatglm.fsutil import atomic_path
from chatglm.ggml import quants
from chatglm.schema import keys

log = logging.getLogger(__name__)

@dataclass
class ConvertResult:
    path: Path
    family: str
    arch: str
    qtype: str
    n_tensors: int
    nbytes: int
    seconds: float
    mmproj: Optional[Path] = None  # the projector written beside the model (vision and speech checkpoints)


@dataclass
class Planned:
    tensor: OutTensor
    qtype: gguf.GGMLQuantizationType
    nbytes: int


def default_output(model_dir: Path, qtype: str) -> Path:
    return Path.cwd() / f"{model_dir.resolve().name}-{qtype.lower()}.gguf"


def convert(
    model_dir: os.PathLike | str,
    out: Optional[os.PathLike | str] = None,
    qtype: str = "f16",
    *,
    imatrix: Optional[os.PathLike | str] = None,
    threads: Optional[int] = None,
    progress: Optional[Progress] = None,
    lora: Sequence[os.PathLike | str] = (),
    lora_scale: float | Sequence[float] = 1.0,
    mmproj: bool = True,
    mmproj_type: str = DEFAULT_MMPROJ_TYPE,
    ptuning: Optional[os.PathLike | str] = None,
    ptuning_type: str = "f32",
) -> ConvertResult:
    """Convert a Hugging Face checkpoint folder to a GGUF file of the given type (or mixed recipe).

    THUDM int4/int8 checkpoints are dequantized on the fly; ``lora`` adapters (PEFT folders) are merged into the
    weights, each scaled by ``lora_scale`` (one value for all, or one per adapter). A vision or speech checkpoint's
    projector is written beside the output as ``mmproj-<stem>.gguf`` (``mmproj_type``; ``mmproj=False`` skips it);
    both files appear together or neither does. A P-Tuning v2 prefix (``ptuning``, a folder with the trained
    ``prefix_encoder``, a PEFT prefix-tuning adapter, or ``model_dir`` itself when it is a full P-Tuning checkpoint)
    is evaluated and written into the GGUF's metadata (``convert/ptuning.py``) as ``ptuning_type`` (f32 or f16).
    """
    start = time.perf_counter()
    recipe = qtypes.get_recipe(qtype)
    check_prefix_type(ptuning_type)
    threads = quant_threads(threads)
    model_dir = Path(model_dir)
    with Checkpoint(model_dir) as raw, (open_ptuning(ptuning) if ptuning is not None else nullcontext()) as pt:
        ckpt = merged(dequantized(raw), lora, lora_scale)
        family = detect(ckpt)
        prefix = None
        if pt is not None or has_prefix(raw):
            prefix = load_prefix(raw, pt, family, ptuning_type)
        plan = family.tensors()
        projector = family.projector()
        projector_plan = plan_projector(projector) if projector is not None else []
        check_complete(family, plan, projector_plan)
        mmproj_qtype(mmproj_type)
        family.check_shapes(plan)
        importance = load_imatrix(imatrix, plan) if imatrix is not None else None
        planned = _plan_types(family, plan, recipe, has_imatrix=importance is not None)
        dest = Path(out) if out is not None else default_output(model_dir, qtype)
        total = sum(p.nbytes for p in planned)
        with atomic_path(dest, sources=[model_dir, imatrix, ptuning, *lora]) as tmp:  # never over one of the inputs
            writer = CheckedWriter(tmp, family.arch, family.config_path)
            write_model_metadata(writer, family, recipe, display_name(family.ckpt.dir))
            if prefix is not None:
                write_prefix(writer, prefix)
            alignment = write_header(writer, [TensorInfo(p.tensor.name, p.tensor.shape, p.qtype, p.nbytes)
                                              for p in planned])
            with open(tmp, "r+b") as fh:
                section = DataSection(fh, alignment, total, progress)
                for p in planned:
                    section.write(p.tensor.name, p.nbytes, encoded_blocks(family.ckpt, p, importance, threads))
            side = mmproj_path(dest) if projector is not None and mmproj else None
            if side is not None:
                with atomic_path(side, sources=[model_dir, imatrix, *lora]) as side_tmp:
                    write_projector(projector, projector_plan, side_tmp, mmproj_type, display_name(family.ckpt.dir),
                                    threads)
    seconds = time.perf_counter() - start
    log.info("wrote %s: %d tensors, %d bytes in %.1fs", dest, len(planned), total, seconds)
    return ConvertResult(dest, family.name, family.arch, recipe.name, len(planned), dest.stat().st_size, seconds,
                         side)


def write_projector(projector: Projector, plan: list[OutTensor], tmp: Path, qtype: str, name: str,
                    threads: Optional[int] = None) -> int:
    """Write the projector to ``tmp`` (the caller's atomic path, a ``clip`` GGUF); returns the bytes of tensor
    data written."""
    choice = mmproj_qtype(qtype)
    planned = []
    for t in plan:
        stored = stored_type(t.name, t.shape, choice, projector.f32_tensors)
        planned.append(Planned(t, stored, quants.tensor_nbytes(stored, t.shape)))
    w = CheckedWriter(tmp, CLIP_ARCH, projector.family.config_path)
    w.add_name(name)
    w.add_file_type(int(MMPROJ_FTYPES[choice]))
    w.add_string(keys.CONVERTER, f"chatglm {__version__}")
    w.add_string(KEY_PROJ_TYPE, projector.projector_type)
    projector.write_metadata(w)
    alignment = write_header(w, [TensorInfo(p.tensor.name, p.tensor.shape, p.qtype, p.nbytes) for p in planned])
    total = sum(p.nbytes for p in planned)
    with open(tmp, "r+b") as fh:
        section = DataSection(fh, alignment, total)
        for p in planned:
            section.write(p.tensor.name, p.nbytes, encoded_blocks(projector.ckpt, p, None, quant_threads(threads)))
    return total


def _plan_types(family: Family, plan: list[OutTensor], recipe: qtypes.Recipe, has_imatrix: bool) -> list[Planned]:
    hp = family.hp
    model = qtypes.ModelInfo(family.arch, family.n_block, hp.n_head, hp.n_head_kv, getattr(hp, "n_expert", 0))
    types = qtypes.plan_types(recipe, [(t.name, t.shape) for t in plan], model, has_imatrix=has_imatrix)
    return [Planned(t, types[t.name], quants.tensor_nbytes(types[t.name], t.shape)) for t in plan]


def load_imatrix(path: os.PathLike | str, plan: list[OutTensor]) -> dict[str, np.ndarray]:
    """Per-tensor importance for the quantizer, checked against this model's tensors."""
    return importance_for(path, {t.name: t.shape for t in plan})


def importance_for(path: os.PathLike | str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    """The importance matrix at ``path`` as the quantizer takes it, for the tensors of numpy ``shapes``: (cols,)
    values for a matrix, (n_expert, cols) for expert tensors. InputError when it belongs to another model."""
    from chatglm.convert.imatrix import load_imatrix as read

    matrix = read(path)
    matrix.check_model(shapes)
    out = {}
    for name, shape in shapes.items():
        values = matrix.for_tensor(name, shape)
        if values is not None:
            out[name] = values.reshape(shape[0], shape[-1]) if len(shape) == 3 else values.reshape(shape[-1])
    return out


def write_model_metadata(w: gguf.GGUFWriter, family: Family, recipe: qtypes.Recipe, name: str,
                         converter: str = "") -> None:
    """Every key-value pair of a converted file: general keys, ours (glm.*), the family's hparams and tokenizer."""
    w.add_name(name)
    w.add_file_type(recipe.ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string(keys.FAMILY, family.name)
    w.add_string(keys.CHAT_FORMAT, getattr(family, "chat_format", family.name))
    w.add_string(keys.CONVERTER, f"chatglm {__version__}" + (f" {converter}" if converter else ""))
    family.write_metadata(w)
    family.write_vocab(w)
    tokens = w.kv_data[0].get(gguf.Keys.Tokenizer.LIST)
    write_chat_metadata(w, family.ckpt, len(tokens.value) if tokens is not None else 0)


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix, threads: int) -> np.ndarray:
    """float32 data in the file's encoding for ``qtype`` (f32 as is, f16 by numpy's rounding, the rest by ggml)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    rows = data.reshape(-1, data.shape[-1]) if data.ndim < 3 else data  # (rows, cols) or (experts, rows, cols)
    return quants.quantize(rows, qtype, imatrix=imatrix, threads=threads)


# float32 elements a streamed tensor holds at a time (64 MiB): the largest ChatGLM3-6B tensor is 1 GiB in float32.
STREAM_ELEMENTS = 1 << 24


def row_blocks(shape: Sequence[int], max_elements: Optional[int] = None) -> list[tuple[int, int, int]]:
    """(matrix, first row, stop row) blocks of whole rows covering a tensor of numpy ``shape``, each of at most
    ``max_elements`` (default :data:`STREAM_ELEMENTS`) elements or one row, never crossing a matrix (expert)
    boundary. A 1-D tensor is one row."""
    if len(shape) < 2:
        return [(0, 0, 1)]
    n_mats, n_rows, n_cols = math.prod(shape[:-2]), shape[-2], shape[-1]
    step = max(1, (max_elements or STREAM_ELEMENTS) // max(1, n_cols))
    return [(m, r, min(r + step, n_rows)) for m in range(n_mats) for r in range(0, n_rows, step)]


def encode_rows(rows: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix, threads: int, first: int = 0) -> np.ndarray:
    """:func:`encode` of a block of rows that starts at row ``first`` of its tensor; a NaN or infinity is reported
    with its row number in the tensor."""
    try:
        return encode(rows, qtype, imatrix, threads)
    except InputError as exc:
        bad = np.flatnonzero(~np.isfinite(rows.reshape(-1, rows.shape[-1])).all(axis=1))
        problem = f"row {first + bad[0]} holds NaN or infinite values" if bad.size else exc.problem
        raise InputError(problem) from None


def _streams(ckpt: Checkpoint | CheckpointView, t: OutTensor) -> bool:
    """Whether a tensor is copied from one source matrix, so it can be read and encoded a block of rows at a time."""
    return isinstance(ckpt, Checkpoint) and t.is_copy and len(t.shape) == 2


def encoded_blocks(ckpt: Checkpoint | CheckpointView, p: Planned, importance, threads: int) -> Iterator[np.ndarray]:
    """The planned tensor in its file encoding, as consecutive blocks of rows (one block unless it streams)."""
    t, source = p.tensor, p.tensor.sources[0]
    imatrix = importance.get(t.name) if importance else None
    if isinstance(ckpt, Checkpoint) and t.is_expert_stack:
        yield from _expert_blocks(ckpt, p, imatrix, threads)
        return
    if not _streams(ckpt, t):
        yield _materialize(ckpt, p, imatrix, threads)
        return
    if tuple(ckpt.info(source).shape) != t.shape:
        raise InputError(f"tensor {source!r} has shape {list(ckpt.info(source).shape)}, expected {list(t.shape)}",
                         ckpt.file_of(source))
    for _, first, stop in row_blocks(t.shape):
        rows = np.ascontiguousarray(ckpt.load_rows(source, first, stop), dtype=np.float32)  # (stop - first, cols)
        try:
            yield encode_rows(rows, p.qtype, imatrix, threads, first)
        except InputError as exc:
            raise InputError(f"tensor {source!r}: {exc.problem}", ckpt.file_of(source)) from None


def _expert_blocks(ckpt: Checkpoint, p: Planned, imatrix, threads: int) -> Iterator[np.ndarray]:
    """A stack of expert matrices encoded expert by expert, a block of rows at a time (the bytes of the stacked
    tensor: ggml quantizes row by row, each expert with its own importance row), so memory stays one block however
    many experts there are (GLM-5.3: 256 of 2048 x 6144 each per projection and layer)."""
    t = p.tensor
    n_expert, n_cols = t.shape[0], t.shape[-1]
    per_expert = None if imatrix is None else np.asarray(imatrix, dtype=np.float32).reshape(-1)
    if per_expert is not None and per_expert.size != n_expert * n_cols:
        raise InputError(f"the importance matrix of {t.name} has {per_expert.size} values, the tensor needs "
                         f"{n_expert} x {n_cols}")
    for e, source in enumerate(t.sources):
        if tuple(ckpt.info(source).shape) != t.shape[1:]:
            raise InputError(f"tensor {source!r} has shape {list(ckpt.info(source).shape)}, expected "
                             f"{list(t.shape[1:])}", ckpt.file_of(source))
        imat = None if per_expert is None else per_expert[e * n_cols:(e + 1) * n_cols]
        for _, first, stop in row_blocks(t.shape[1:]):
            rows = np.ascontiguousarray(ckpt.load_rows(source, first, stop), dtype=np.float32)  # (rows, cols)
            try:
                yield encode_rows(rows, p.qtype, imat, threads, first)
            except InputError as exc:
                raise InputError(f"tensor {source!r}: {exc.problem}", ckpt.file_of(source)) from None


def _materialize(ckpt: Checkpoint | CheckpointView, p: Planned, imatrix, threads: int) -> np.ndarray:
    t = p.tensor
    data = np.ascontiguousarray(t.build([ckpt.load(s) for s in t.sources]), dtype=np.float32)
    if data.shape != t.shape:
        raise InputError(f"tensor {t.name} built with shape {list(data.shape)}, expected {list(t.shape)}",
                         ckpt.file_of(t.sources[0]))
    try:
        out = encode(data, p.qtype, imatrix, threads)
    except InputError as exc:
        raise InputError(f"tensor {t.sources[0]!r}: {exc.problem}", ckpt.file_of(t.sources[0])) from None
    if out.nbytes != p.nbytes:
        raise RuntimeError(f"{t.name}: quantized to {out.nbytes} bytes, planned {p.nbytes}")
    return out

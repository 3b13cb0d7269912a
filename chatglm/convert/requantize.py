"""`chatglm quantize`: re-encode the tensors of a GGUF to another type or mixed recipe, keeping everything else.

The input is checked by :func:`chatglm.gguf_file.read_header` before anything else reads it; its metadata (with the
key types) comes from ``gguf.GGUFReader``. Every key is copied in order, arrays and strings intact, except
``general.file_type``, which names the new recipe. Types per tensor come from :func:`qtypes.plan_types` (llama.cpp's
recipes, with the hyperparameters read from the file), so an f32 GGUF requantized here equals the same checkpoint
converted straight to the recipe, byte for byte.

Tensors are read with ``pread`` a block of rows at a time (no memory map: mapped pages count as resident memory),
decoded to float32 (f16/bf16 by numpy; quantized types by ``gguf.quants.dequantize``, only with
``allow_requantize``), encoded by :func:`pipeline.encode_rows` and appended to a temporary file renamed into place at
the end (:func:`chatglm.fsutil.atomic_path`). A tensor whose type does not change is copied byte for byte.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType
from gguf import GGMLQuantizationType as QT

from chatglm.convert import qtypes
from chatglm.convert.gguf_writer import DataSection, Progress, TensorInfo, write_header
from chatglm.convert.pipeline import encode_rows, importance_for, row_blocks
from chatglm.convert.tensors import bf16_to_f32
from chatglm.convert.threads import quant_threads
from chatglm.errors import InputError
from chatglm.fsutil import atomic_path, check_destination, open_regular, reading
from chatglm.gguf_file import GGUFHeader, TensorEntry, read_header

log = logging.getLogger(__name__)

_FLOATS = (QT.F32, QT.F16, QT.BF16)
_SKIPPED_KEYS = ("general.architecture",)  # GGUFWriter writes it first itself
FILE_TYPE = "general.file_type"
QUANT_VERSION = "general.quantization_version"


@dataclass
class QuantizeResult:
    path: Path
    arch: str
    qtype: str
    n_tensors: int
    n_changed: int  # tensors re-encoded (the others were copied as they were)
    nbytes: int
    seconds: float


@dataclass(frozen=True)
class _Planned:
    entry: TensorEntry
    shape: tuple[int, ...]  # numpy order: the row (ggml's ne[0]) last
    source: QT
    target: QT
    nbytes: int

    @property
    def changes(self) -> bool:
        return self.source != self.target


def quantize_gguf(
    src: os.PathLike | str,
    dest: os.PathLike | str,
    qtype: str,
    *,
    imatrix: Optional[os.PathLike | str] = None,
    allow_requantize: bool = False,
    threads: Optional[int] = None,
    progress: Optional[Progress] = None,
) -> QuantizeResult:
    """Write ``src`` with its tensors re-encoded to the recipe ``qtype`` (``q4_k_m``, ``q8_0``, ``f16``, ...) at
    ``dest``. Tensors already block-quantized are re-encoded only with ``allow_requantize`` (InputError otherwise).
    """
    start = time.perf_counter()
    recipe = qtypes.get_recipe(qtype)
    threads = quant_threads(threads)
    src, dest = Path(src), Path(dest)
    check_destination(dest, [src, imatrix])  # before any work: never over the file being requantized
    header = read_header(src)
    shapes = {name: numpy_shape(e) for name, e in header.tensors.items()}
    importance = importance_for(imatrix, shapes) if imatrix is not None else None
    planned = plan(header, recipe, has_imatrix=importance is not None)
    _check_requantize(planned, allow_requantize, src)
    _check_imatrix_coverage(recipe, planned, importance or {}, src)
    total = sum(p.nbytes for p in planned)
    with atomic_path(dest, sources=[src, imatrix]) as tmp:
        alignment = _write_header(tmp, header, recipe, planned)
        with open_regular(src) as fin, open(tmp, "r+b") as fout:
            section = DataSection(fout, alignment, total, progress)
            for p in planned:
                blocks = _encoded_blocks(fin, header, p, (importance or {}).get(p.entry.name), threads)
                section.write(p.entry.name, p.nbytes, blocks)
    seconds = time.perf_counter() - start
    n_changed = sum(p.changes for p in planned)
    log.info("wrote %s: %d tensors (%d re-encoded), %d bytes in %.1fs", dest, len(planned), n_changed, total, seconds)
    return QuantizeResult(dest, header.arch, recipe.name, len(planned), n_changed, dest.stat().st_size, seconds)


def numpy_shape(entry: TensorEntry) -> tuple[int, ...]:
    """A tensor's shape in numpy order (GGUF stores ne[0], the row length, first)."""
    return tuple(reversed(entry.shape))


def model_info(header: GGUFHeader) -> qtypes.ModelInfo:
    """The hyperparameters llama.cpp's recipes look at, from the architecture's keys."""
    arch = header.arch
    if arch not in qtypes.MODEL_ARCHS:
        raise InputError(f"cannot quantize architecture {arch!r} (this tool handles "
                         f"{', '.join(sorted(qtypes.MODEL_ARCHS))})", header.path)

    def count(key: str, default: Optional[int] = None, minimum: int = 1) -> int:
        value = header.arch_get(key, default)
        if value is None:
            raise InputError(f"incomplete GGUF: no {arch}.{key}", header.path)
        if type(value) is not int or value < minimum:
            raise InputError(f"{arch}.{key} must be an integer >= {minimum}, got {value!r}", header.path)
        return value

    n_head = count("attention.head_count")
    return qtypes.ModelInfo(arch, count("block_count"), n_head, count("attention.head_count_kv", n_head),
                            count("expert_count", 0, minimum=0))


def plan(header: GGUFHeader, recipe: qtypes.Recipe, has_imatrix: bool = False) -> list[_Planned]:
    """Every tensor of the file, in file order, with the type the recipe gives it."""
    sources = {name: QT(e.ggml_type) for name, e in header.tensors.items()}  # read_header knows every type
    shapes = [(name, numpy_shape(e)) for name, e in header.tensors.items()]
    types = qtypes.plan_types(recipe, shapes, model_info(header), has_imatrix=has_imatrix,
                              sources={n: t for n, t in sources.items() if t != QT.F32})
    out = []
    for name, shape in shapes:
        target = types[name]
        nbytes = header.tensors[name].nbytes if target == sources[name] else _nbytes(target, shape)
        out.append(_Planned(header.tensors[name], shape, sources[name], target, nbytes))
    return out


def _nbytes(qtype: QT, shape: tuple[int, ...]) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * type_size


def _check_requantize(planned: list[_Planned], allow: bool, path: Path) -> None:
    """Refuse to quantize already-quantized tensors again unless allowed; check that they can be decoded."""
    odd = [p for p in planned if p.changes and p.source not in _FLOATS and GGML_QUANT_SIZES[p.source][0] == 1]
    if odd:
        raise InputError(f"tensor {odd[0].entry.name!r} holds {odd[0].source.name} values, which this tool does not "
                         "re-encode", path)
    lossy = [p for p in planned if qtypes.is_lossy_requantize(p.source, p.target)]
    if lossy and not allow:
        found = sorted({p.source.name.lower() for p in lossy})
        raise InputError(f"already quantized: {len(lossy)} tensors ({', '.join(found)}) would be quantized again, "
                         "which loses more than quantizing the original weights; convert from the checkpoint or an "
                         "f32/f16/bf16 GGUF, or pass --allow-requantize", path)
    for qtype in sorted({p.source for p in lossy}):
        try:  # one block of zeros: gguf raises NotImplementedError for types it cannot decode
            gguf.quants.dequantize(np.zeros((1, GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8), qtype)
        except NotImplementedError:
            raise InputError(f"cannot requantize {qtype.name} tensors: gguf has no decoder for them", path) from None


def _check_imatrix_coverage(recipe: qtypes.Recipe, planned: list[_Planned], importance: dict, path: Path) -> None:
    """llama.cpp refuses some types without importance data; say so before writing anything."""
    types = {p.entry.name: p.target for p in planned if p.changes}
    lacking = [n for n in qtypes.tensors_needing_imatrix(recipe, types) if n not in importance]
    if lacking:
        more = " ..." if len(lacking) > 3 else ""
        raise InputError(f"{recipe.name} needs an importance matrix (--imatrix) with data for {len(lacking)} tensors "
                         f"({', '.join(lacking[:3])}{more})", path)


def _write_header(tmp: Path, header: GGUFHeader, recipe: qtypes.Recipe, planned: list[_Planned]) -> int:
    """Metadata, copied, and the new tensor table; returns the data alignment."""
    writer = gguf.GGUFWriter(tmp, header.arch)
    _copy_metadata(writer, header, recipe)
    writer.data_alignment = int(header.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
    return write_header(writer, [TensorInfo(p.entry.name, p.shape, p.target, p.nbytes) for p in planned])


def _copy_metadata(writer: gguf.GGUFWriter, header: GGUFHeader, recipe: qtypes.Recipe) -> None:
    """Every key of the source in its order and type; general.file_type set to the recipe's."""
    reader = gguf.GGUFReader(header.path)  # header.kv has the values; the reader also knows each key's type
    for field in reader.fields.values():
        key = field.name
        if key.startswith("GGUF.") or key in _SKIPPED_KEYS:
            continue
        if key == FILE_TYPE:
            writer.add_key_value(key, int(recipe.ftype), GGUFValueType.UINT32)
            continue
        vtype = field.types[0]
        if vtype != GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), vtype)
            continue
        values = field.contents()
        if not values:
            raise InputError(f"metadata array {key!r} is empty, which gguf's writer cannot copy", header.path)
        writer.add_key_value(key, values, vtype, sub_type=field.types[-1])
    if FILE_TYPE not in reader.fields:
        writer.add_file_type(recipe.ftype)
    if QUANT_VERSION not in reader.fields and recipe.quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _encoded_blocks(fin: BinaryIO, header: GGUFHeader, p: _Planned, imatrix: Optional[np.ndarray],
                    threads: int) -> Iterator[np.ndarray]:
    """The tensor in its new encoding, a block of rows at a time (its bytes as they are when its type stays)."""
    shape = p.shape if len(p.shape) > 1 else (1,) + p.shape  # a 1-D tensor is one row
    n_rows, n_cols = shape[-2], shape[-1]
    block, type_size = GGML_QUANT_SIZES[p.source]
    row_bytes = n_cols // block * type_size
    base = header.data_offset + p.entry.offset
    for matrix, first, stop in row_blocks(shape):
        raw = _read(fin, base + (matrix * n_rows + first) * row_bytes, (stop - first) * row_bytes, p.entry.name,
                    header.path)
        if not p.changes:
            yield raw
            continue
        rows = decode(raw.reshape(stop - first, row_bytes), p.source)  # (stop - first, n_cols) float32
        weights = imatrix[matrix] if imatrix is not None and imatrix.ndim == 2 else imatrix
        try:
            yield encode_rows(rows, p.target, weights, threads, matrix * n_rows + first)
        except InputError as exc:
            raise InputError(f"tensor {p.entry.name!r}: {exc.problem}", header.path) from None


def decode(raw: np.ndarray, qtype: QT) -> np.ndarray:
    """Rows of stored bytes, (rows, row bytes) uint8, as float32 (rows, cols)."""
    if qtype == QT.F32:
        return raw.view(np.float32)
    if qtype == QT.F16:
        return raw.view(np.float16).astype(np.float32)
    if qtype == QT.BF16:
        return bf16_to_f32(raw.view(np.uint16))
    return np.ascontiguousarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32)


def _read(fin: BinaryIO, offset: int, nbytes: int, name: str, path: Path) -> np.ndarray:
    """``nbytes`` bytes at ``offset``, read into a fresh array (never mapped)."""
    out = np.empty(nbytes, dtype=np.uint8)
    view, done = memoryview(out), 0
    with reading(path, f"tensor {name!r}"):
        while done < nbytes:
            n = os.preadv(fin.fileno(), [view[done:]], offset + done)
            if n == 0:
                raise InputError(f"tensor {name!r} is cut short: the file shrank while it was read", path)
            done += n
    return out

"""Quantization through the libggml that llama-cpp-python ships: type traits and ``ggml_quantize_chunk``.

Bytes come from ggml's own kernels, so they equal what ``llama-quantize`` writes for the same rows, type and importance
matrix. Rows are quantized independently, so a tensor is split into row chunks that run on a thread pool: ctypes
releases the GIL during the call, and every worker writes into its own slice of one output array (peak memory: the
caller's f32 rows plus the quantized output).

Every argument is checked here before C sees it: a failing ``GGML_ASSERT`` aborts the whole process.
"""

from __future__ import annotations

import ctypes
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QT

from chatglm.errors import ChatGLMError, InputError
from chatglm.ggml import lib

__all__ = [
    "QT",
    "QUANTIZABLE",
    "block_size",
    "is_quantized",
    "quantize",
    "requires_imatrix",
    "row_nbytes",
    "tensor_nbytes",
    "type_name",
]

# Types ggml_quantize_chunk has a kernel for (any other type falls through to an abort in C).
QUANTIZABLE: frozenset[QT] = frozenset({
    QT.F32, QT.F16, QT.BF16,
    QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0,
    QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K,
    QT.IQ1_S, QT.IQ1_M, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ4_NL, QT.IQ4_XS,
    QT.TQ1_0, QT.TQ2_0, QT.MXFP4,
})

# f32 elements handed to one ggml_quantize_chunk call (whole rows, at least one): 4 MiB keeps both cores busy
# without making many tiny calls.
_CHUNK_ELEMENTS = 1 << 20

_c_float_p = ctypes.POINTER(ctypes.c_float)

# name: (restype, argtypes); the ggml_type enum is a C int.
_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "ggml_blck_size": (ctypes.c_int64, [ctypes.c_int]),
    "ggml_type_size": (ctypes.c_size_t, [ctypes.c_int]),
    "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
    "ggml_type_name": (ctypes.c_char_p, [ctypes.c_int]),
    "ggml_is_quantized": (ctypes.c_bool, [ctypes.c_int]),
    "ggml_quantize_init": (None, [ctypes.c_int]),
    "ggml_quantize_requires_imatrix": (ctypes.c_bool, [ctypes.c_int]),
    "ggml_quantize_chunk": (
        ctypes.c_size_t,
        [ctypes.c_int, _c_float_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _c_float_p],
    ),
    "ggml_validate_row_data": (ctypes.c_bool, [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]),
}


@functools.cache
def _ggml() -> ctypes.CDLL:
    """libggml-base with the functions above declared, after checking gguf's type ids against it."""
    base = lib.base()
    for name, (restype, argtypes) in _SIGNATURES.items():
        fn = getattr(base, name)
        fn.restype = restype
        fn.argtypes = argtypes
    _check_type_ids(base)
    return base


def _check_type_ids(base: ctypes.CDLL) -> None:
    """gguf's GGMLQuantizationType and block sizes must describe the same types as this libggml."""
    for qtype in QUANTIZABLE:
        c_name = (base.ggml_type_name(int(qtype)) or b"").decode()
        c_sizes = (base.ggml_blck_size(int(qtype)), base.ggml_type_size(int(qtype)))
        if c_name.lower() != qtype.name.lower() or c_sizes != GGML_QUANT_SIZES[qtype]:
            raise ChatGLMError(
                f"gguf's {qtype.name} is type {int(qtype)}, which this libggml calls {c_name!r} {c_sizes}: "
                "the gguf and llama-cpp-python versions do not match"
            )


def _check_type(qtype: QT) -> QT:
    qtype = QT(qtype)
    if qtype not in QUANTIZABLE:
        valid = ", ".join(sorted(t.name for t in QUANTIZABLE))
        raise ValueError(f"ggml cannot quantize to {qtype.name}; it can to {valid}")
    return qtype


def type_name(qtype: QT) -> str:
    """ggml's own name of a type ("q4_K", "bf16", ...)."""
    return _ggml().ggml_type_name(int(_check_type(qtype))).decode()


def block_size(qtype: QT) -> int:
    """Elements per block: every row length must be a multiple of it."""
    return int(_ggml().ggml_blck_size(int(_check_type(qtype))))


def is_quantized(qtype: QT) -> bool:
    """True for block-quantized types, False for f32/f16/bf16."""
    return bool(_ggml().ggml_is_quantized(int(_check_type(qtype))))


def requires_imatrix(qtype: QT) -> bool:
    """True where ggml refuses to quantize without an importance matrix (iq2_xxs, iq2_xs, iq1_s)."""
    return bool(_ggml().ggml_quantize_requires_imatrix(int(_check_type(qtype))))


def row_nbytes(qtype: QT, n_cols: int) -> int:
    """Bytes of one row of ``n_cols`` elements stored as ``qtype``."""
    qtype = _check_type(qtype)
    blck = block_size(qtype)
    if n_cols <= 0 or n_cols % blck:
        raise ValueError(f"a {qtype.name} row needs a positive multiple of {blck} elements, not {n_cols}")
    return int(_ggml().ggml_row_size(int(qtype), n_cols))


def tensor_nbytes(qtype: QT, shape: Sequence[int]) -> int:
    """Bytes of a tensor of numpy ``shape`` (last axis = row) stored as ``qtype``."""
    if not shape:
        raise ValueError("a tensor needs at least one axis")
    return math.prod(shape[:-1]) * row_nbytes(qtype, shape[-1])


def _check_data(data: np.ndarray, qtype: QT) -> tuple[int, int, int]:
    """Validates the rows; returns (n_mats, rows per matrix, n_cols)."""
    if not isinstance(data, np.ndarray) or data.dtype != np.float32:
        raise ValueError(f"quantize takes a float32 numpy array, not {getattr(data, 'dtype', type(data))}")
    if data.ndim not in (2, 3) or data.size == 0:
        raise ValueError(f"quantize takes non-empty (rows, cols) or (n_expert, rows, cols) data, not {data.shape}")
    if not data.flags.c_contiguous:
        raise ValueError("quantize takes C-contiguous data")
    n_mats = data.shape[0] if data.ndim == 3 else 1
    row_nbytes(qtype, data.shape[-1])  # checks divisibility by the block size
    return n_mats, data.shape[-2], data.shape[-1]


def _check_imatrix(imatrix: Optional[np.ndarray], qtype: QT, n_mats: int, n_cols: int) -> Optional[np.ndarray]:
    """Returns the importance matrix as contiguous float32 (n_mats, n_cols), or None."""
    if imatrix is None:
        if requires_imatrix(qtype):
            raise InputError(f"quantizing to {qtype.name} needs an importance matrix (--imatrix)")
        return None
    imatrix = np.asarray(imatrix)
    if imatrix.size != n_mats * n_cols:
        raise ValueError(f"the importance matrix has {imatrix.size} values, the tensor needs {n_mats} x {n_cols}")
    imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(n_mats, n_cols)  # (n_mats, n_cols)
    if not np.isfinite(imatrix).all() or (imatrix < 0).any():
        raise InputError("the importance matrix has negative or non-finite values")
    return imatrix


def _chunks(n_mats: int, n_rows: int, n_cols: int) -> list[tuple[int, int, int]]:
    """(matrix, first row, row count) spans of whole rows that never cross a matrix (expert) boundary."""
    step = max(1, _CHUNK_ELEMENTS // n_cols)
    return [(m, r, min(step, n_rows - r)) for m in range(n_mats) for r in range(0, n_rows, step)]


def quantize(
    data: np.ndarray,
    qtype: QT,
    imatrix: Optional[np.ndarray] = None,
    threads: int = 2,
) -> np.ndarray:
    """Quantizes rows of f32 with ggml_quantize_chunk; returns uint8 of shape data.shape[:-1] + (row bytes,).

    ``data``: C-contiguous float32, (rows, cols) or (n_expert, rows, cols); cols a multiple of ``block_size``.
    ``imatrix``: per-column importance (cols values; n_expert x cols for 3-D data), as llama.cpp's quantizer hands
    to ggml. Raises InputError for non-finite values and ValueError for arguments ggml would abort on.
    """
    qtype = _check_type(qtype)
    n_mats, n_rows, n_cols = _check_data(data, qtype)
    imat = _check_imatrix(imatrix, qtype, n_mats, n_cols)
    row_bytes = row_nbytes(qtype, n_cols)
    ggml = _ggml()
    ggml.ggml_quantize_init(int(qtype))  # build iq grids once, before the workers race for them
    rows = data.reshape(n_mats, n_rows, n_cols)  # (n_mats, rows, cols), a view
    out = np.empty((n_mats, n_rows, row_bytes), dtype=np.uint8)

    def run(span: tuple[int, int, int]) -> None:
        m, first, count = span
        where = (f"expert {m} " if n_mats > 1 else "") + f"rows {first}..{first + count - 1}"
        src = rows[m, first:first + count]
        if not np.isfinite(src).all():
            raise InputError(f"{where} hold NaN or infinite values")
        dst = out[m, first:first + count]
        weights = None if imat is None else imat[m].ctypes.data_as(_c_float_p)
        written = ggml.ggml_quantize_chunk(
            int(qtype), src.ctypes.data_as(_c_float_p), dst.ctypes.data, 0, count, n_cols, weights
        )
        if written != dst.nbytes or not ggml.ggml_validate_row_data(int(qtype), dst.ctypes.data, dst.nbytes):
            raise InputError(f"{where} do not fit in {qtype.name} (values out of range)")

    spans = _chunks(n_mats, n_rows, n_cols)
    if threads <= 1 or len(spans) == 1:
        for span in spans:
            run(span)
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(spans))) as pool:
            for future in [pool.submit(run, span) for span in spans]:
                future.result()
    return out.reshape(data.shape[:-1] + (row_bytes,))  # (..., rows, row bytes)

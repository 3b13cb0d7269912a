"""Writing GGUF files: every converted model, requantized model and LoRA adapter goes through here.

- :class:`CheckedWriter`: gguf-py's writer, with every metadata value checked when it is added. gguf-py packs
  values with ``struct`` when the header is written, long after they were added: a uint32 of 2**40, a negative count,
  a float32 of 1e40 or an array of mixed item types fails there with a struct.error or ValueError traceback (or, for
  floats, silently becomes inf). The check raises one InputError naming the file the value came from and the GGUF key.
- :func:`write_header`: the metadata and the tensor table, written and closed, before any tensor data.
- :class:`DataSection`: the tensor data after that header, a block at a time (tensors stream, never all in memory).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, NamedTuple, Optional, Sequence

import gguf
import numpy as np

from chatglm.convert.config_types import shown
from chatglm.errors import InputError
from chatglm.limits import FLOAT32_MAX

V = gguf.GGUFValueType
Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor name)

# Integer GGUF types -> (lowest, highest) value.
INT_RANGES: dict[V, tuple[int, int]] = {
    V.UINT8: (0, 2**8 - 1), V.INT8: (-(2**7), 2**7 - 1),
    V.UINT16: (0, 2**16 - 1), V.INT16: (-(2**15), 2**15 - 1),
    V.UINT32: (0, 2**32 - 1), V.INT32: (-(2**31), 2**31 - 1),
    V.UINT64: (0, 2**64 - 1), V.INT64: (-(2**63), 2**63 - 1),
}
FLOAT_MAX: dict[V, float] = {V.FLOAT32: FLOAT32_MAX, V.FLOAT64: float("inf")}


def _int_problem(value: Any, vtype: V) -> Optional[str]:
    lo, hi = INT_RANGES[vtype]
    if type(value) is bool or not isinstance(value, int):
        return f"is {shown(value)}, not an integer"
    if not lo <= value <= hi:
        return f"is {shown(value)}, outside the {vtype.name.lower()} range {lo}..{hi}"
    return None


def _float_problem(value: Any, vtype: V) -> Optional[str]:
    if type(value) is bool or not isinstance(value, (int, float)):
        return f"is {shown(value)}, not a number"
    try:
        number = float(value)
    except OverflowError:
        return "is an integer too large for any float"
    if not math.isfinite(number):
        return f"is {shown(value)}, not a finite number"
    if abs(number) > FLOAT_MAX[vtype]:
        return f"is {shown(value)}, more than a {vtype.name.lower()} holds ({FLOAT_MAX[vtype]:g})"
    return None


def _string_problem(value: Any, vtype: V) -> Optional[str]:
    if isinstance(value, (bytes, bytearray)):
        return None
    if not isinstance(value, str):
        return f"is {shown(value)}, not a string"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode text (a lone surrogate)"
    return None


def _bool_problem(value: Any, vtype: V) -> Optional[str]:
    return None if type(value) is bool else f"is {shown(value)}, not true or false"


SCALAR_CHECKS: dict[V, Callable[[Any, V], Optional[str]]] = {
    **{t: _int_problem for t in INT_RANGES},
    **{t: _float_problem for t in FLOAT_MAX},
    V.STRING: _string_problem,
    V.BOOL: _bool_problem,
}


def _item_type(value: Any) -> V:
    """The item type gguf-py gives an array item (its GGUFValueType.get_type), or raises ValueError."""
    return V.get_type(value)


def value_problem(value: Any, vtype: V, sub_type: Optional[V] = None) -> Optional[str]:
    """What is wrong with ``value`` as a GGUF ``vtype`` (None when it packs as written)."""
    if vtype != V.ARRAY:
        check = SCALAR_CHECKS.get(vtype)
        return f"has unsupported GGUF type {vtype!r}" if check is None else check(value, vtype)
    if isinstance(value, (bytes, bytearray)):
        return None
    if not isinstance(value, (list, tuple)) or not value:
        return "is not a non-empty list"
    try:
        item_type = sub_type or _item_type(value[0])
        if sub_type is None and any(_item_type(v) is not item_type for v in value):
            return "mixes item types in one array"
    except ValueError:
        return "holds an item of a type GGUF has no array of"
    if item_type == V.ARRAY:
        return "nests arrays (this converter writes none)"
    check = SCALAR_CHECKS[item_type]
    for i, item in enumerate(value):
        problem = check(item, item_type)
        if problem:
            return f"item {i} {problem}"
    return None


# numpy dtypes of the array item types a whole numpy array is packed as at once (``CheckedWriter``)
ARRAY_DTYPES = {V.FLOAT32: np.float32, V.UINT16: np.uint16, V.INT32: np.int32, V.UINT32: np.uint32}


def ndarray_problem(value: np.ndarray, sub_type: Optional[V]) -> Optional[str]:
    """What is wrong with a numpy array as a GGUF array of ``sub_type`` (None when it packs as written)."""
    if sub_type not in ARRAY_DTYPES:
        return f"is a numpy array of a GGUF item type this writer does not pack whole ({sub_type!r})"
    if value.ndim != 1 or not value.size:
        return "is not a non-empty flat array"
    if value.dtype != ARRAY_DTYPES[sub_type]:
        return f"is a {value.dtype} array, not {np.dtype(ARRAY_DTYPES[sub_type])}"
    if value.dtype.kind == "f" and not np.isfinite(value).all():
        return f"item {int(np.flatnonzero(~np.isfinite(value))[0])} is not a finite number"
    return None


class CheckedWriter(gguf.GGUFWriter):
    """A GGUFWriter that refuses, when added, any metadata value its GGUF type cannot hold.

    ``source`` is the file the values come from (config.json), named in the error together with the GGUF key.
    """

    def __init__(self, path: os.PathLike | str, arch: str, source: os.PathLike | str, **kwargs: Any):
        self.source = Path(source)
        super().__init__(path, arch, **kwargs)

    def add_key_value(self, key: str, val: Any, vtype: V, sub_type: Optional[V] = None) -> None:
        if isinstance(val, np.ndarray) and vtype == V.ARRAY:  # a large array (a P-Tuning prefix): packed whole
            problem = ndarray_problem(val, sub_type)
        else:
            problem = value_problem(val, vtype, sub_type)
        if problem:
            raise InputError(f"the value for GGUF key {key} {problem}", self.source)
        super().add_key_value(key, val, vtype, sub_type)

    def _pack_val(self, val: Any, vtype: V, add_vtype: bool, sub_type: Optional[V] = None) -> bytes:
        if not isinstance(val, np.ndarray):
            return super()._pack_val(val, vtype, add_vtype, sub_type)
        order = "<" if self.endianess == gguf.GGUFEndian.LITTLE else ">"
        head = self._pack("I", vtype) if add_vtype else b""
        return head + self._pack("I", sub_type) + self._pack("Q", val.size) + \
            val.astype(np.dtype(ARRAY_DTYPES[sub_type]).newbyteorder(order), copy=False).tobytes()


def display_name(folder: Path) -> str:
    """The folder's name as valid UTF-8 for general.name (undecodable bytes in a file name become U+FFFD)."""
    return os.fsencode(folder.resolve().name).decode("utf-8", errors="replace")


class TensorInfo(NamedTuple):
    """One row of the tensor table: numpy-order shape (the row last), the stored type, the bytes it takes."""

    name: str
    shape: Sequence[int]
    qtype: gguf.GGMLQuantizationType
    nbytes: int


def write_header(writer: gguf.GGUFWriter, tensors: Iterable[TensorInfo]) -> int:
    """Write the metadata added so far and the tensor table, then close the writer; returns the data alignment.
    The tensor data follows through a :class:`DataSection` on the same file."""
    for t in tensors:
        # The shape is given in elements (not bytes), so the dtype argument only has to differ from uint8.
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return writer.data_alignment


class DataSection:
    """Writes the tensor data after a header written (and closed) by :func:`write_header`, one block at a time.

    The layout is GGUFWriter's: every tensor starts at a multiple of ``alignment`` and is padded with zeros to one.
    """

    def __init__(self, fh: BinaryIO, alignment: int, total: int, progress: Optional[Progress] = None):
        self.fh, self.alignment, self.total, self.progress = fh, alignment, total, progress
        self.done = 0
        fh.seek(0, os.SEEK_END)

    def _pad(self) -> None:
        pos = self.fh.tell()
        self.fh.write(bytes(gguf.GGUFWriter.ggml_pad(pos, self.alignment) - pos))

    def write(self, name: str, nbytes: int, blocks: Iterable[np.ndarray]) -> None:
        """One tensor of ``nbytes`` bytes, given as consecutive blocks of its data."""
        self._pad()
        written = 0
        for block in blocks:
            self.fh.write(memoryview(np.ascontiguousarray(block)).cast("B"))
            written += block.nbytes
            self.done += block.nbytes
            if self.progress:
                self.progress(self.done, self.total, name)
        if written != nbytes:
            raise RuntimeError(f"{name}: wrote {written} bytes, planned {nbytes}")
        self._pad()

"""A validating reader of GGUF headers: checked by us before llama.cpp or our ggml engine sees the file.

Everything a crafted file could use to crash a native loader is checked here first: magic and version, counts bounded
by the file size, string and array lengths inside the file, known value and tensor types, tensor dimensions and sizes,
data offsets aligned, inside the file and not overlapping, duplicate keys and tensor names. Large arrays (the vocab)
are skipped over and kept as descriptors, so reading a header costs milliseconds.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from chatglm import limits
from chatglm.errors import InputError
from chatglm.fsutil import open_regular, reading

MAGIC = b"GGUF"
SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4
SMALL_ARRAY = 4096  # arrays up to this many items are decoded; longer ones are kept as descriptors


@dataclass(frozen=True)
class ArrayRef:
    """A long array left in the file: its item type, length and the offset of its first item."""

    item_type: int
    count: int
    offset: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # ggml order: ne[0] (row length) first
    ggml_type: int
    offset: int  # relative to the data section
    nbytes: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    kv: dict[str, Any]
    tensors: dict[str, TensorEntry]
    data_offset: int
    file_size: int

    @property
    def arch(self) -> str:
        return str(self.kv.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.kv.get(key, default)

    def arch_get(self, key: str, default: Any = None) -> Any:
        return self.kv.get(f"{self.arch}.{key}", default)

    def array(self, key: str) -> np.ndarray | list:
        """A numeric array value as numpy (long ones are read from the file now), or a list of strings."""
        value = self.kv.get(key)
        if not isinstance(value, ArrayRef):
            return np.asarray(value) if value is not None and not _is_strings(value) else (value or [])
        dtype = np.dtype(SCALARS[value.item_type])
        with open_regular(self.path) as fh, reading(self.path):
            fh.seek(value.offset)
            return np.frombuffer(fh.read(value.count * dtype.itemsize), dtype=dtype)


def _is_strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], str)


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, problem: str) -> InputError:
        return InputError(f"corrupt GGUF: {problem}", self.path)

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} at byte {self.pos} runs past the end of the file ({self.size} bytes)")
        chunk = self.buf[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"{what} length")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} at byte {self.pos - n} is not valid UTF-8") from None


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0) -> Any:
    if vtype in SCALARS:
        return cur.unpack(SCALARS[vtype], f"value of {key!r}")
    if vtype == STRING:
        return cur.string(f"value of {key!r}")
    if vtype != ARRAY or depth > 0:
        raise cur.fail(f"key {key!r} has unknown value type {vtype}")
    item_type = cur.unpack("<I", f"array type of {key!r}")
    count = cur.unpack("<Q", f"array length of {key!r}")
    min_item = 8 if item_type == STRING else struct.calcsize(SCALARS.get(item_type, "<B"))
    if item_type not in SCALARS and item_type != STRING:
        raise cur.fail(f"array {key!r} has unknown item type {item_type}")
    if count * min_item > cur.size - cur.pos:
        raise cur.fail(f"array {key!r} claims {count} items, more than the file can hold")
    start = cur.pos
    if item_type == STRING:
        items = [cur.string(f"item of {key!r}") for _ in range(count)]
        return items if count <= SMALL_ARRAY else _LongStrings(items, start)
    raw = cur.take(count * min_item, f"array {key!r}")
    if count > SMALL_ARRAY:
        return ArrayRef(item_type, count, start)
    return list(struct.unpack(f"<{count}{SCALARS[item_type][1]}", raw))


class _LongStrings(list):
    """A long string array (e.g. the vocab), decoded because walking it is needed to find the next key anyway."""

    def __init__(self, items: list[str], offset: int):
        super().__init__(items)
        self.offset = offset


def _tensor(cur: _Cursor, index: int) -> tuple[str, tuple[int, ...], int, int]:
    name = cur.string(f"name of tensor #{index}")
    n_dims = cur.unpack("<I", f"dimension count of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
    shape = tuple(cur.unpack("<Q", f"dimensions of {name!r}") for _ in range(n_dims))
    ggml_type = cur.unpack("<I", f"type of {name!r}")
    offset = cur.unpack("<Q", f"offset of {name!r}")
    return name, shape, ggml_type, offset


def tensor_nbytes(shape: tuple[int, ...], ggml_type: int, name: str, cur: _Cursor) -> int:
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown type {ggml_type}") from None
    if any(d <= 0 or d > 1 << 40 for d in shape):
        raise cur.fail(f"tensor {name!r} has invalid dimensions {list(shape)}")
    if shape[0] % block:
        raise cur.fail(f"tensor {name!r}: row length {shape[0]} is not a multiple of {qtype.name}'s block {block}")
    n = shape[0] // block * type_size
    for d in shape[1:]:
        n *= d
        if n > cur.size:
            break
    return n


def read_header(path: os.PathLike | str) -> GGUFHeader:
    """Parse and validate a GGUF file's header, tensor table and data layout (the data itself is not read)."""
    path = Path(path)
    with reading(path), open_regular(path) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size < 24:
            raise InputError("not a GGUF file: too short" if size else "empty file", path)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, path), size)


def _parse(cur: _Cursor, size: int) -> GGUFHeader:
    if cur.take(4, "magic") != MAGIC:
        raise InputError("not a GGUF file (bad magic)", cur.path)
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise cur.fail(f"unsupported version {version}")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "key count")
    if n_kv * 13 > size or n_tensors * 28 > size:
        raise cur.fail(f"header claims {n_kv} keys and {n_tensors} tensors, more than the file can hold")
    if n_kv > limits.MAX_KEYS or n_tensors > limits.MAX_TENSORS:
        raise cur.fail(f"header claims {n_kv} keys and {n_tensors} tensors, more than any GLM model has "
                       f"(at most {limits.MAX_KEYS} and {limits.MAX_TENSORS} are read)")
    kv: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"key #{i}")
        if key in kv:
            raise cur.fail(f"duplicate key {key!r}")
        kv[key] = _value(cur, cur.unpack("<I", f"type of {key!r}"), key)
    raw_tensors = [_tensor(cur, i) for i in range(n_tensors)]
    alignment = kv.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1) or alignment > 1 << 20:
        raise cur.fail(f"general.alignment {alignment!r} is not a power of two")
    data_offset = -(-cur.pos // alignment) * alignment
    tensors = _check_tensors(cur, raw_tensors, alignment, size - data_offset)
    return GGUFHeader(cur.path, version, kv, tensors, data_offset, size)


def _check_tensors(cur: _Cursor, raw: list, alignment: int, data_size: int) -> dict[str, TensorEntry]:
    tensors: dict[str, TensorEntry] = {}
    for name, shape, ggml_type, offset in raw:
        if name in tensors:
            raise cur.fail(f"duplicate tensor name {name!r}")
        nbytes = tensor_nbytes(shape, ggml_type, name, cur)
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} data offset {offset} is not aligned to {alignment}")
        if data_size < 0 or offset + nbytes > data_size:
            raise cur.fail(f"tensor {name!r} data ({nbytes} bytes at {offset}) runs past the end of the file")
        tensors[name] = TensorEntry(name, shape, ggml_type, offset, nbytes)
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise cur.fail(f"tensors {first!r} and {second!r} overlap")
    return tensors

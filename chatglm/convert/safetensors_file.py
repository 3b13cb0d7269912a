"""A validating, memory-mapped reader of one ``.safetensors`` file (no torch, no copies).

The header is checked completely before anything is mapped: its length is bounded by the file, the JSON is an object
of tensor entries, every dtype is known, every shape × item size equals its byte range, and the ranges lie inside the
data section without overlapping.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from chatglm.convert.tensors import DTYPES, TensorInfo, TensorSource
from chatglm.errors import InputError

MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


class _Duplicate(Exception):
    pass


class SafetensorsFile(TensorSource):
    """Tensors of one safetensors file, read lazily through one read-only memory map."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self._infos: dict[str, TensorInfo] = {}
        self._mmap: mmap.mmap | None = None
        try:
            with open(self.path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size
                header_len, header = self._read_header(fh, size)
                self._data_start = 8 + header_len
                self._infos = self._parse(header, size - self._data_start)
                if size > 0:
                    self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as exc:
            raise InputError(f"cannot read: {exc.strerror or exc}", self.path) from None

    def _read_header(self, fh, size: int) -> tuple[int, bytes]:
        if size < 8:
            raise InputError("not a safetensors file: shorter than its 8-byte header length", self.path)
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_HEADER or header_len > size - 8:
            raise InputError(
                f"corrupt safetensors header: length {header_len} runs past the file ({size} bytes)", self.path
            )
        return header_len, fh.read(header_len)

    def _parse(self, raw: bytes, data_size: int) -> dict[str, TensorInfo]:
        try:
            header = json.loads(raw.decode("utf-8"), object_pairs_hook=self._no_duplicates)
        except _Duplicate as dup:
            raise InputError(f"corrupt safetensors header: tensor {dup.args[0]!r} is listed twice", self.path) from None
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InputError(f"corrupt safetensors header: not valid JSON ({type(exc).__name__})", self.path) from None
        if not isinstance(header, dict):
            raise InputError("corrupt safetensors header: not a JSON object", self.path)
        infos = {name: self._entry(name, entry, data_size) for name, entry in header.items() if name != "__metadata__"}
        spans = sorted((info.offset, info.offset + info.nbytes, name) for name, info in infos.items() if info.nbytes)
        for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
            if begin < end:
                raise InputError(f"corrupt safetensors header: tensors {first!r} and {second!r} overlap", self.path)
        return infos

    @staticmethod
    def _no_duplicates(pairs: list) -> dict:
        out = {}
        for key, value in pairs:
            if key in out:
                raise _Duplicate(key)
            out[key] = value
        return out

    def _entry(self, name: str, entry: object, data_size: int) -> TensorInfo:
        bad = f"corrupt safetensors header: tensor {name!r}"
        if not isinstance(entry, dict):
            raise InputError(f"{bad} is not an object", self.path)
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPES:
            raise InputError(f"{bad} has unsupported dtype {dtype!r}", self.path)
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise InputError(f"{bad} has an invalid shape {shape!r}", self.path)
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise InputError(f"{bad} has data offsets {offsets!r} outside the file's data ({data_size} bytes)", self.path)
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if nbytes != offsets[1] - offsets[0]:
            raise InputError(
                f"{bad}: shape {shape} of {dtype} needs {nbytes} bytes but its range holds {offsets[1] - offsets[0]}",
                self.path,
            )
        return TensorInfo(name, dtype, tuple(shape), offsets[0], nbytes)

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype, as a read-only view into the map (bf16 as uint16)."""
        info = self._infos[name]
        if info.nbytes == 0 or self._mmap is None:
            return np.zeros(info.shape, dtype=DTYPES[info.dtype].numpy)
        buf = np.frombuffer(self._mmap, dtype=np.uint8, count=info.nbytes, offset=self._data_start + info.offset)
        return buf.view(DTYPES[info.dtype].numpy).reshape(info.shape)

    def close(self) -> None:
        # Views handed out keep the map alive through the buffer protocol; dropping our reference is enough.
        self._mmap = None

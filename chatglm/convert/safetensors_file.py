"""A validating reader of one ``.safetensors`` file (no torch).

The header is checked completely before any data is read: its length is bounded by the file, the JSON is an object
of tensor entries, every dtype is known, every shape × item size equals its byte range, and the ranges lie inside the
data section without overlapping.

Tensor data is read with ``pread`` into fresh arrays, not through a memory map: pages of a map that were read stay
in the process's resident set until it is unmapped, so converting a 12 GB checkpoint through maps showed 12 GB of
RSS. Read this way, the kernel's page cache still holds the file but the process only holds what it is working on.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from chatglm.convert.tensors import DTYPES, TensorInfo, TensorSource
from chatglm.errors import InputError
from chatglm.fsutil import open_regular, parse_json, reading

MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


class _Duplicate(Exception):
    pass


class SafetensorsFile(TensorSource):
    """Tensors of one safetensors file, read on demand through one file descriptor held open until :meth:`close`."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self._infos: dict[str, TensorInfo] = {}
        self._fh: BinaryIO | None = None
        fh = open_regular(self.path)
        try:
            with reading(self.path):
                size = os.fstat(fh.fileno()).st_size
                header_len, header = self._read_header(fh, size)
            self._data_start = 8 + header_len
            self._infos = self._parse(header, size - self._data_start)
        except BaseException:
            fh.close()
            raise
        self._fh = fh

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
            header = parse_json(raw, self.path, what="safetensors header", object_pairs_hook=self._no_duplicates)
        except _Duplicate as dup:
            raise InputError(f"corrupt safetensors header: tensor {dup.args[0]!r} is listed twice", self.path) from None
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
        if not isinstance(dtype, str) or dtype not in DTYPES:
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
        """The tensor in its stored dtype (bf16 as uint16), as a fresh array."""
        info = self._infos[name]
        if not info.shape:  # a scalar
            return self._read(info, 0, info.nbytes).reshape(())
        return self.raw_rows(name, 0, info.shape[0])

    def raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis in the stored dtype; only their bytes are read."""
        info = self._infos[name]
        if not info.shape:
            raise ValueError(f"{name} is a scalar: it has no rows")
        start, stop, _ = slice(start, stop).indices(info.shape[0])
        stop = max(start, stop)
        row_bytes = math.prod(info.shape[1:]) * DTYPES[info.dtype].itemsize
        data = self._read(info, start * row_bytes, (stop - start) * row_bytes)
        return data.reshape((stop - start,) + info.shape[1:])  # (rows, ...)

    def _read(self, info: TensorInfo, skip: int, nbytes: int) -> np.ndarray:
        """``nbytes`` of a tensor's data from ``skip`` bytes into it, as an array of its stored dtype."""
        dtype = DTYPES[info.dtype].numpy
        out = np.empty(nbytes // np.dtype(dtype).itemsize, dtype=dtype)
        if nbytes == 0:
            return out
        if self._fh is None:
            raise InputError("file is closed", self.path)
        view, offset = memoryview(out).cast("B"), self._data_start + info.offset + skip
        done = 0
        with reading(self.path, f"tensor {info.name!r}"):
            while done < nbytes:
                n = os.preadv(self._fh.fileno(), [view[done:]], offset + done)
                if n == 0:
                    raise InputError(f"tensor {info.name!r} is cut short: the file shrank after it was opened",
                                     self.path)
                done += n
        return out

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

"""A safe, memory-mapped reader of PyTorch zip checkpoints (``pytorch_model*.bin``, ``adapter_model.bin``), no torch.

A zip checkpoint (torch >= 1.6) holds ``<archive>/data.pkl`` (a pickle of the state dict), ``<archive>/byteorder``
and one uncompressed entry ``<archive>/data/<key>`` per storage. The pickle is read by an unpickler that knows only
the globals a state dict needs (the tensor rebuild functions, the typed storage classes and dtypes, OrderedDict) and
rebuilds each of them as an inert stand-in defined here; every other global is refused by name before anything is
called, so no code from the file ever runs. Tensor data is then viewed straight from a memory map of the zip entry.
"""

from __future__ import annotations

import io
import logging
import math
import mmap
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from chatglm.convert import torch_zip
from chatglm.convert.pickle_scan import PickleRefused, RefusedGlobal, scan_pickle
from chatglm.convert.tensors import DTYPES, TensorInfo, TensorSource
from chatglm.errors import InputError
from chatglm.fsutil import open_regular, reading

log = logging.getLogger(__name__)

MAX_PICKLE = 16 * 1024 * 1024  # a state dict's pickle is kilobytes; refuse absurd ones before reading them
MAX_BYTEORDER = 16  # "little" or "big"
RESAVE = ("re-save it in the zip format with torch >= 1.6, e.g. python -c \"import torch; "
          "torch.save(torch.load('{path}', weights_only=True), '{path}')\"")


# ------------------------------------------------------------------------------------------- pickle stand-ins


@dataclass(frozen=True)
class _StorageType:
    """``torch.FloatStorage`` and friends (``dtype`` None for ``torch.storage.UntypedStorage``)."""

    dtype: Optional[str]


@dataclass(frozen=True)
class _DType:
    """``torch.float16`` and friends, as named by ``_rebuild_tensor_v3``."""

    dtype: Optional[str]  # None: a torch dtype this reader does not handle
    torch_name: str


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: Optional[str]  # None: untyped (bytes), typed by the tensor that uses it
    numel: int  # elements of ``dtype``, or bytes when untyped


@dataclass(frozen=True)
class _Tensor:
    storage: _Storage
    dtype: str
    offset: int  # in elements
    shape: tuple[int, ...]
    stride: tuple[int, ...]


class UnsupportedTensor(ValueError):
    """A well-formed tensor of a kind this reader does not handle."""


class _Dict(dict):
    """OrderedDict stand-in: a dict that also accepts the ``_metadata`` attribute state dicts carry."""


_STORAGE_DTYPES = {
    "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16", "DoubleStorage": "F64",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8", "ByteStorage": "U8",
    "BoolStorage": "BOOL",
}  # fmt: skip
_TORCH_DTYPES = {
    "float32": "F32", "float": "F32", "float16": "F16", "half": "F16", "bfloat16": "BF16", "float64": "F64",
    "double": "F64", "int64": "I64", "long": "I64", "int32": "I32", "int": "I32", "int16": "I16", "short": "I16",
    "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip
_OTHER_TORCH_DTYPES = ("uint16", "uint32", "uint64", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2")


def _int_tuple(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise ValueError(f"tensor {what} is not a tuple of non-negative integers: {_short(value)}")
    return value


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: Optional[str]) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise ValueError(f"tensor storage is not a storage reference: {type(storage).__name__}")
    if type(offset) is not int or offset < 0:
        raise ValueError(f"tensor storage offset is invalid: {_short(offset)}")
    shape, strides = _int_tuple(size, "size"), _int_tuple(stride, "stride")
    if len(shape) != len(strides):
        raise ValueError(f"tensor size {shape} and stride {strides} differ in length")
    dtype = dtype or storage.dtype
    if dtype is None:
        raise ValueError("tensor has neither a typed storage nor a dtype")
    return _Tensor(storage, dtype, offset, shape, strides)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _Tensor:
    return _tensor(storage, storage_offset, size, stride, None)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       metadata=None) -> _Tensor:
    if not isinstance(dtype, _DType):
        raise ValueError(f"tensor dtype is not a torch dtype: {_short(dtype)}")
    if dtype.dtype is None:
        raise UnsupportedTensor(f"tensors of torch.{dtype.torch_name} are not supported")
    return _tensor(storage, storage_offset, size, stride, dtype.dtype)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None) -> _Tensor:
    if not isinstance(data, _Tensor):
        raise ValueError(f"parameter data is not a tensor: {type(data).__name__}")
    return data


_FUNCTIONS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


def _per_call(fn):
    def call(*args):
        return fn(*args)

    call.__name__ = call.__qualname__ = fn.__name__
    return call


def standins() -> dict[tuple[str, str], Any]:
    """The globals a state dict may name, each a fresh object: nothing one load does to them (a crafted BUILD sets
    attributes) can reach another load."""
    return {
        ("collections", "OrderedDict"): type("OrderedDict", (_Dict,), {}),
        **{key: _per_call(fn) for key, fn in _FUNCTIONS.items()},
        ("torch.storage", "UntypedStorage"): _StorageType(None),
        **{("torch", name): _StorageType(dtype) for name, dtype in _STORAGE_DTYPES.items()},
        **{("torch", name): _DType(dtype, name) for name, dtype in _TORCH_DTYPES.items()},
        **{("torch", name): _DType(None, name) for name in _OTHER_TORCH_DTYPES},
    }


ALLOWED = frozenset(standins())  # the names only; the objects are made per load


class _StateDictUnpickler(pickle.Unpickler):
    """Rebuilds a state dict from stand-ins made for this load; every other global is refused before it is looked up."""

    def __init__(self, file: io.BytesIO):
        super().__init__(file)
        self._standins = standins()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._standins[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise ValueError(f"unknown persistent id {_short(pid)}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise ValueError(f"invalid storage reference {_short(pid)}")
        return _Storage(key, kind.dtype, numel)


def _short(value: Any) -> str:
    """A bounded repr: a value from the file may be a tuple of a million items."""
    if isinstance(value, (tuple, list)) and len(value) > 8:
        return f"<{type(value).__name__} of {len(value)} items>"
    return f"{value!r:.80}"


def unpickle_state_dict(data: bytes) -> Any:
    """The object in ``data`` with tensors as stand-ins; raises :class:`RefusedGlobal` for any other global and
    :class:`PickleRefused` for anything else a state dict never does (see :mod:`chatglm.convert.pickle_scan`)."""
    scan_pickle(data, ALLOWED)
    return _StateDictUnpickler(io.BytesIO(data)).load()


# ------------------------------------------------------------------------------------------------- the reader


def _legacy_problem(head: bytes) -> Optional[str]:
    if head[:1] == b"\x80" or head[257:262] == b"ustar":
        return "legacy (non-zip) PyTorch serialization format, which this converter does not read; "
    return None


class TorchFile(TensorSource):
    """Tensors of one PyTorch zip checkpoint, each a view into one read-only memory map of the file."""

    def __init__(self, path: os.PathLike | str):
        self.path = Path(path)
        self._mmap: mmap.mmap | None = None
        self._tensors: dict[str, _Tensor] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._entries: dict[str, tuple[int, int]] = {}  # storage key -> (data offset in the file, byte size)
        with open_regular(self.path) as fh, reading(self.path):
            size = os.fstat(fh.fileno()).st_size
            state = self._open_zip(fh, size)
            self._collect(state)
            self._mmap = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def _open_zip(self, fh, size: int) -> Any:
        """The unpickled state dict, with every storage entry located; the zip is checked before it is trusted."""
        head = fh.read(512)
        try:
            torch_zip.check_directory(fh, size, self.path)
            if not zipfile.is_zipfile(fh):
                self._not_zip(head)
            with torch_zip.open_archive(fh, self.path) as zf:
                spans = torch_zip.check_members(zf, fh, size, self.path)
                prefix, state = self._read_pickle(zf)
                self._index_storages(zf, prefix, spans)
                return state
        except torch_zip.READ_ERRORS as exc:  # whatever the checks above did not foresee
            raise InputError(f"{torch_zip.CORRUPT}damaged zip archive ({torch_zip.describe(exc)})", self.path) from None

    def _not_zip(self, head: bytes) -> None:
        legacy = _legacy_problem(head)
        if legacy:
            raise InputError(legacy + RESAVE.format(path=self.path), self.path)
        if head[:4] == b"PK\x03\x04":
            raise InputError("corrupt PyTorch checkpoint: the zip archive has no central directory (truncated "
                             "download?)", self.path)
        raise InputError("not a PyTorch checkpoint (neither a zip archive nor a legacy torch file)", self.path)

    def _read_pickle(self, zf: zipfile.ZipFile) -> tuple[str, Any]:
        pickles = [i for i in zf.infolist() if i.filename.endswith("/data.pkl") and i.filename.count("/") == 1]
        if len(pickles) != 1:
            raise InputError("not a PyTorch zip checkpoint: expected one <archive>/data.pkl entry, found "
                             f"{len(pickles)}", self.path)
        info = pickles[0]
        prefix = info.filename[: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in zf.namelist():
            byteorder = torch_zip.read_member(zf, zf.getinfo(order), MAX_BYTEORDER, self.path).strip()
            if byteorder not in (b"little", b""):
                raise InputError(f"big-endian PyTorch checkpoint ({byteorder!r} byte order) is not supported; "
                                 "re-save it on a little-endian machine", self.path)
        data = torch_zip.read_member(zf, info, MAX_PICKLE, self.path)
        try:
            return prefix, unpickle_state_dict(data)
        except RefusedGlobal as exc:
            raise InputError(f"refusing to load: data.pkl calls {torch_zip.printable(str(exc))}, which a plain state "
                             "dict of tensors never needs (only tensors, storages and OrderedDict are allowed; nothing "
                             "was executed)", self.path) from None
        except PickleRefused as exc:
            raise InputError(f"refusing to load: data.pkl {exc}", self.path) from None
        except UnsupportedTensor as exc:
            raise InputError(f"data.pkl: {exc}", self.path) from None
        except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError, EOFError,
                RecursionError, MemoryError, UnicodeDecodeError, OverflowError) as exc:
            raise InputError(f"corrupt PyTorch checkpoint: data.pkl cannot be read as a state dict "
                             f"({torch_zip.describe(exc)})", self.path) from None

    def _index_storages(self, zf: zipfile.ZipFile, prefix: str, spans: dict[str, tuple[int, int]]) -> None:
        """Where each ``<archive>/data/<key>`` entry's bytes lie in the file (checked by :mod:`torch_zip`)."""
        for info in zf.infolist():
            if not info.filename.startswith(prefix + "data/"):
                continue
            key = info.filename[len(prefix) + 5 :]
            if info.compress_type != zipfile.ZIP_STORED:
                # torch.save never compresses storages; inflating one could be a zip bomb, so it is never read.
                raise InputError(f"storage {torch_zip.printable(key)} is compressed, which PyTorch never writes; "
                                 "re-save the checkpoint with torch.save", self.path)
            self._entries[key] = spans[info.filename]

    def _collect(self, state: Any) -> None:
        if not isinstance(state, dict):
            raise InputError(f"not a state dict: data.pkl holds a {type(state).__name__}, not a dict of tensors",
                             self.path)
        for name, tensor in dict.items(state):  # not state.items: a BUILD may have set an attribute "items"
            if not isinstance(name, str) or not isinstance(tensor, _Tensor):
                raise InputError(f"not a plain state dict: entry {name!r} is a {type(tensor).__name__}, "
                                 "not a tensor", self.path)
            self._infos[name] = self._check(name, tensor)
            self._tensors[name] = tensor

    def _check(self, name: str, t: _Tensor) -> TensorInfo:
        bad = f"corrupt PyTorch checkpoint: tensor {name!r}"
        if t.storage.key not in self._entries:
            raise InputError(f"{bad} refers to storage {t.storage.key!r}, which the archive lacks", self.path)
        if t.dtype not in DTYPES:
            raise InputError(f"{bad} has unsupported dtype {t.dtype}", self.path)
        itemsize = DTYPES[t.dtype].itemsize
        if t.storage.dtype is not None and t.storage.dtype != t.dtype:
            raise InputError(f"{bad} reads a {t.storage.dtype} storage as {t.dtype}", self.path)
        start, entry_bytes = self._entries[t.storage.key]
        storage_bytes = t.storage.numel * (itemsize if t.storage.dtype else 1)
        numel = math.prod(t.shape)
        last = t.offset + sum((n - 1) * s for n, s in zip(t.shape, t.stride)) if numel else 0
        if storage_bytes > entry_bytes or (numel and (last + 1) * itemsize > storage_bytes):
            raise InputError(f"{bad} (shape {list(t.shape)}, offset {t.offset}) runs past its storage "
                             f"{t.storage.key!r} ({entry_bytes} bytes)", self.path)
        if numel * itemsize > storage_bytes:  # only overlapping (e.g. expanded, stride-0) views can do this
            raise InputError(f"tensor {name!r} (shape {list(t.shape)}, stride {list(t.stride)}) has more elements "
                             "than its storage holds (an expanded view); save a contiguous copy", self.path)
        return TensorInfo(name, t.dtype, t.shape, max(start, 0) + t.offset * itemsize, numel * itemsize)

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def raw(self, name: str) -> np.ndarray:
        """The tensor in its stored dtype (bf16 as uint16): a read-only view into the map, strided as saved."""
        t = self._tensors[name]
        dtype = np.dtype(DTYPES[t.dtype].numpy)
        if math.prod(t.shape) == 0:
            return np.zeros(t.shape, dtype=dtype)
        start, entry_bytes = self._entries[t.storage.key]
        if self._mmap is None:
            raise InputError("file is closed", self.path)
        buffer = self._mmap
        count = entry_bytes // dtype.itemsize
        storage = np.frombuffer(buffer, dtype=dtype, count=count, offset=start)
        strides = tuple(s * dtype.itemsize for s in t.stride)
        return np.lib.stride_tricks.as_strided(storage[t.offset :], shape=t.shape, strides=strides, writeable=False)

    def close(self) -> None:
        # Views handed out keep the map alive through the buffer protocol; dropping our reference is enough.
        self._mmap = None

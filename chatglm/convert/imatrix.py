"""Reads llama.cpp importance matrices (``llama-imatrix`` output) into per-tensor arrays for the quantizer.

Two formats exist, and llama-quantize reads both:

* GGUF (the default since 2025): keys ``imatrix.datasets`` (string array), ``imatrix.chunk_count`` and
  ``imatrix.chunk_size`` (u32), and per weight two f32 tensors ``<name>.in_sum2`` (sums of squared activations, one
  row per expert) and ``<name>.counts`` (activation count per expert). The values handed to ggml are
  ``in_sum2 / round(count)`` per expert, or 1 where the count rounds to 0.
* the legacy ``.dat`` file, little-endian: i32 entry count; per entry i32 name length, the name, i32 ncall,
  i32 value count, the f32 values; then optionally i32 chunk count, i32 length and the dataset name. The values
  handed to ggml are ``values / ncall`` (unchanged when ncall is 0).

Names are GGUF tensor names (``blk.0.attn_qkv.weight``). :meth:`ImportanceMatrix.check_model` rejects a matrix
computed for another model: no shared tensor name, or a shared name whose length differs from the tensor's row
length times its expert count.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np
from gguf import GGMLQuantizationType

from chatglm.errors import InputError
from chatglm.fsutil import open_regular, reading
from chatglm.gguf_file import GGUFHeader, TensorEntry, read_header

log = logging.getLogger(__name__)

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
_SUMS, _COUNTS = ".in_sum2", ".counts"
_GGUF_MAGIC = b"GGUF"
_MAX_NAME = 4096  # far beyond any tensor name; a larger length means the bytes are something else


@dataclass
class ImportanceMatrix:
    """Per-tensor importance, float32 of n_expert x n_cols values, keyed by GGUF tensor name."""

    path: Path
    entries: dict[str, np.ndarray]
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    legacy: bool = False

    def check_model(self, shapes: Mapping[str, Sequence[int]]) -> None:
        """InputError unless this matrix fits the model whose tensors have these numpy ``shapes``."""
        shared = [name for name in self.entries if name in shapes]
        if not shared:
            sample = ", ".join(sorted(self.entries)[:3])
            raise InputError(f"imatrix for another model: none of its {len(self.entries)} tensors ({sample}, ...) "
                             "is in this model", self.path)
        for name in shared:
            self.for_tensor(name, shapes[name])

    def for_tensor(self, name: str, shape: Sequence[int]) -> Optional[np.ndarray]:
        """The values for tensor ``name`` of numpy ``shape`` (None if the matrix has none), checked in size.

        llama.cpp ignores a token_embd entry of the wrong size (embeddings see token ids, not activations).
        """
        values = self.entries.get(name)
        if values is None:
            return None
        if values.size != n_values(shape):
            if name == "token_embd.weight":
                return None
            raise InputError(f"imatrix for another model: {name} has {values.size} values, the model's tensor "
                             f"needs {n_values(shape)} (shape {tuple(shape)})", self.path)
        return values


def load_imatrix(path: Path | str) -> ImportanceMatrix:
    """Reads either format (told apart by the GGUF magic); InputError on a malformed file."""
    path = Path(path)
    with open_regular(path, missing="cannot read imatrix: no such file") as f, reading(path, "imatrix"):
        magic = f.read(4)
    matrix = _load_gguf(path) if magic == _GGUF_MAGIC else _load_legacy(path)
    log.info("%s: %d importance matrix entries from %d chunks", path, len(matrix.entries), matrix.chunk_count)
    return matrix


def _check_values(path: Path, name: str, values: np.ndarray) -> np.ndarray:
    if not np.isfinite(values).all() or (values < 0).any():
        raise InputError(f"imatrix entry {name} has negative or non-finite values", path)
    return values


class _Cursor:
    """Little-endian reads from the bytes of a legacy file, with the offset in every error."""

    def __init__(self, path: Path, data: bytes):
        self.path, self.data, self.pos = path, data, 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise InputError(f"truncated imatrix: {what} at byte {self.pos} needs {n} bytes, "
                             f"{len(self.data) - self.pos} left", self.path)
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def i32(self, what: str) -> int:
        return struct.unpack("<i", self.take(4, what))[0]

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def _load_legacy(path: Path) -> ImportanceMatrix:
    with reading(path):
        cur = _Cursor(path, path.read_bytes())
    n_entries = cur.i32("entry count")
    if n_entries < 1:
        raise InputError(f"not an imatrix file: entry count {n_entries}", path)
    entries: dict[str, np.ndarray] = {}
    for i in range(n_entries):  # each entry takes at least 17 bytes or fails as truncated: bounded by the file size
        name_len = cur.i32(f"entry {i} name length")
        if not 0 < name_len <= _MAX_NAME:
            raise InputError(f"not an imatrix file: entry {i} has a name length of {name_len}", path)
        name = cur.take(name_len, f"entry {i} name").decode("utf-8", errors="replace")
        if name in entries:
            raise InputError(f"imatrix has two entries for {name}", path)
        ncall = cur.i32(f"{name} call count")
        n_values = cur.i32(f"{name} value count")
        if n_values < 1:
            raise InputError(f"imatrix entry {name} has {n_values} values", path)
        sums = np.frombuffer(cur.take(4 * n_values, f"{name} values"), dtype="<f4").astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # inf/NaN are refused just below, without a warning
            values = sums / np.float32(ncall) if ncall > 0 else sums  # llama-quantize's normalisation
        entries[name] = _check_values(path, name, values)
    chunk_count, datasets = 0, []
    if not cur.at_end():
        chunk_count = cur.i32("chunk count")
        if not cur.at_end():
            n = cur.i32("dataset name length")
            if n > 0:
                datasets.append(cur.take(n, "dataset name").decode("utf-8", errors="replace"))
    return ImportanceMatrix(path, entries, datasets, chunk_count, legacy=True)


def _gguf_fields(header: GGUFHeader) -> tuple[list[str], int]:
    path = header.path
    missing = [k for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE) if k not in header.kv]
    if missing:
        raise InputError(f"not an imatrix GGUF: no {', '.join(missing)} (a model file?)", path)
    datasets, chunk_count = header.kv[KEY_DATASETS], header.kv[KEY_CHUNK_COUNT]
    if isinstance(datasets, str):
        datasets = [datasets]
    if not isinstance(datasets, list) or not all(isinstance(d, str) for d in datasets):
        raise InputError(f"{KEY_DATASETS} must be an array of strings", path)
    if type(chunk_count) is not int or chunk_count < 0:
        raise InputError(f"{KEY_CHUNK_COUNT} must be a non-negative integer, got {chunk_count!r}", path)
    return list(datasets), chunk_count


def _load_gguf(path: Path) -> ImportanceMatrix:
    """Read with our validating GGUF reader (counts, lengths and offsets checked against the file size, duplicate
    keys and tensor names refused), never gguf-py's, which trusts the declared counts."""
    try:
        header = read_header(path)
    except InputError as exc:
        raise InputError(f"malformed imatrix GGUF: {exc.problem}", path) from None
    datasets, chunk_count = _gguf_fields(header)
    tensors = header.tensors
    bases = {n[:-len(s)] for n in tensors for s in (_SUMS, _COUNTS) if n.endswith(s)}
    if not bases:
        raise InputError("imatrix GGUF holds no <tensor>.in_sum2 / .counts pairs", path)
    entries = {}
    with reading(path), open(path, "rb") as fh:
        for name in sorted(bases):
            sums, counts = tensors.get(name + _SUMS), tensors.get(name + _COUNTS)
            if sums is None or counts is None:
                raise InputError(f"imatrix GGUF has {_SUMS} without {_COUNTS} or the reverse for {name}", path)
            if sums.ggml_type != GGMLQuantizationType.F32 or counts.ggml_type != GGMLQuantizationType.F32:
                raise InputError(f"imatrix tensors of {name} are not f32", path)
            values = _normalise(path, name, _f32(fh, header, sums), _f32(fh, header, counts))
            entries[name] = _check_values(path, name, values)
    return ImportanceMatrix(path, entries, datasets, chunk_count)


def _f32(fh, header: GGUFHeader, tensor: TensorEntry) -> np.ndarray:
    """One f32 tensor's data (its size and place were checked against the file by read_header)."""
    fh.seek(header.data_offset + tensor.offset)
    return np.frombuffer(fh.read(tensor.nbytes), dtype="<f4")


def _normalise(path: Path, name: str, sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """in_sum2 / count per expert row, as llama-quantize computes it (float32, count rounded half away from 0)."""
    sums = np.asarray(sums, dtype=np.float32).reshape(-1)
    counts = np.asarray(counts, dtype=np.float32).reshape(-1)
    if counts.size == 0 or sums.size % counts.size:
        raise InputError(f"imatrix entry {name}: {sums.size} sums do not split into {counts.size} experts", path)
    wide = counts.astype(np.float64)
    rounded = np.where(wide >= 0, np.floor(wide + 0.5), np.ceil(wide - 0.5)).astype(np.float32)  # std::lround
    per_expert = sums.reshape(counts.size, -1)  # (n_expert, n_cols)
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.where(rounded[:, None] > 0, per_expert / rounded[:, None], np.float32(1))
    return values.astype(np.float32).reshape(-1)


def write_legacy(path: Path | str, entries: Mapping[str, tuple[int, np.ndarray]], chunk_count: int = 0,
                 dataset: str = "") -> None:
    """Writes a legacy ``.dat`` imatrix: name -> (ncall, raw values). For tests and tools."""
    parts = [struct.pack("<i", len(entries))]
    for name, (ncall, values) in entries.items():
        raw = name.encode()
        values = np.ascontiguousarray(values, dtype="<f4")
        parts += [struct.pack("<i", len(raw)), raw, struct.pack("<ii", ncall, values.size), values.tobytes()]
    parts += [struct.pack("<i", chunk_count), struct.pack("<i", len(dataset.encode())), dataset.encode()]
    Path(path).write_bytes(b"".join(parts))


def n_values(shape: Sequence[int]) -> int:
    """Values an imatrix entry for a tensor of numpy ``shape`` has (row length times experts)."""
    return (shape[-3] if len(shape) >= 3 else 1) * shape[-1]


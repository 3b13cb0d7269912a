"""Source tensors as every checkpoint reader describes them, and dtype conversion to float32."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    numpy: type  # storage dtype as numpy sees it (bf16 is stored as uint16)
    itemsize: int


DTYPES: dict[str, DType] = {
    "F64": DType(np.float64, 8),
    "F32": DType(np.float32, 4),
    "F16": DType(np.float16, 2),
    "BF16": DType(np.uint16, 2),
    "I64": DType(np.int64, 8),
    "I32": DType(np.int32, 4),
    "I16": DType(np.int16, 2),
    "I8": DType(np.int8, 1),
    "U8": DType(np.uint8, 1),
    "BOOL": DType(np.bool_, 1),
}

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # a key of DTYPES
    shape: tuple[int, ...]
    offset: int  # byte offset inside the reader's data area
    nbytes: int


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) to float32: the upper half of the float32 pattern, exactly."""
    wide = raw.astype(np.uint32)
    wide <<= 16  # in place: one float32-sized array, not two
    return wide.view(np.float32)


def to_array(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A stored tensor as a float32 array (a new array; the source map is never modified)."""
    if dtype == "BF16":
        return bf16_to_f32(raw)
    return np.asarray(raw, dtype=np.float32) if dtype in FLOAT_DTYPES else np.array(raw)


class TensorSource(ABC):
    """One file of tensors. Readers for every checkpoint format implement this."""

    path: object

    @abstractmethod
    def infos(self) -> dict[str, TensorInfo]: ...

    @abstractmethod
    def raw(self, name: str) -> np.ndarray:
        """The stored bytes as an array of the stored dtype (bf16 as uint16), without copying when possible."""

    def raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis in the stored dtype. Readers that can read part of a tensor
        override this so that streaming a large tensor never holds all of it."""
        return self.raw(name)[start:stop]

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 (integer tensors keep their dtype)."""
        return to_array(self.raw(name), self.infos()[name].dtype)

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first axis as float32 (integer tensors keep their dtype)."""
        return to_array(self.raw_rows(name, start, stop), self.infos()[name].dtype)

    def close(self) -> None:
        pass

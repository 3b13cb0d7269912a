"""THUDM's pre-quantized checkpoints (chatglm-6b-int4/-int8, chatglm2-6b-int4, ...): dequantized on the fly.

The published ``quantization.py`` (ChatGLM-6B and ChatGLM2-6B alike) replaces each quantized linear layer's weight
``W`` (rows, cols) by two tensors under the same module name:

- ``weight_scale`` (rows,), in the model's float type: ``max(|W[r, :]|) / (2**(bits-1) - 1)``;
- ``weight``, int8: ``round(W / scale[:, None])``; for 4 bits two values share a byte, the even column in the high
  nibble and the odd column in the low one (``byte = q[2j] << 4 | q[2j+1] & 0xF``), so it is (rows, cols / 2).

Its kernels rebuild ``W[r, c] = q[r, c] * scale[r]`` with the nibbles sign-extended (the CPU kernel in float32, the
GPU kernel in the scale's type). We multiply in float32, which is exact (an int8 times an f16/bf16 scale fits in
float32's mantissa), so an f16 output equals the GPU kernel's half-precision product bit for bit.

``config.json`` names the bit width in ``quantization_bit``. :func:`dequantized` wraps a checkpoint so that every
``X.weight`` with an ``X.weight_scale`` reads as the float32 matrix and the scales disappear: families need no change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from chatglm.convert.checkpoint import Checkpoint, CheckpointView
from chatglm.convert.tensors import FLOAT_DTYPES, TensorInfo
from chatglm.errors import InputError

log = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale"  # "X.weight" is scaled by "X.weight_scale"
BITS = (4, 8)


@dataclass(frozen=True)
class Quantized:
    """One quantized matrix: its packed int8 tensor, its per-row scales and its logical (rows, cols) shape."""

    weight: str
    scale: str
    shape: tuple[int, int]


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """(rows, cols/2) int8 bytes -> (rows, cols) int8 values in [-8, 7]: high nibble first, both sign-extended."""
    packed = np.asarray(packed, dtype=np.int8)
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.int8)  # (rows, cols)
    out[:, 0::2] = packed >> 4  # arithmetic shift of a signed byte: the high nibble, sign-extended
    out[:, 1::2] = np.left_shift(packed, 4) >> 4  # the low nibble moved up (wrapping), then shifted back
    return out


def dequantize(packed: np.ndarray, scale: np.ndarray, bits: int) -> np.ndarray:
    """THUDM's ``extract_weight_to_*``: q * scale[row] in float32 (exact)."""
    q = unpack_int4(packed) if bits == 4 else np.asarray(packed, dtype=np.int8)
    return q.astype(np.float32) * np.asarray(scale, dtype=np.float32)[:, None]


def quantization_bits(ckpt: Checkpoint | CheckpointView) -> int:
    """config.json's ``quantization_bit``: 0 (absent, null or 0), 4 or 8."""
    value = ckpt.config.get("quantization_bit") or 0
    if type(value) is not int or value not in (0, *BITS):
        raise InputError(f"quantization_bit must be 0, 4 or 8, got {value!r}", ckpt.dir / "config.json")
    return value


def find_quantized(ckpt: Checkpoint | CheckpointView, bits: int) -> dict[str, Quantized]:
    """Every ``X.weight`` that has an ``X.weight_scale``, checked: int8, 2-D, one float scale per row."""
    names = set(ckpt.names())
    found: dict[str, Quantized] = {}
    for scale in sorted(n for n in names if n.endswith(".weight" + SCALE_SUFFIX)):
        weight = scale[: -len(SCALE_SUFFIX)]
        where = ckpt.file_of(scale)
        if weight not in names:
            raise InputError(f"tensor {scale!r} has no quantized {weight!r} beside it", where)
        if not bits:
            raise InputError(f"tensor {weight!r} is quantized (it has a {SCALE_SUFFIX[1:]}) but config.json has no "
                             "quantization_bit (4 or 8)", ckpt.dir / "config.json")
        w, s = ckpt.info(weight), ckpt.info(scale)
        if w.dtype != "I8" or len(w.shape) != 2:
            raise InputError(f"quantized tensor {weight!r} must be a 2-D int8 matrix, got {w.dtype} "
                             f"{list(w.shape)}", ckpt.file_of(weight))
        if s.dtype not in FLOAT_DTYPES or s.shape != w.shape[:1]:
            raise InputError(f"tensor {scale!r} must hold one float scale per row of {weight!r} "
                             f"({w.shape[0]}), got {s.dtype} {list(s.shape)}", where)
        rows, cols = w.shape
        found[weight] = Quantized(weight, scale, (rows, cols * 8 // bits))
    return found


class DequantizedCheckpoint(CheckpointView):
    """A THUDM quantized checkpoint read as float32 weights (scales hidden)."""

    def __init__(self, base: Checkpoint | CheckpointView, bits: int, quantized: dict[str, Quantized]):
        super().__init__(base)
        self.bits = bits
        self.quantized = quantized
        self._scales = {q.scale for q in quantized.values()}
        # What families see is a float checkpoint: the quantization setting no longer describes these weights.
        self.config = {k: v for k, v in base.config.items() if k != "quantization_bit"}

    def names(self) -> list[str]:
        return [n for n in self.base.names() if n not in self._scales]

    def info(self, name: str) -> TensorInfo:
        q = self.quantized.get(name)
        if q is None:
            return self.base.info(name)
        packed = self.base.info(name)
        return TensorInfo(name, "F32", q.shape, packed.offset, q.shape[0] * q.shape[1] * 4)

    def load(self, name: str) -> np.ndarray:
        q = self.quantized.get(name)
        if q is None:
            return self.base.load(name)
        return dequantize(self.base.load(q.weight), self.base.load(q.scale), self.bits)


def dequantized(ckpt: Checkpoint | CheckpointView) -> Checkpoint | CheckpointView:
    """``ckpt`` itself when nothing in it is quantized, else a view presenting float32 weights."""
    bits = quantization_bits(ckpt)
    quantized = find_quantized(ckpt, bits)
    if not quantized:
        if bits:
            log.warning("config.json says quantization_bit=%d but no tensor is quantized; converting the float "
                        "weights as they are", bits)
        return ckpt
    log.info("dequantizing %d int%d THUDM matrices", len(quantized), bits)
    return DequantizedCheckpoint(ckpt, bits, quantized)

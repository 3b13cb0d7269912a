"""The ``chatglm_glmasr_rope`` projector file: its header checked into :class:`RopeEncoderParams` and every tensor
against :func:`expected_tensors` (shape and type, before any native call), then the tensors copied into one ggml
CPU buffer (a projector is small: 1.3 GB at most for GLM-ASR-Nano in f32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from chatglm.errors import InputError
from chatglm.families.glm_asr.rope_layout import (KEY_BOA, KEY_EPS, KEY_K_BIAS, KEY_THETA, KEYS, POSITIONS,
                                                  RopeEncoderParams, expected_tensors, require_tensor)
from chatglm.fsutil import open_regular
from chatglm.ggml.backend import Buffer, cpu_buffer_type, tensor_set
from chatglm.ggml.ops import F16, F32, Graph, Tensor
from chatglm.gguf_file import GGUFHeader

BF16, Q8_0 = 30, 8
MATRIX_TYPES = {F32: 1, F16: 1, BF16: 1, Q8_0: 32}  # ggml type -> the row length it needs a multiple of
KERNEL_TYPES = (F32, F16)  # im2col's kernel operand of the conv mul_mat
MAX_WIDTH = 1 << 16


def check_header(header: GGUFHeader, fail: Callable[[str], Exception]) -> RopeEncoderParams:
    """The encoder's sizes from the header, each tensor there with its shape and a type the graph's ops take."""
    sizes = {}
    for field, key in KEYS.items():
        v = header.get(key)
        if type(v) is not int or not 1 <= v <= MAX_WIDTH:
            raise fail(f"projector key {key} is missing or not an integer in 1..{MAX_WIDTH}")
        sizes[field] = v
    eps, theta = header.get(KEY_EPS), header.get(KEY_THETA)
    for key, v in ((KEY_EPS, eps), (KEY_THETA, theta)):
        if not isinstance(v, float) or not math.isfinite(v) or not 0 < v < 1e9:
            raise fail(f"projector key {key} is missing or not a positive number")
    flags = {k: header.get(k) for k in (KEY_K_BIAS, KEY_BOA)}
    if any(type(v) is not bool for v in flags.values()):
        raise fail(f"projector keys {KEY_K_BIAS} and {KEY_BOA} must be booleans")
    p = RopeEncoderParams(**sizes, theta=theta, eps=eps, k_bias=flags[KEY_K_BIAS], boa_eoa=flags[KEY_BOA])
    if p.d % p.n_head or p.n_head % p.n_head_kv or p.rope_dim % 2 or p.rope_dim > p.head_dim:
        raise fail(f"projector sizes do not fit: width {p.d}, {p.n_head} heads, {p.n_head_kv} key-value heads, "
                   f"{p.rope_dim} rotated dims")
    if POSITIONS % p.stack or p.n_pos < POSITIONS:
        raise fail(f"projector stack_factor {p.stack} / context {p.n_pos} do not fit {POSITIONS} positions per 30 s")
    if p.n_layer * 15 > len(header.tensors):
        raise fail(f"projector declares {p.n_layer} encoder layers but holds {len(header.tensors)} tensors")
    for name, shape in expected_tensors(p).items():
        _check_tensor(header, name, shape, fail)
    return p


def _check_tensor(header: GGUFHeader, name: str, shape: tuple[int, ...], fail) -> None:
    t = require_tensor(header, name, shape, fail)
    allowed = (F32,) if len(shape) == 1 else KERNEL_TYPES if len(shape) == 3 else tuple(MATRIX_TYPES)
    if t.ggml_type not in allowed or shape[0] % MATRIX_TYPES.get(t.ggml_type, 1):
        raise fail(f"projector tensor {name} has ggml type {t.ggml_type}, which the encoder graph does not take "
                   "there")


@dataclass
class EncoderWeights:
    """The projector's tensors in one ggml CPU buffer, by name."""

    params: RopeEncoderParams
    tensors: dict[str, Tensor]
    host: dict[str, np.ndarray]  # the f32 vectors read back on the host (begin/end-of-audio)
    _ctx: Graph
    _buf: Buffer

    def close(self) -> None:
        self._buf.close()
        self._ctx.close()


def load(header: GGUFHeader, params: RopeEncoderParams) -> EncoderWeights:
    names = list(expected_tensors(params))
    ctx = Graph(len(names))
    buf = None
    try:
        tensors = {n: ctx.new(header.tensors[n].ggml_type, header.tensors[n].shape, n) for n in names}
        buf = Buffer.for_tensors(ctx.ctx, cpu_buffer_type())
        host = {}
        with open_regular(header.path) as fh:
            for n in names:
                entry = header.tensors[n]
                fh.seek(header.data_offset + entry.offset)
                data = np.frombuffer(fh.read(entry.nbytes), dtype=np.uint8)
                if data.nbytes != entry.nbytes:
                    raise InputError(f"projector tensor {n} runs past the end of the file", header.path)
                tensor_set(tensors[n], data)
                if n in ("a.boa", "a.eoa"):
                    host[n] = data.view(np.float32).copy()
        return EncoderWeights(params, tensors, host, ctx, buf)
    except BaseException:
        if buf is not None:
            buf.close()
        ctx.close()
        raise

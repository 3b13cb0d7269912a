"""P-Tuning v2 prefixes at run time: the first ``pre_seq_len`` cells of llama.cpp's KV cache.

The published ChatGLM2/3 code (``modeling_chatglm.py``) concatenates the prefix's keys and values in front of every
layer's cache, never rotated (rotary embedding applies only to the new tokens' queries and keys), lets every token
attend to all of it, and numbers the prompt's positions from 0. llama.cpp keeps rotated keys and masks by position,
so the prefix goes into cells 0..P-1 (every later token sees them) and the tokens run at positions P, P+1, ...
A query at position P+i against a prefix key k stored as R(P)k scores q·R(P+i)ᵀR(P)k = q·R(i)ᵀk: exactly the
published score of the query at position i against the unrotated k, and token-to-token scores depend only on the
distance, which the shift keeps. So the keys are written rotated by position P, with the GGUF's own RoPE settings
(llama.cpp's "normal" pairs (2i, 2i+1) for the first n_rot dimensions).

The cells are written through llama.cpp's sequence-state API: P placeholder tokens are evaluated (making cells with
the right positions), their state is read back, the keys and values replaced, and the state loaded again. The
engine then never drops those cells: its truncation starts at P, so KV reuse, ``/clear`` and context trimming keep
the prefix.
"""

from __future__ import annotations

import ctypes
import struct
from typing import Optional

import numpy as np

from chatglm import limits
from chatglm.errors import InputError, ModelRuntimeError
from chatglm.gguf_file import GGUFHeader
from chatglm.ggml import quants
from chatglm.schema import keys

F32, F16, BF16 = 0, 1, 30
IO_MAGIC = 0xAF143CD8  # llama-context.cpp's io_magic, in front of every sequence state


def _head_dim(header: GGUFHeader) -> int:
    n_head = int(header.arch_get("attention.head_count", 0) or 1)
    return int(header.arch_get("attention.key_length") or int(header.arch_get("embedding_length", 0)) // n_head)


def rope_settings(header: GGUFHeader, prefix: np.ndarray) -> dict:
    """What llama.cpp's chatglm graph rotates keys with (llama-model.cpp's hparams of the arch), and the position
    ``pos`` to rotate the prefix keys by: P - the first token's published position (P for THUDM's prefixes, 0 for
    PEFT's on transformers' classes, whose keys then stay as trained)."""
    head_dim = _head_dim(header)
    factor = header.arch_get("rope.scaling.factor") or 1.0
    linear = header.arch_get("rope.scaling.type", "linear") in ("linear", "none") and factor
    return {"n_rot": int(header.arch_get("rope.dimension_count", head_dim)), "head_dim": head_dim,
            "freq_base": float(header.arch_get("rope.freq_base", 10000.0)),
            "freq_scale": 1.0 / float(factor) if linear else 1.0,
            "pos": prefix.shape[2] - first_position(header, prefix.shape[2])}


def first_position(header: GGUFHeader, n: int) -> int:
    """Where the published forward numbers the first token after the prefix of ``n`` entries: 0 or ``n``."""
    value = header.get(keys.PTUNING_FIRST_POSITION, 0)
    if type(value) is not int or value not in (0, n):
        raise InputError(f"{keys.PTUNING_FIRST_POSITION} must be 0 or the prefix's {n} entries, got {value!r}",
                         header.path)
    return value


def read_prefix(header: GGUFHeader) -> Optional[np.ndarray]:
    """The GGUF's prefix, float32 (n_layer, 2, P, n_head_kv * head_dim), checked against the model; None if none."""
    n = header.get(keys.PTUNING_PRE_SEQ_LEN)
    if n is None:
        return None
    if type(n) is not int or not 0 < n <= limits.MAX_CONTEXT:
        raise InputError(f"{keys.PTUNING_PRE_SEQ_LEN} must be a positive integer, got {n!r}", header.path)
    try:
        layout = [int(v) for v in header.array(keys.PTUNING_LAYOUT)]
        values = _values(header)
    except (TypeError, ValueError, OverflowError):
        raise InputError("the P-Tuning prefix's layout or values are not numbers", header.path) from None
    n_layer = int(header.arch_get("block_count", 0))
    n_kv = int(header.arch_get("attention.head_count_kv", header.arch_get("attention.head_count", 0)))
    want = [n_layer, 2, int(n), n_kv * _head_dim(header)]
    if layout != want or values.size != int(np.prod(want)):
        raise InputError(f"the P-Tuning prefix has layout {layout} ({values.size} values), this model needs {want}",
                         header.path)
    if not np.isfinite(values).all():
        raise InputError("the P-Tuning prefix holds NaN or infinite values", header.path)
    first_position(header, int(n))
    return values.reshape(want)


def _values(header: GGUFHeader) -> np.ndarray:
    """The stored values as float32: an f32 array, or IEEE half bits in a u16 one (``prefix_type`` f16)."""
    kind = header.get(keys.PTUNING_PREFIX_TYPE, "f32")
    raw = np.asarray(header.array(keys.PTUNING_PREFIX))
    if kind == "f32":
        return raw.astype(np.float32)
    if kind != "f16":
        raise InputError(f"{keys.PTUNING_PREFIX_TYPE} must be f32 or f16, got {kind!r}", header.path)
    if raw.size and (raw.dtype.kind not in "iu" or raw.min() < 0 or raw.max() > 0xFFFF):
        raise InputError("the f16 P-Tuning prefix is not an array of 16-bit values", header.path)
    return raw.astype(np.uint16).view(np.float16).astype(np.float32)


def rotated_keys(k: np.ndarray, *, pos: int, n_rot: int, head_dim: int, freq_base: float,
                 freq_scale: float = 1.0) -> np.ndarray:
    """Keys (P, n_head_kv * head_dim) rotated as llama.cpp's normal RoPE rotates a key at position ``pos``."""
    x = k.astype(np.float64).reshape(k.shape[0], -1, head_dim).copy()
    i = np.arange(n_rot // 2, dtype=np.float64)
    theta = pos * freq_scale * freq_base ** (-2.0 * i / n_rot)
    cos, sin = np.cos(theta), np.sin(theta)
    a, b = x[..., 0:n_rot:2].copy(), x[..., 1:n_rot:2].copy()
    x[..., 0:n_rot:2] = a * cos - b * sin
    x[..., 1:n_rot:2] = a * sin + b * cos
    return x.reshape(k.shape).astype(np.float32)


def encode(rows: np.ndarray, ggml_type: int) -> bytes:
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if ggml_type == F32:
        return rows.tobytes()
    if ggml_type == F16:
        return rows.astype(np.float16).tobytes()
    if ggml_type == BF16:  # round to nearest even, as ggml_fp32_to_bf16 does (the values are finite)
        bits = rows.view(np.uint32).astype(np.uint64)
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16).tobytes()
    return quants.quantize(rows, ggml_type, threads=1).tobytes()


def _rebuilt_state(blob: bytes, prefix: np.ndarray, keys_rot: list[np.ndarray]) -> bytes:
    """``blob`` (llama_context::state_seq_get_data: its header, then llama_kv_cache::state_write of
    P cells of one stream) with the prefix's keys and values."""
    n_layer, _, n, width = prefix.shape
    out = bytearray(blob)
    at = 0

    def take(fmt: str) -> tuple:
        nonlocal at
        vals = struct.unpack_from(fmt, out, at)
        at += struct.calcsize(fmt)
        return vals

    magic, _seq, n_stream, cells = take("<IiII")  # llama_context's io header (IO_MAGIC, seq id), then the cache's
    if magic != IO_MAGIC:
        raise ModelRuntimeError(f"unexpected KV cache state (magic {magic:#x})")
    if n_stream != 1 or cells != n:
        raise ModelRuntimeError(f"unexpected KV cache state ({n_stream} streams, {cells} cells for a prefix of {n})")
    for _ in range(cells):
        _pos, n_seq = take("<iI")
        at += 4 * n_seq
    v_trans, layers = take("<II")
    if layers != n_layer:
        raise ModelRuntimeError(f"the KV cache has {layers} layers, the prefix {n_layer}")

    def put(data: bytes) -> None:
        nonlocal at
        out[at:at + len(data)] = data
        at += len(data)

    for il in range(n_layer):
        k_type, row = take("<iQ")
        data = encode(keys_rot[il], k_type)
        if len(data) != row * n:
            raise ModelRuntimeError(f"KV cache key rows of {row} bytes do not fit a prefix {width} wide")
        put(data)
    for il in range(n_layer):
        if not v_trans:
            v_type, row = take("<iQ")
            data = encode(prefix[il, 1], v_type)
            if len(data) != row * n:
                raise ModelRuntimeError(f"KV cache value rows of {row} bytes do not fit a prefix {width} wide")
        else:
            v_type, _el, n_embd = take("<iII")
            if n_embd != width:
                raise ModelRuntimeError(f"KV cache values {n_embd} wide, the prefix {width}")
            data = encode(prefix[il, 1].T, v_type)  # one row per dimension, one element per cell
        put(data)
    if at != len(out):
        raise ModelRuntimeError("unexpected KV cache state (trailing bytes)")
    return bytes(out)


def install(ll, ctx, mem, batch, n_batch: int, prefix: np.ndarray, rope: dict, fill_batch) -> None:
    """Write ``prefix`` into cells 0..P-1 of sequence 0 of ``ctx`` (an empty cache)."""
    n_layer, _, n, _ = prefix.shape
    for start in range(0, n, n_batch):
        count = min(n_batch, n - start)
        fill_batch(batch, [0] * count, start, logits_last=False)
        if ll.llama_decode(ctx, batch) != 0:
            raise ModelRuntimeError(f"could not make room for the P-Tuning prefix of {n} entries in the KV cache")
    size = ll.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    got = ll.llama_state_seq_get_data(ctx, buf, size, 0)
    keys_rot = [rotated_keys(prefix[il, 0], **rope) for il in range(n_layer)]
    blob = _rebuilt_state(bytes(buf[:got]), prefix, keys_rot)
    ll.llama_memory_seq_rm(mem, 0, -1, -1)
    src = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
    if ll.llama_state_seq_set_data(ctx, src, len(blob), 0) != len(blob):
        raise ModelRuntimeError("llama.cpp refused the P-Tuning prefix's KV cache state")

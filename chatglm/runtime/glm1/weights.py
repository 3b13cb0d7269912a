"""Weights of a ``chatglm1`` GGUF as ggml tensors: checked against the hyperparameters, then mapped, not copied.

The file is memory-mapped and handed to ggml as one host buffer; tensors point into it. Matrix weights whose type the
CPU backend can re-lay out for faster matmuls (its CPU_REPACK buffer type, as llama.cpp uses by default) are copied
into that buffer instead. 1-D tensors (norms, biases) are converted to f32 in a small buffer of their own.
"""

from __future__ import annotations

import dataclasses
import logging
import mmap
from dataclasses import dataclass
from typing import Callable, Optional

import gguf
import numpy as np

from chatglm import limits
from chatglm.errors import InputError
from chatglm.fsutil import open_regular
from chatglm.ggml import ops
from chatglm.ggml.backend import Backend, Buffer, cpu_buffer_type, tensor_get, tensor_set
from chatglm.ggml.ops import F32, Graph, Tensor
from chatglm.gguf_file import GGUFHeader, TensorEntry
from chatglm.runtime.glm1.graph import GLM1Config, LayerWeights, Weights, pair_tensors
from chatglm.runtime.pages import release_mmap_range

log = logging.getLogger(__name__)

LAYER_FIELDS = {  # LayerWeights field -> GGUF name inside blk.N.
    "attn_norm": "attn_norm.weight", "attn_norm_b": "attn_norm.bias", "qkv": "attn_qkv.weight",
    "qkv_b": "attn_qkv.bias", "attn_out": "attn_output.weight", "attn_out_b": "attn_output.bias",
    "ffn_norm": "ffn_norm.weight", "ffn_norm_b": "ffn_norm.bias", "ffn_up": "ffn_up.weight",
    "ffn_up_b": "ffn_up.bias", "ffn_down": "ffn_down.weight", "ffn_down_b": "ffn_down.bias",
}
SMALL_TYPES = {int(gguf.GGMLQuantizationType.F32): np.float32, int(gguf.GGMLQuantizationType.F16): np.float16,
               int(gguf.GGMLQuantizationType.BF16): np.uint16}


def expected_shapes(cfg: GLM1Config) -> dict[str, tuple[int, ...]]:
    """Every tensor the graph reads, in ggml order (ne0 first). ``output.weight`` is optional (tied)."""
    e, ff, v = cfg.n_embd, cfg.n_ff, cfg.n_vocab
    per_layer = {"attn_norm": (e,), "attn_norm_b": (e,), "qkv": (e, 3 * e), "qkv_b": (3 * e,),
                 "attn_out": (e, e), "attn_out_b": (e,), "ffn_norm": (e,), "ffn_norm_b": (e,),
                 "ffn_up": (e, ff), "ffn_up_b": (ff,), "ffn_down": (ff, e), "ffn_down_b": (e,)}
    shapes = {"token_embd.weight": (e, v), "output_norm.weight": (e,), "output_norm.bias": (e,),
              "output.weight": (e, v)}
    for il in range(cfg.n_layer):
        shapes.update({f"blk.{il}.{LAYER_FIELDS[f]}": s for f, s in per_layer.items()})
    return shapes


def check_tensors(header: GGUFHeader, cfg: GLM1Config) -> dict[str, tuple[int, ...]]:
    """Every tensor the graph reads is there with its shape; the table is built only once the declared block count
    is one the file's tensors can hold (so a block_count of 10**9 costs nothing)."""
    if cfg.n_layer * len(LAYER_FIELDS) > len(header.tensors):
        raise InputError(f"GGUF declares block_count {cfg.n_layer} but holds only {len(header.tensors)} tensors "
                         f"({len(LAYER_FIELDS)} per block are needed)", header.path)
    shapes = expected_shapes(cfg)
    if "output.weight" not in header.tensors:
        del shapes["output.weight"]
    missing = [n for n in shapes if n not in header.tensors]
    if missing:
        raise InputError(f"GGUF lacks tensors: {', '.join(missing[:6])}" + (" ..." if len(missing) > 6 else ""),
                         header.path)
    for name, shape in shapes.items():
        entry = header.tensors[name]
        if tuple(entry.shape) != shape:
            raise InputError(f"tensor {name} has shape {list(entry.shape)}, expected {list(shape)} from the "
                             "file's hyperparameters", header.path)
        if len(shape) == 1 and entry.ggml_type not in SMALL_TYPES:
            raise InputError(f"tensor {name} is {ops.type_name(entry.ggml_type)}; 1-D tensors must be f32/f16/bf16",
                             header.path)
        if len(shape) > 1 and entry.ggml_type in limits.WEIGHT_TYPES_REFUSED:
            raise InputError(f"tensor {name} has type {limits.WEIGHT_TYPES_REFUSED[entry.ggml_type]}, which ggml "
                             "cannot use as a weight", header.path)
        ops.type_traits(entry.ggml_type)  # a type this libggml knows
    return shapes


@dataclass
class ModelWeights:
    """Owns the mapping, the ggml contexts and buffers behind :class:`Weights`."""

    weights: Weights
    repacked: int  # tensors moved to the repack buffer
    _parts: list

    def close(self) -> None:
        for part in reversed(self._parts):
            part.close()
        self._parts = []


class _Mapping:
    def __init__(self, path) -> None:
        self._fh = open_regular(path)
        self.mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.view = np.frombuffer(self.mm, dtype=np.uint8)
        self.base = self.view.ctypes.data

    def close(self) -> None:
        self.view = None  # type: ignore[assignment]
        self.mm.close()
        self._fh.close()


def load_weights(header: GGUFHeader, cfg: GLM1Config, backend: Backend, repack: bool = True,
                 on_progress: Optional[Callable[[int, int], None]] = None) -> ModelWeights:
    shapes = check_tensors(header, cfg)
    parts: list = []
    try:
        mapping = _Mapping(header.path)
        parts.append(mapping)
        tensors, n_repacked = _place(header, shapes, backend, mapping, parts, repack, on_progress)
        weights = _with_pairs(cfg, _assemble(cfg, tensors), parts)
    except BaseException:
        for part in reversed(parts):
            part.close()
        raise
    return ModelWeights(weights, n_repacked, parts)


def _place(header: GGUFHeader, shapes: dict, backend: Backend, mapping: _Mapping, parts: list, repack: bool,
           on_progress) -> tuple[dict[str, Tensor], int]:
    """Create every tensor in the context of its home (mapped file, f32 copy, repack buffer) and give it memory."""
    entries = {n: header.tensors[n] for n in shapes}
    small = [n for n, s in shapes.items() if len(s) == 1]
    buft = next(iter(backend.extra_buffer_types()), None) if repack else None
    fast = [n for n in shapes if buft and n not in small and n != "token_embd.weight"
            and backend.supports_mul_mat_in(buft, entries[n].ggml_type, entries[n].shape)]
    mapped = [n for n in shapes if n not in small and n not in fast]
    tensors: dict[str, Tensor] = {}
    for names, kind in ((mapped, "mapped"), (small, "small"), (fast, "fast")):
        if not names:
            continue
        ctx = Graph(len(names))
        parts.append(ctx)
        made = {n: ctx.new(F32 if kind == "small" else entries[n].ggml_type, entries[n].shape, n) for n in names}
        tensors.update(made)
        if kind == "mapped":
            host = Buffer.from_host(mapping.base, header.file_size, mapping)
            parts.append(host)
            for n, t in made.items():
                host.place(t, mapping.base + header.data_offset + entries[n].offset, mapping.base)
        else:
            buf = Buffer.for_tensors(ctx.ctx, cpu_buffer_type() if kind == "small" else buft)
            parts.append(buf)
            for i, (n, t) in enumerate(made.items()):
                _fill(t, entries[n], mapping, header)
                if kind == "fast":  # the copy is what runs; its mapped source need not stay resident
                    release_mmap_range(mapping.mm, header.data_offset + entries[n].offset, entries[n].nbytes)
                    if on_progress:
                        on_progress(i + 1, len(made))
    log.debug("GLM-1 weights: %d mapped, %d repacked, %d small", len(mapped), len(fast), len(small))
    return tensors, len(fast)


def _fill(t: Tensor, e: TensorEntry, mapping: _Mapping, header: GGUFHeader) -> None:
    start = header.data_offset + e.offset
    if len(e.shape) == 1:  # norms and biases: converted to f32
        raw = np.frombuffer(mapping.mm, dtype=SMALL_TYPES[e.ggml_type], count=e.shape[0], offset=start)
        values = (raw.astype(np.uint32) << 16).view(np.float32) if raw.dtype == np.uint16 else raw
        tensor_set(t, np.ascontiguousarray(values, dtype=np.float32))
    else:
        tensor_set(t, mapping.base + start, e.nbytes)


def _assemble(cfg: GLM1Config, tensors: dict[str, Tensor]) -> Weights:
    layers = [LayerWeights(**{f: tensors[f"blk.{il}.{name}"] for f, name in LAYER_FIELDS.items()})
              for il in range(cfg.n_layer)]
    output = tensors.get("output.weight", tensors["token_embd.weight"])
    return Weights(tensors["token_embd.weight"], layers, tensors["output_norm.weight"], tensors["output_norm.bias"],
                   output)


PAIRS = {"attn": ("attn_norm", "attn_norm_b", "attn_out_b"), "ffn": ("ffn_norm", "ffn_norm_b", "ffn_down_b")}


def _with_pairs(cfg: GLM1Config, weights: Weights, parts: list) -> Weights:
    """Each layer's pair tensors (graph.pair_tensors), computed from its f32 norms and biases, in a buffer of
    their own."""
    ctx = Graph(len(PAIRS) * 2 * cfg.n_layer)
    parts.append(ctx)
    made = [{f"{k}_pair_{x}": ctx.new(F32, (cfg.n_embd, 2), f"blk.{il}.{k}_pair_{x}") for k in PAIRS for x in "wb"}
            for il in range(cfg.n_layer)]
    buf = Buffer.for_tensors(ctx.ctx, cpu_buffer_type())
    parts.append(buf)
    layers = []
    for layer, fields in zip(weights.layers, made):
        for kind, names in PAIRS.items():
            values = [tensor_get(getattr(layer, n), np.empty(cfg.n_embd, np.float32)) for n in names]
            for x, rows in zip("wb", pair_tensors(cfg.alpha, *values)):
                tensor_set(fields[f"{kind}_pair_{x}"], np.ascontiguousarray(rows))
        layers.append(dataclasses.replace(layer, **fields))
    return dataclasses.replace(weights, layers=layers)

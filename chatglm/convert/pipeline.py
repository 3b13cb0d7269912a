"""The conversion pipeline: checkpoint folder → one GGUF, one tensor at a time, written atomically."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import gguf
import numpy as np

from chatglm import __version__
from chatglm.convert import qtypes
from chatglm.convert.checkpoint import Checkpoint
from chatglm.convert.family import Family, OutTensor, check_complete, detect
from chatglm.convert.lora import merged, refuse_prefix_tuning
from chatglm.convert.thudm_quant import dequantized
from chatglm.errors import InputError
from chatglm.fsutil import atomic_path
from chatglm.ggml import quants

log = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, tensor name)


@dataclass
class ConvertResult:
    path: Path
    family: str
    arch: str
    qtype: str
    n_tensors: int
    nbytes: int
    seconds: float


@dataclass
class _Planned:
    tensor: OutTensor
    qtype: gguf.GGMLQuantizationType
    nbytes: int


def default_output(model_dir: Path, qtype: str) -> Path:
    return Path.cwd() / f"{model_dir.resolve().name}-{qtype.lower()}.gguf"


def convert(
    model_dir: os.PathLike | str,
    out: Optional[os.PathLike | str] = None,
    qtype: str = "f16",
    *,
    imatrix: Optional[os.PathLike | str] = None,
    threads: Optional[int] = None,
    progress: Optional[Progress] = None,
    lora: Sequence[os.PathLike | str] = (),
    lora_scale: float | Sequence[float] = 1.0,
) -> ConvertResult:
    """Convert a Hugging Face checkpoint folder to a GGUF file of the given type (or mixed recipe).

    THUDM int4/int8 checkpoints are dequantized on the fly; ``lora`` adapters (PEFT folders) are merged into the
    weights, each scaled by ``lora_scale`` (one value for all, or one per adapter).
    """
    start = time.perf_counter()
    recipe = qtypes.get_recipe(qtype)
    model_dir = Path(model_dir)
    with Checkpoint(model_dir) as raw:
        refuse_prefix_tuning(raw)
        ckpt = merged(dequantized(raw), lora, lora_scale)
        family = detect(ckpt)
        plan = family.tensors()
        check_complete(family, plan)
        family.check_shapes(plan)
        importance = load_imatrix(imatrix, plan) if imatrix is not None else None
        planned = _plan_types(family, plan, recipe, has_imatrix=importance is not None)
        dest = Path(out) if out is not None else default_output(model_dir, qtype)
        with atomic_path(dest) as tmp:
            writer = gguf.GGUFWriter(tmp, family.arch)
            _write_header(writer, family, recipe, planned)
            total = sum(p.nbytes for p in planned)
            done = 0
            for p in planned:
                data = _materialize(ckpt, p, importance, threads)
                writer.write_tensor_data(data)
                done += p.nbytes
                if progress:
                    progress(done, total, p.tensor.name)
            writer.close()
    seconds = time.perf_counter() - start
    log.info("wrote %s: %d tensors, %d bytes in %.1fs", dest, len(planned), total, seconds)
    return ConvertResult(dest, family.name, family.arch, recipe.name, len(planned), dest.stat().st_size, seconds)


def _plan_types(family: Family, plan: list[OutTensor], recipe: qtypes.Recipe, has_imatrix: bool) -> list[_Planned]:
    hp = family.hp
    model = qtypes.ModelInfo(family.arch, hp.n_layer, hp.n_head, hp.n_head_kv, getattr(hp, "n_expert", 0))
    types = qtypes.plan_types(recipe, [(t.name, t.shape) for t in plan], model, has_imatrix=has_imatrix)
    return [_Planned(t, types[t.name], quants.tensor_nbytes(types[t.name], t.shape)) for t in plan]


def load_imatrix(path: os.PathLike | str, plan: list[OutTensor]) -> dict[str, np.ndarray]:
    """Per-tensor importance for the quantizer, checked against this model's tensors."""
    from chatglm.convert.imatrix import load_imatrix as read

    matrix = read(path)
    shapes = {t.name: t.shape for t in plan}
    matrix.check_model(shapes)
    out = {}
    for name, shape in shapes.items():
        values = matrix.for_tensor(name, shape)
        if values is not None:
            out[name] = values.reshape(shape[0], shape[-1]) if len(shape) == 3 else values.reshape(shape[-1])
    return out


def _write_header(w: gguf.GGUFWriter, family: Family, recipe: qtypes.Recipe, planned: list[_Planned]) -> None:
    w.add_name(family.ckpt.dir.resolve().name)
    w.add_file_type(recipe.ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string("glm.family", family.name)
    w.add_string("glm.chat_format", getattr(family, "chat_format", family.name))
    w.add_string("glm.converter", f"chatglm {__version__}")
    family.write_metadata(w)
    family.write_vocab(w)
    for p in planned:
        # The shape is given in elements (not bytes), so the dtype argument only has to differ from uint8.
        w.add_tensor_info(p.tensor.name, p.tensor.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()


def encode(data: np.ndarray, qtype: gguf.GGMLQuantizationType, imatrix, threads: int) -> np.ndarray:
    """float32 data in the file's encoding for ``qtype`` (f32 as is, f16 by numpy's rounding, the rest by ggml)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    if qtype == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    rows = data.reshape(-1, data.shape[-1]) if data.ndim < 3 else data  # (rows, cols) or (experts, rows, cols)
    return quants.quantize(rows, qtype, imatrix=imatrix, threads=threads)


def _materialize(ckpt: Checkpoint, p: _Planned, importance, threads) -> np.ndarray:
    t = p.tensor
    data = np.ascontiguousarray(t.build([ckpt.load(s) for s in t.sources]), dtype=np.float32)
    if data.shape != t.shape:
        raise InputError(f"tensor {t.name} built with shape {list(data.shape)}, expected {list(t.shape)}",
                         ckpt.file_of(t.sources[0]))
    try:
        out = encode(data, p.qtype, importance.get(t.name) if importance else None, threads or 2)
    except InputError as exc:
        raise InputError(f"tensor {t.sources[0]!r}: {exc.problem}", ckpt.file_of(t.sources[0])) from None
    if out.nbytes != p.nbytes:
        raise RuntimeError(f"{t.name}: quantized to {out.nbytes} bytes, planned {p.nbytes}")
    return out

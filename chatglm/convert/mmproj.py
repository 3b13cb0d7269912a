"""The multimodal projector file (``mmproj-<model>.gguf``) libmtmd loads beside a language model.

A vision or speech family returns a :class:`Projector` from ``Family.projector()``: the encoder's ``clip.*`` metadata
and its tensor plan (the same :class:`~chatglm.convert.family.OutTensor` plan a language model has, streamed a tensor
at a time). :func:`chatglm.convert.pipeline.write_projector` writes it as GGUF architecture ``clip``, atomically, with the stored types of
:func:`stored_type` (``--mmproj-type``): norms, biases and position tables stay f32, convolution kernels are f16 in
every type but f32 (ggml's im2col takes no other kernel type), matrices take the chosen type (q8_0 only where a row
is whole blocks of 32, else f16).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Sequence

import gguf

from chatglm.convert.checkpoint import read_json
from chatglm.convert.config_types import is_number, shown
from chatglm.convert.family import OutTensor, check_shape
from chatglm.errors import InputError

if TYPE_CHECKING:
    from chatglm.convert.family import Family

QT = gguf.GGMLQuantizationType
CLIP_ARCH = "clip"
MMPROJ_TYPES: dict[str, QT] = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0}
MMPROJ_FTYPES: dict[QT, gguf.LlamaFileType] = {
    QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
    QT.BF16: gguf.LlamaFileType.MOSTLY_BF16, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
DEFAULT_MMPROJ_TYPE = "f16"
# clip.cpp's keys (tools/mtmd/clip-impl.h) that every projector writes.
KEY_PROJ_TYPE = gguf.Keys.Clip.PROJECTOR_TYPE
KEY_HAS_VISION = gguf.Keys.Clip.HAS_VISION_ENCODER
KEY_HAS_AUDIO = gguf.Keys.Clip.HAS_AUDIO_ENCODER


def mmproj_path(model_path: Path) -> Path:
    """Where the projector of the language model at ``model_path`` lives: ``mmproj-<stem>.gguf`` beside it."""
    return model_path.with_name(f"mmproj-{model_path.stem}.gguf")


class Projector(ABC):
    """One checkpoint's media encoder and projector → one ``clip`` GGUF."""

    projector_type: ClassVar[str]  # libmtmd's name (clip-impl.h PROJ_TYPE_NAMES), e.g. "glm4v"
    f32_tensors: ClassVar[tuple[str, ...]] = ()  # output names kept f32 whatever the type (e.g. position tables)

    def __init__(self, family: "Family"):
        self.family = family
        self.ckpt = family.ckpt
        self.config = family.config

    @abstractmethod
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        """Every ``clip.*`` key libmtmd's loader reads for this projector type (modality flags included)."""

    @abstractmethod
    def tensors(self) -> list[OutTensor]:
        """Every output tensor, in file order."""

    def check_shapes(self, plan: list[OutTensor]) -> None:
        """Source shapes agree with config.json (tensors copied unchanged from one source)."""
        for t in plan:
            if t.is_copy:
                check_shape(self.family, t.sources[0], t.shape)

    @property
    def n_embd_out(self) -> int:
        """The width of the embeddings the projector gives the language model (its ``embedding_length``)."""
        return self.family.hp.n_embd


def missing_added_tokens(folder: Path, tokens: Sequence[str]) -> list[str]:
    """Those of ``tokens`` that tokenizer.json's ``added_tokens`` lack (all of them when there is no such file)."""
    path = folder / "tokenizer.json"
    added = read_json(path, "tokenizer.json").get("added_tokens") if path.is_file() else None
    have = {t.get("content") for t in added if isinstance(t, dict)} if isinstance(added, list) else set()
    return [t for t in tokens if t not in have]


def image_normalization(pre: dict, default: tuple, path: Path) -> tuple[list[float], list[float]]:
    """preprocessor_config.json's image_mean/image_std (``pre``), each three numbers, std positive; ``default``'s
    (mean, std) where a key is absent (None: required)."""
    out = []
    for key, fallback in zip(("image_mean", "image_std"), default):
        value = pre.get(key, None if fallback is None else list(fallback))
        if (not isinstance(value, list) or len(value) != 3 or not all(is_number(v) and abs(v) < 1e6 for v in value)
                or (key == "image_std" and not all(v > 0 for v in value))):
            raise InputError(f"{key} must be three numbers (std positive), got {shown(value)}", path)
        out.append([float(v) for v in value])
    return out[0], out[1]


def stored_type(name: str, shape: tuple[int, ...], choice: QT, keep_f32: tuple[str, ...] = ()) -> QT:
    """The type a projector tensor is stored in under ``--mmproj-type`` ``choice`` (numpy-order ``shape``)."""
    if choice == QT.F32 or len(shape) < 2 or name in keep_f32:
        return QT.F32
    if len(shape) > 2:  # convolution kernels
        return QT.F16
    if choice == QT.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[QT.Q8_0][0]:
        return QT.F16
    return choice


def mmproj_qtype(name: str) -> QT:
    try:
        return MMPROJ_TYPES[name.lower()]
    except KeyError:
        raise InputError(f"unknown projector type {name!r}; expected one of {', '.join(MMPROJ_TYPES)}") from None


def plan_projector(projector: Projector) -> list[OutTensor]:
    """The projector's tensor plan, its sources held by the checkpoint and shaped as config.json says."""
    plan = projector.tensors()
    missing = sorted({s for t in plan for s in t.sources} - set(projector.ckpt.names()))
    if missing:
        raise InputError(f"checkpoint lacks projector tensors: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""), projector.ckpt.dir)
    projector.check_shapes(plan)
    return plan

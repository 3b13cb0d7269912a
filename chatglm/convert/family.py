"""What every model family provides to the converter, and the registry that picks one from config.json.

A family maps one checkpoint layout onto one GGUF architecture: hyperparameters, tokenizer, and a table of output
tensors, each built from named source tensors. Each family's converter is ``CONVERTER`` in
``chatglm/families/<name>/convert.py``; detection takes the families whose descriptor matches config.json's keys, then
asks their converters (which may look at the tokenizer files' format), never the folder's or repository's name.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import gguf
import numpy as np

from chatglm import families
from chatglm.convert.checkpoint import Checkpoint
from chatglm.convert.ptuning import weight_names
from chatglm.convert.config_types import is_number as _finite_number, shown as _shown
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.limits import FLOAT32_MAX, MAX_LAYERS, UINT32_MAX

if TYPE_CHECKING:
    from chatglm.convert.mmproj import Projector


def _identity(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return arrays[0]


def stack_experts(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """One matrix per expert stacked into llama.cpp's 3-D ``ffn_*_exps`` (the pipeline streams it expert by expert)."""
    return np.stack(arrays, axis=0)  # (n_expert, rows, cols)


@dataclass
class OutTensor:
    """One GGUF tensor: its name, numpy-order shape, the source tensors it is built from, and how."""

    name: str
    shape: tuple[int, ...]
    sources: tuple[str, ...]
    build: Callable[[Sequence[np.ndarray]], np.ndarray] = field(default=_identity, repr=False)

    @property
    def is_copy(self) -> bool:
        """Copied unchanged from exactly one source tensor."""
        return len(self.sources) == 1 and self.build is _identity

    @property
    def is_expert_stack(self) -> bool:
        """One source matrix per expert, stacked unchanged (:func:`stack_experts`)."""
        return self.build is stack_experts and len(self.shape) == 3 and len(self.sources) == self.shape[0]


class Family(ABC):
    """One checkpoint layout → one GGUF architecture."""

    name: ClassVar[str]  # e.g. "chatglm3"; written as glm.family metadata
    arch: ClassVar[str]  # GGUF architecture, e.g. "chatglm"
    ignored_sources: ClassVar[tuple[str, ...]] = ()  # regexes of source tensors deliberately left out

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.config = ckpt.config

    @classmethod
    def matches(cls, ckpt: Checkpoint) -> bool:
        """Whether this family handles a checkpoint its descriptor's config.json keys matched (the tokenizer files'
        format may decide between families sharing a config)."""
        return True

    @abstractmethod
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        """Architecture hyperparameters (context, sizes, rope, eps, ...)."""

    @abstractmethod
    def write_vocab(self, w: gguf.GGUFWriter) -> None:
        """The tokenizer: tokens, scores/merges, types, special token ids."""

    @abstractmethod
    def tensors(self) -> list[OutTensor]:
        """Every output tensor, in file order."""

    def projector(self) -> "Projector | None":
        """The checkpoint's media encoder and projector (written as ``mmproj-<model>.gguf``), None for text only."""
        return None

    # Where the published forward numbers the first token after a cached P-Tuning prefix: False, 0 (THUDM's remote
    # code, which feeds P-Tuning v2 prefixes); True, P (transformers' own classes, which PEFT's prefix tuning drives).
    prefix_positions_follow_cache = False

    def prefix_layout(self) -> "tuple[int, int, int] | None":
        """(n_layer, n_head_kv, head_dim) of a P-Tuning v2 prefix this family runs (convert/ptuning.py), None when
        it runs none."""
        return None

    @property
    def n_block(self) -> int:
        """GGUF blocks (``block_count``): the layers, plus any multi-token-prediction layers a family keeps."""
        return self.hp.n_layer

    def check_shapes(self, plan: list[OutTensor]) -> None:
        """Source shapes agree with config.json. The default covers tensors copied unchanged from one source."""
        for t in plan:
            if t.is_copy:
                check_shape(self, t.sources[0], t.shape)

    # -- config helpers -------------------------------------------------------------------------------------------
    @property
    def config_path(self):
        return self.ckpt.dir / "config.json"

    def cfg_int(self, key: str, default: int | None = None, minimum: int = 1, maximum: int = UINT32_MAX) -> int:
        """An integer hyperparameter; every one is written as a GGUF uint32, so none may pass ``maximum``."""
        value = self.config.get(key, default)
        if value is None:
            raise InputError(f"config.json has no {key!r}", self.config_path)
        if type(value) is not int or value < minimum:
            raise self.bad(f"{key!r} must be an integer >= {minimum}, got {_shown(value)}")
        if value > maximum:
            raise self.bad(f"{key!r} is {_shown(value)}, more than {maximum:,} (the largest value it may have)")
        return value

    def cfg_float(self, key: str, default: float | None = None, positive: bool = True,
                  maximum: float = FLOAT32_MAX) -> float:
        """A float hyperparameter: finite, positive unless told otherwise, and at most ``maximum`` (a GGUF float32
        holds no more than FLOAT32_MAX)."""
        value = self.config.get(key, default)
        if value is None:
            raise InputError(f"config.json has no {key!r}", self.config_path)
        if not _finite_number(value) or (positive and value <= 0):
            raise self.bad(f"{key!r} must be a positive number, got {_shown(value)}")
        if abs(float(value)) > maximum:
            raise self.bad(f"{key!r} is {_shown(value)}, more than {maximum:g} (the largest value it may have)")
        return float(value)

    def cfg_bool(self, key: str, default: bool) -> bool:
        value = self.config.get(key, default)
        if type(value) is not bool:
            raise self.bad(f"{key!r} must be true or false, got {_shown(value)}")
        return value

    def cfg_require(self, key: str, expected: Any, default: Any = None) -> None:
        """Refuse a config whose ``key`` selects a variant this family does not implement (types must agree too:
        ``1`` is not ``true``)."""
        value = self.config.get(key, default)
        if type(value) is not type(expected) or value != expected:
            raise UnsupportedModelError(
                f"{key}={_shown(value)} is not supported (this converter handles {key}={expected!r})",
                self.config_path,
            )

    def bad(self, problem: str) -> InputError:
        return InputError(problem, self.config_path)

    # -- declared counts against what the files hold (before anything proportional to them is built) -----------
    def held_indices(self, pattern: str) -> set[int]:
        """The distinct numbers ``(\\d+)`` takes in the checkpoint's tensor names matching ``pattern``."""
        rx = re.compile(pattern)
        return {int(m.group(1)) for m in map(rx.match, self.ckpt.names()) if m and len(m.group(1)) < 10}

    def check_layers(self, key: str, n_layer: int, pattern: str, extra: int = 0, extra_key: str = "") -> None:
        """``n_layer`` (+ ``extra`` trailing layers, e.g. MTP) within llama.cpp's limit and held by the files."""
        held = len(self.held_indices(pattern))
        if n_layer + extra > held:
            declared = f"{key!r} is {n_layer}" + (f" (+ {extra_key!r} {extra})" if extra_key else "")
            raise self.bad(f"{declared} but the checkpoint holds {held} layers")
        if n_layer > MAX_LAYERS:
            raise self.bad(f"{key!r} is {n_layer}, more than llama.cpp's limit of {MAX_LAYERS} layers")

    def check_rows(self, key: str, value: int, source: str, axis: int, what: str) -> None:
        """A declared size no larger than the dimension ``axis`` of tensor ``source`` (when the checkpoint has it;
        a smaller one is reported by the shape check with both shapes)."""
        if source not in set(self.ckpt.names()):
            return
        shape = self.ckpt.info(source).shape
        if len(shape) > axis and value > shape[axis]:
            raise self.bad(f"{key!r} is {value} but the checkpoint's {source} has {shape[axis]} {what}")


# Checkpoints no family converts, by config.json architecture: why, in one line (README: "Multimodal models").
NOT_CONVERTED: dict[str, str] = {
    "CogVLMForCausalLM": "CogVLM2 is not supported: its vision tower puts a 2x2 convolution between the EVA2-CLIP "
                         "blocks and the GLU adapter, which libmtmd's COGVLM projector lacks (and its language "
                         "model is not a GLM)",
}


def refuse_vision_tower(ckpt: Checkpoint, why: str) -> None:
    """One line for a checkpoint whose vision tower (``vision_config``) no libmtmd projector computes."""
    if "vision_config" in ckpt.config:
        raise UnsupportedModelError(f"{why} (see the README's multimodal table)", ckpt.dir / "config.json")


def detect(ckpt: Checkpoint) -> Family:
    """The one family that claims this checkpoint: its descriptor's config.json keys match, then its converter
    agrees (tokenizer file formats)."""
    candidates = [f for f in families.families() if f.detect.matches(ckpt.config)]
    claimed = [cls for cls in (families.part(f.name, "convert").CONVERTER for f in candidates) if cls.matches(ckpt)]
    if len(claimed) == 1:
        return claimed[0](ckpt)
    described = describe_config(ckpt.config)
    refused = [NOT_CONVERTED[a] for a in ckpt.config.get("architectures") or [] if a in NOT_CONVERTED]
    if not claimed and refused:
        raise UnsupportedModelError(refused[0], ckpt.dir / "config.json")
    if not claimed:
        known = ", ".join(f"{f.name} ({f.title})" for f in families.families())
        raise UnsupportedModelError(f"unknown architecture ({described}); supported families: {known}",
                                    ckpt.dir / "config.json")
    names = ", ".join(cls.name for cls in claimed)
    raise UnsupportedModelError(f"ambiguous checkpoint ({described}) claimed by {names}", ckpt.dir / "config.json")


def describe_config(config: dict) -> str:
    """What detection saw: model_type, architectures, and which of the keys that tell families apart are present."""
    keys = dict.fromkeys(k for f in families.families() for k in f.detect.keys[2:])
    present = [k for k in keys if k in config]
    absent = [k for k in keys if k not in config]
    return (f"model_type={_shown(config.get('model_type'))}, architectures={_shown(config.get('architectures'))}; "
            f"keys present: {', '.join(present) or 'none'}; absent: {', '.join(absent) or 'none'}")


def check_complete(family: Family, plan: list[OutTensor], projector_plan: Sequence[OutTensor] = ()) -> None:
    """Every source tensor is used by the model or its projector (or deliberately ignored), every source exists,
    and shapes agree."""
    ckpt = family.ckpt
    present = set(ckpt.names())
    used = {src for t in (*plan, *projector_plan) for src in t.sources}
    missing = sorted(used - present)
    if missing:
        raise InputError(f"checkpoint lacks tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""),
                         ckpt.dir)
    ignored = [re.compile(p) for p in family.ignored_sources]
    # a P-Tuning prefix encoder is the pipeline's (convert/ptuning.py), read before this check
    leftover = sorted(n for n in present - used - weight_names(ckpt) if not any(p.fullmatch(n) for p in ignored))
    if leftover:
        raise InputError(f"checkpoint has tensors this {family.name} converter does not know: "
                         f"{', '.join(leftover[:8])}" + (" ..." if len(leftover) > 8 else ""), ckpt.dir)
    names = [t.name for t in plan]
    if len(set(names)) != len(names):
        raise InputError("duplicate output tensor names (converter bug)", ckpt.dir)


def check_shape(family: Family, source: str, expected: tuple[int, ...]) -> None:
    actual = family.ckpt.info(source).shape
    if tuple(actual) != tuple(expected):
        raise InputError(f"tensor {source!r} has shape {list(actual)}, expected {list(expected)} from config.json",
                         family.ckpt.file_of(source))

"""What every model family provides to the converter, and the registry that picks one from config.json.

A family maps one checkpoint layout onto one GGUF architecture: hyperparameters, tokenizer, and a table of output
tensors, each built from named source tensors. Families register themselves with :func:`register`; detection asks
each family whether config.json (and the tokenizer files' contents) describe its layout, never the folder's name.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import gguf
import numpy as np

from chatglm.convert.checkpoint import Checkpoint
from chatglm.errors import InputError, UnsupportedModelError


def _identity(arrays: Sequence[np.ndarray]) -> np.ndarray:
    return arrays[0]


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


class Family(ABC):
    """One checkpoint layout → one GGUF architecture."""

    name: ClassVar[str]  # e.g. "chatglm3"; written as glm.family metadata
    arch: ClassVar[str]  # GGUF architecture, e.g. "chatglm"
    ignored_sources: ClassVar[tuple[str, ...]] = ()  # regexes of source tensors deliberately left out

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.config = ckpt.config

    @classmethod
    @abstractmethod
    def matches(cls, ckpt: Checkpoint) -> bool:
        """Whether this family handles the checkpoint (from config.json and tokenizer file contents)."""

    @abstractmethod
    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        """Architecture hyperparameters (context, sizes, rope, eps, ...)."""

    @abstractmethod
    def write_vocab(self, w: gguf.GGUFWriter) -> None:
        """The tokenizer: tokens, scores/merges, types, special token ids."""

    @abstractmethod
    def tensors(self) -> list[OutTensor]:
        """Every output tensor, in file order."""

    def check_shapes(self, plan: list[OutTensor]) -> None:
        """Source shapes agree with config.json. The default covers tensors copied unchanged from one source."""
        for t in plan:
            if t.is_copy:
                check_shape(self, t.sources[0], t.shape)

    # -- config helpers -------------------------------------------------------------------------------------------
    @property
    def config_path(self):
        return self.ckpt.dir / "config.json"

    def cfg_int(self, key: str, default: int | None = None, minimum: int = 1) -> int:
        value = self.config.get(key, default)
        if value is None:
            raise InputError(f"config.json has no {key!r}", self.config_path)
        if type(value) is not int or value < minimum:
            raise InputError(f"config.json: {key!r} must be an integer >= {minimum}, got {value!r}", self.config_path)
        return value

    def cfg_float(self, key: str, default: float | None = None, positive: bool = True) -> float:
        value = self.config.get(key, default)
        if value is None:
            raise InputError(f"config.json has no {key!r}", self.config_path)
        if type(value) not in (int, float) or not np.isfinite(value) or (positive and value <= 0):
            raise InputError(f"config.json: {key!r} must be a positive number, got {value!r}", self.config_path)
        return float(value)

    def cfg_require(self, key: str, expected: Any, default: Any = None) -> None:
        """Refuse a config whose ``key`` selects a variant this family does not implement."""
        value = self.config.get(key, default)
        if value != expected:
            raise UnsupportedModelError(
                f"config.json: {key}={value!r} is not supported (this converter handles {key}={expected!r})",
                self.config_path,
            )


FAMILIES: list[type[Family]] = []


def register(cls: type[Family]) -> type[Family]:
    FAMILIES.append(cls)
    return cls


def detect(ckpt: Checkpoint) -> Family:
    """The one registered family that claims this checkpoint."""
    from chatglm.convert import families  # noqa: F401  (imports every family module, which registers it)

    claimed = [cls for cls in FAMILIES if cls.matches(ckpt)]
    if len(claimed) == 1:
        return claimed[0](ckpt)
    cfg = ckpt.config
    described = f"model_type={cfg.get('model_type')!r}, architectures={cfg.get('architectures')!r}"
    if not claimed:
        known = ", ".join(sorted({cls.name for cls in FAMILIES}))
        raise UnsupportedModelError(f"unknown architecture ({described}); supported families: {known}",
                                    ckpt.dir / "config.json")
    names = ", ".join(cls.name for cls in claimed)
    raise UnsupportedModelError(f"ambiguous checkpoint ({described}) claimed by {names}", ckpt.dir / "config.json")


def check_complete(family: Family, plan: list[OutTensor]) -> None:
    """Every source tensor is used (or deliberately ignored), every source exists, and shapes agree."""
    ckpt = family.ckpt
    present = set(ckpt.names())
    used = {src for t in plan for src in t.sources}
    missing = sorted(used - present)
    if missing:
        raise InputError(f"checkpoint lacks tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""),
                         ckpt.dir)
    ignored = [re.compile(p) for p in family.ignored_sources]
    leftover = sorted(n for n in present - used if not any(p.fullmatch(n) for p in ignored))
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

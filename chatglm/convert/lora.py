"""PEFT LoRA adapters merged into the weights during conversion, and the refusal of P-Tuning v2 checkpoints.

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``adapter_model.bin``). For each
adapted linear module ``M`` (``transformer.encoder.layers.N.self_attention.query_key_value`` in ChatGLM2/3,
``transformer.layers.N.attention.query_key_value`` in ChatGLM-6B, and likewise ``dense``, ``dense_h_to_4h``,
``dense_4h_to_h``) it stores ``base_model.model.M.lora_A.weight`` (r, in) and ``...lora_B.weight`` (out, r). PEFT's
merge is ``W += scaling · B @ A`` with ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``;
``rank_pattern`` / ``alpha_pattern`` override r and alpha per module, the first pattern ``p`` with
``re.match(rf"(.*\\.)?({p})$", M)`` winning). We add ``--lora-scale`` as one more factor.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from chatglm.convert.checkpoint import Checkpoint, CheckpointView, read_json
from chatglm.convert.config_types import ADAPTER_FIELDS, check_types, is_number
from chatglm.convert.safe_regex import check_name, compile_pattern
from chatglm.convert.safetensors_file import SafetensorsFile
from chatglm.convert.tensors import TensorInfo, TensorSource
from chatglm.convert.torch_file import TorchFile
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.limits import FLOAT32_MAX

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
KEY = re.compile(r"(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight")
BIAS = re.compile(r"(?:base_model\.model\.)?(?P<name>.+\.bias)")
UNSUPPORTED_KEYS = {
    "lora_embedding_": "LoRA on embedding layers",
    "lora_magnitude_vector": "DoRA (use_dora)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
}
PTUNING = ("P-Tuning v2 / prefix tuning is not a LoRA adapter: THUDM's P-Tuning v2 checkpoints (ChatGLM-6B, "
           "ChatGLM2-6B, ChatGLM3-6B) convert with `chatglm convert BASE --ptuning DIR`, which carries the prefix in the GGUF; "
           "a PEFT prefix-tuning adapter converts the same way (`--ptuning ADAPTER_DIR`)")


@dataclass(frozen=True)
class LoraPair:
    """One adapted matrix: adapter tensor names, rank and PEFT scaling."""

    module: str
    a: str
    b: str
    rank: int
    scaling: float


@dataclass
class Adapter:
    """One PEFT LoRA adapter folder, opened (its tensors stay mapped)."""

    path: Path
    config: dict[str, Any]
    source: TensorSource
    pairs: dict[str, LoraPair] = field(default_factory=dict)  # base weight name ("M.weight") -> pair
    biases: dict[str, str] = field(default_factory=dict)  # base bias name -> adapter tensor (bias="all")
    fan_in_fan_out: bool = False

    def delta(self, weight: str) -> np.ndarray:
        """``scaling · B @ A`` for one base weight, float32, in the base weight's (out, in) layout."""
        p = self.pairs[weight]
        d = np.float32(p.scaling) * (self.source.load(p.b) @ self.source.load(p.a))  # (out, r) @ (r, in)
        return d.T if self.fan_in_fan_out else d

    def close(self) -> None:
        self.source.close()


# ----------------------------------------------------------------------------------------------- adapter files


def _cfg_number(cfg: dict, key: str, path: Path, default: Any = None, integer: bool = False) -> float:
    value = cfg.get(key, default)
    ok = type(value) is int if integer else type(value) in (int, float)
    if value is None or not ok or not is_number(value) or value <= 0:
        raise InputError(f"{key} must be a positive {'integer' if integer else 'number'}, got {value!r}", path)
    return value


def _pattern_value(patterns: Any, module: str, default: float, key: str, path: Path, integer: bool = False) -> float:
    """PEFT's per-module override: the value of the first pattern ``p`` with ``(.*\\.)?(p)$`` matching ``module``."""
    if patterns is None:
        return default
    for pattern, value in patterns.items():
        if compile_pattern(pattern, key, path, template=r"(.*\.)?({p})$").match(module):
            if (integer and type(value) is not int) or value <= 0:
                raise InputError(f"{key}: the value for {pattern!r} must be a positive "
                                 f"{'integer' if integer else 'number'}, got {value!r}", path)
            return value
    return default


def _targets(cfg: dict, module: str, path: Path) -> bool:
    """Whether PEFT's ``target_modules`` (a list of name suffixes, a regex, or "all-linear") names ``module``."""
    targets = cfg.get("target_modules")
    check_name(module, path)
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return compile_pattern(targets, "target_modules", path).fullmatch(module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    cfg = read_json(path, ADAPTER_CONFIG)
    if not isinstance(cfg, dict):
        raise InputError("not a JSON object", path)
    check_types(cfg, ADAPTER_FIELDS, path)
    kind = str(cfg.get("peft_type", "LORA")).upper()
    if kind in ("PREFIX_TUNING", "P_TUNING", "PROMPT_TUNING"):
        raise UnsupportedModelError(PTUNING, path)
    if kind != "LORA":
        raise UnsupportedModelError(f"peft_type {kind} is not supported (only LORA adapters can be merged)", path)
    if cfg.get("use_dora"):
        raise UnsupportedModelError("DoRA adapters (use_dora) are not supported, only plain LoRA", path)
    return cfg


def open_weights(folder: Path) -> TensorSource:
    """adapter_model.safetensors or adapter_model.bin of a PEFT folder (LoRA here, prefix tuning in ptuning.py)."""
    for name in ADAPTER_WEIGHTS:
        if (folder / name).is_file():
            return SafetensorsFile(folder / name) if name.endswith(".safetensors") else TorchFile(folder / name)
    raise InputError(f"no adapter weights found (looked for {', '.join(ADAPTER_WEIGHTS)})", folder)


def open_adapter(folder: os.PathLike | str) -> Adapter:
    """Read and check one adapter folder: every tensor is a LoRA A/B half with its partner, or a trained bias."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("LoRA adapter: not a directory" if folder.exists() else "LoRA adapter: not found", folder)
    cfg = _read_config(folder)
    source = open_weights(folder)
    try:
        adapter = Adapter(folder, cfg, source, fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)))
        halves = _sort_keys(adapter)
        for module, ab in sorted(halves.items()):
            adapter.pairs[module + ".weight"] = _pair(adapter, module, ab)
    except InputError:
        source.close()
        raise
    if not adapter.pairs:
        raise InputError("adapter holds no LoRA tensors (lora_A / lora_B)", source.path)
    return adapter


def _sort_keys(adapter: Adapter) -> dict[str, dict[str, str]]:
    halves: dict[str, dict[str, str]] = {}
    unknown: list[str] = []
    for name in adapter.source.infos():
        for marker, what in UNSUPPORTED_KEYS.items():
            if marker in name:
                raise UnsupportedModelError(f"{what} is not supported (tensor {name!r})", adapter.source.path)
        key, bias = KEY.fullmatch(name), BIAS.fullmatch(name)
        if key:
            halves.setdefault(key["module"], {})[key["ab"]] = name
        elif bias:
            adapter.biases[bias["name"]] = name
        else:
            unknown.append(name)
    if unknown:
        raise InputError(f"adapter tensors that are neither LoRA halves nor biases: {', '.join(unknown[:5])}",
                         adapter.source.path)
    return halves


def _pair(adapter: Adapter, module: str, ab: dict[str, str]) -> LoraPair:
    where, cfg_path = adapter.source.path, adapter.path / ADAPTER_CONFIG
    if set(ab) != {"A", "B"}:
        missing = "lora_B" if "A" in ab else "lora_A"
        raise InputError(f"module {module!r} has no {missing} tensor", where)
    if not _targets(adapter.config, module, cfg_path):
        raise InputError(f"module {module!r} has LoRA tensors but is not among target_modules "
                         f"{adapter.config.get('target_modules')!r}", cfg_path)
    a, b = adapter.source.infos()[ab["A"]], adapter.source.infos()[ab["B"]]
    if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
        raise InputError(f"module {module!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not share a "
                         "rank", where)
    rank = int(_pattern_value(adapter.config.get("rank_pattern"), module,
                              _cfg_number(adapter.config, "r", cfg_path, integer=True), "rank_pattern", cfg_path,
                              integer=True))
    if rank != a.shape[0]:
        raise InputError(f"module {module!r}: adapter_config.json says rank {rank}, the tensors have "
                         f"{a.shape[0]}", where)
    alpha = _pattern_value(adapter.config.get("alpha_pattern"), module,
                           _cfg_number(adapter.config, "lora_alpha", cfg_path, default=8), "alpha_pattern", cfg_path)
    scaling = alpha / math.sqrt(rank) if adapter.config.get("use_rslora") else alpha / rank
    if scaling > FLOAT32_MAX:
        raise InputError(f"module {module!r}: lora_alpha {alpha:g} gives a scaling of {scaling:g}, more than a "
                         "float32 holds", cfg_path)
    return LoraPair(module, ab["A"], ab["B"], rank, float(scaling))


# ----------------------------------------------------------------------------------------------- merged view


class MergedCheckpoint(CheckpointView):
    """A checkpoint with LoRA adapters added into its weights: ``W + Σ scale · scaling · B @ A``."""

    def __init__(self, base: Checkpoint | CheckpointView, adapters: Sequence[Adapter], scales: Sequence[float]):
        super().__init__(base)
        self.adapters = list(adapters)
        self._deltas: dict[str, list[tuple[Adapter, float]]] = {}
        self._biases: dict[str, tuple[Adapter, str]] = {}
        for adapter, scale in zip(adapters, scales):
            self._attach(adapter, float(scale))

    def _attach(self, adapter: Adapter, scale: float) -> None:
        present = set(self.base.names())
        for weight, pair in adapter.pairs.items():
            if weight not in present:
                raise InputError(f"adapter modifies {pair.module!r}, which the model does not have (an adapter for "
                                 "another model?)", adapter.source.path)
            expected = self.base.info(weight).shape
            a, b = adapter.source.infos()[pair.a].shape, adapter.source.infos()[pair.b].shape
            shape = (a[1], b[0]) if adapter.fan_in_fan_out else (b[0], a[1])
            if tuple(expected) != shape:
                raise InputError(f"adapter for {pair.module!r} makes a {list(shape)} update but the model's weight "
                                 f"is {list(expected)} (an adapter for another model size?)", adapter.source.path)
            self._deltas.setdefault(weight, []).append((adapter, scale))
        for bias, tensor in adapter.biases.items():
            if bias not in present or self.base.info(bias).shape != adapter.source.infos()[tensor].shape:
                raise InputError(f"adapter bias {tensor!r} does not match a bias of the model", adapter.source.path)
            if bias in self._biases:
                raise InputError(f"two adapters both replace {bias!r}", adapter.source.path)
            self._biases[bias] = (adapter, tensor)

    def info(self, name: str) -> TensorInfo:
        base = self.base.info(name)
        if name in self._deltas and base.dtype != "F32":
            return TensorInfo(name, "F32", base.shape, base.offset, math.prod(base.shape) * 4)
        return base

    def load(self, name: str) -> np.ndarray:
        if name in self._biases:
            adapter, tensor = self._biases[name]
            return adapter.source.load(tensor)
        weight = self.base.load(name)
        for adapter, scale in self._deltas.get(name, ()):
            weight = weight + np.float32(scale) * adapter.delta(name)
        return weight

    def close(self) -> None:
        for adapter in self.adapters:
            adapter.close()
        super().close()


def lora_scales(n_adapters: int, lora_scale: float | Sequence[float]) -> list[float]:
    """One scale per adapter: a single value applies to all of them."""
    scales = [float(lora_scale)] if isinstance(lora_scale, (int, float)) else [float(s) for s in lora_scale]
    if len(scales) == 1:
        scales *= n_adapters
    if len(scales) != n_adapters:
        raise InputError(f"give one --lora-scale for all adapters or one per adapter ({n_adapters}), "
                         f"not {len(scales)}")
    if not all(math.isfinite(s) for s in scales):
        raise InputError(f"--lora-scale must be finite, got {scales}")
    return scales


def merged(ckpt: Checkpoint | CheckpointView, adapters: Sequence[os.PathLike | str],
           lora_scale: float | Sequence[float] = 1.0) -> Checkpoint | CheckpointView:
    """``ckpt`` with the adapters at ``adapters`` merged in (``ckpt`` itself when there are none)."""
    if not adapters:
        return ckpt
    scales = lora_scales(len(adapters), lora_scale)
    opened: list[Adapter] = []
    try:
        for path in adapters:
            opened.append(open_adapter(path))
        view = MergedCheckpoint(ckpt, opened, scales)
    except BaseException:
        for adapter in opened:
            adapter.close()
        raise
    log.info("merging %d LoRA adapter(s) into %d weights", len(opened), len(view._deltas))
    return view


def refuse_prefix_tuning(ckpt: Checkpoint | CheckpointView) -> None:
    """P-Tuning v2 checkpoints (``pre_seq_len`` in config.json, ``prefix_encoder.*`` tensors) are no LoRA base."""
    pre_seq_len: Optional[Any] = ckpt.config.get("pre_seq_len")
    prefix = sorted(n for n in ckpt.names() if n.startswith("prefix_encoder.") or ".prefix_encoder." in n)
    if pre_seq_len or prefix:
        found = f"pre_seq_len={pre_seq_len!r}" if pre_seq_len else f"tensor {prefix[0]!r}"
        raise UnsupportedModelError(f"{PTUNING} (found {found})", ckpt.dir)

"""A PEFT LoRA adapter as a llama.cpp LoRA GGUF, applied at run time (``llama_adapter_lora_init``) instead of merged.

llama.cpp's adapter file: ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``, the base
model's architecture, and for each adapted GGUF weight ``<name>.lora_a`` (r, in) and ``<name>.lora_b`` (out, r) in
numpy order. At run time it adds ``s · B @ (A @ x)`` with ``s = user_scale · alpha / r``, or ``s = user_scale`` when
alpha is 0. We write alpha 0 and fold PEFT's own scaling (alpha/r, rsLoRA, per-module patterns) into ``lora_b``, so
every module keeps its exact scaling and the runtime scale plays the role of ``--lora-scale``.

Only weights the family copies unchanged into one GGUF tensor can be adapted this way (ChatGLM2/3 and GLM-4 in
llama.cpp's ``chatglm`` architecture: the fused query_key_value and dense_h_to_4h map one to one); anything else is
refused with a pointer to merging (``chatglm convert --lora``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import gguf
import numpy as np

from chatglm import __version__
from chatglm.convert.gguf_writer import CheckedWriter, display_name
from chatglm.convert.checkpoint import Checkpoint
from chatglm.convert.family import Family, detect
from chatglm.convert.lora import Adapter, MergedCheckpoint, open_adapter, refuse_prefix_tuning
from chatglm.convert.thudm_quant import dequantized
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.fsutil import atomic_path
from chatglm.schema import keys

log = logging.getLogger(__name__)

LLAMA_ARCHS = frozenset(gguf.MODEL_ARCH_NAMES.values())
OUT_TYPES = {"f32": np.float32, "f16": np.float16}
MERGE_INSTEAD = "merge it into the weights instead (chatglm convert --lora)"


def adapted_names(family: Family, adapter: Adapter) -> dict[str, str]:
    """Base weight name -> GGUF tensor name, for every weight the adapter changes (each must map one to one)."""
    direct = {t.sources[0]: t.name for t in family.tensors() if t.is_copy}
    names: dict[str, str] = {}
    for weight in adapter.pairs:
        if weight not in direct:
            raise UnsupportedModelError(f"{weight!r} is transformed on its way into the GGUF, so a runtime adapter "
                                        f"cannot target it; {MERGE_INSTEAD}", adapter.source.path)
        names[weight] = direct[weight]
    return names


def _check_exportable(family: Family, adapter: Adapter) -> None:
    if family.arch not in LLAMA_ARCHS:
        raise UnsupportedModelError(f"runtime LoRA needs a llama.cpp architecture, not {family.arch!r}; "
                                    + MERGE_INSTEAD, adapter.path)
    if adapter.biases or adapter.fan_in_fan_out:
        what = "trains biases (bias != 'none')" if adapter.biases else "uses fan_in_fan_out"
        raise UnsupportedModelError(f"the adapter {what}, which a llama.cpp LoRA GGUF cannot express; "
                                    + MERGE_INSTEAD, adapter.path)


def write_lora_gguf(model_dir: os.PathLike | str, adapter_dir: os.PathLike | str, out: os.PathLike | str,
                    outtype: str = "f16") -> Path:
    """Write the adapter at ``adapter_dir`` (for the checkpoint at ``model_dir``) as a llama.cpp LoRA GGUF."""
    if outtype not in OUT_TYPES:
        raise InputError(f"LoRA adapter type must be one of {', '.join(OUT_TYPES)}, not {outtype!r}")
    dest = Path(out)
    with Checkpoint(model_dir) as raw:
        refuse_prefix_tuning(raw)
        base = dequantized(raw)
        family = detect(base)
        adapter = open_adapter(adapter_dir)
        try:
            _check_exportable(family, adapter)
            MergedCheckpoint(base, [adapter], [1.0])  # presence and shape checks against the base model
            names = adapted_names(family, adapter)
            with atomic_path(dest, sources=[model_dir, adapter_dir]) as tmp:  # never over one of the inputs
                _write(tmp, family.arch, adapter, names, OUT_TYPES[outtype])
        finally:
            adapter.close()
    log.info("wrote LoRA adapter %s: %d weights", dest, len(names))
    return dest


def _write(path: Path, arch: str, adapter: Adapter, names: dict[str, str], dtype: type) -> None:
    w = CheckedWriter(path, arch, adapter.path / "adapter_config.json")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(display_name(adapter.path))
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: llama.cpp scales by the user's scale alone
    w.add_string(keys.CONVERTER, f"chatglm {__version__}")
    for weight, name in sorted(names.items(), key=lambda item: item[1]):
        pair = adapter.pairs[weight]
        a = adapter.source.load(pair.a)  # (r, in)
        with np.errstate(over="ignore", invalid="ignore"):
            b = adapter.source.load(pair.b) * np.float32(pair.scaling)  # (out, r), PEFT's scaling folded in
            a, b = np.ascontiguousarray(a, dtype=dtype), np.ascontiguousarray(b, dtype=dtype)
        for half, data in (("lora_A", a), ("lora_B", b)):
            if not np.isfinite(data).all():
                raise InputError(f"module {pair.module!r}: {half} (times the adapter's scaling) holds NaN or values "
                                 f"too large for {np.dtype(dtype).name}", adapter.source.path)
        w.add_tensor(f"{name}.lora_a", a)
        w.add_tensor(f"{name}.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

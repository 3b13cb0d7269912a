"""A Hugging Face checkpoint folder: config.json, weight files (single or sharded), tokenizer files.

Weight readers are chosen by file format; families never see which one was used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from chatglm.convert.config_types import CONFIG_FIELDS, GENERATION_FIELDS, check_types
from chatglm.convert.safetensors_file import SafetensorsFile
from chatglm.convert.tensors import TensorInfo, TensorSource
from chatglm.convert.torch_file import TorchFile
from chatglm.errors import InputError
from chatglm import fsutil

# Index file name -> (single-file name, reader), in order of preference.
WEIGHT_FORMATS: dict[str, tuple[str, Callable[[Path], TensorSource]]] = {
    "model.safetensors.index.json": ("model.safetensors", SafetensorsFile),
    "pytorch_model.bin.index.json": ("pytorch_model.bin", TorchFile),
}


def read_json(path: Path, what: str = "JSON") -> Any:
    return fsutil.read_json(path, what=what)


class Checkpoint:
    """config.json plus every tensor of the folder, each served by the file that holds it."""

    def __init__(self, directory: os.PathLike | str):
        self.dir = Path(directory)
        if not self.dir.is_dir():
            raise InputError("not a directory" if self.dir.exists() else "not found", self.dir)
        self.config: dict[str, Any] = read_json(self.dir / "config.json", "config.json")
        if not isinstance(self.config, dict):
            raise InputError("config.json is not a JSON object", self.dir / "config.json")
        check_types(self.config, CONFIG_FIELDS, self.dir / "config.json")
        generation = self.dir / "generation_config.json"
        self.generation: dict[str, Any] = {}  # generation_config.json, type-checked (its eos ids become stop tokens)
        if generation.is_file():
            settings = read_json(generation, "generation_config.json")
            if not isinstance(settings, dict):
                raise InputError("not a JSON object", generation)
            check_types(settings, GENERATION_FIELDS, generation)
            self.generation = settings
        self._files: list[TensorSource] = []
        self._where: dict[str, TensorSource] = {}
        self._open_weights()

    def _open_weights(self) -> None:
        for index_name, (single_name, reader) in WEIGHT_FORMATS.items():
            index = self.dir / index_name
            if index.exists():
                self._open_sharded(index, reader)
                return
            if (self.dir / single_name).exists():
                self._add(reader(self.dir / single_name))
                return
        stray = sorted(p.name for p in self.dir.glob("*.safetensors"))
        if len(stray) == 1:
            self._add(SafetensorsFile(self.dir / stray[0]))
            return
        known = ", ".join(sorted({n for n, _ in WEIGHT_FORMATS.values()} | set(WEIGHT_FORMATS)))
        raise InputError(f"no weights found (looked for {known})", self.dir)

    def _open_sharded(self, index: Path, reader: Callable[[Path], TensorSource]) -> None:
        data = read_json(index, "index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise InputError("index has no 'weight_map' object of tensor name -> file name", index)
        for shard_name in sorted(set(weight_map.values())):
            shard = self.dir / shard_name
            if Path(shard_name).name != shard_name:
                raise InputError(f"index names a shard outside the folder: {shard_name!r}", index)
            if not shard.exists():
                raise InputError(f"shard {shard_name} named in the index is missing", shard)
            source = self._add(reader(shard))
            listed = {name for name, file in weight_map.items() if file == shard_name}
            missing = sorted(listed - set(source.infos()))
            if missing:
                raise InputError(f"index lists tensors this shard does not hold: {', '.join(missing[:5])}", shard)

    def _add(self, source: TensorSource) -> TensorSource:
        for name in source.infos():
            if name in self._where:
                raise InputError(f"tensor {name!r} appears in two files (also {self._where[name].path})", source.path)
            self._where[name] = source
        self._files.append(source)
        return source

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._where[name].infos()[name]

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 (a fresh array; only its bytes are read)."""
        return self._where[name].load(name)

    def load_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` (first axis) of one tensor as float32: a large tensor streamed a block at a time."""
        return self._where[name].load_rows(name, start, stop)

    def file_of(self, name: str) -> Path:
        return Path(self._where[name].path)

    def close(self) -> None:
        for source in self._files:
            source.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class CheckpointView:
    """A checkpoint presented differently (dequantized, LoRA-merged) behind the same interface; delegates to ``base``.

    Views override :meth:`names`, :meth:`info` and :meth:`load`; closing a view closes its base.
    """

    def __init__(self, base: "Checkpoint | CheckpointView"):
        self.base = base
        self.dir = base.dir
        self.config = base.config
        self.generation = base.generation

    def names(self) -> list[str]:
        return self.base.names()

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    def load(self, name: str) -> np.ndarray:
        return self.base.load(name)

    def file_of(self, name: str) -> Path:
        return self.base.file_of(name)

    def close(self) -> None:
        self.base.close()

    def __enter__(self) -> "CheckpointView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Fuzz targets: parse arbitrary bytes; only InputError may come out.

Used by tests/test_fuzz.py (hypothesis, bounded time, in CI) and tests/fuzz/run_atheris.py (coverage-guided, for
long local runs: ``python tests/fuzz/run_atheris.py gguf -atheris_runs=1000000``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import zipfile

from chatglm.convert.safetensors_file import SafetensorsFile
from chatglm.convert.torch_file import TorchFile
from chatglm.errors import InputError
from chatglm.gguf_file import read_header

_DIR = Path(tempfile.mkdtemp(prefix="chatglm-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))


def _file(name: str, data: bytes) -> Path:
    path = _DIR / name
    path.write_bytes(data)
    return path


def safetensors(data: bytes) -> None:
    try:
        st = SafetensorsFile(_file("x.safetensors", data))
        for name in st.infos():
            st.load(name)
    except InputError:
        pass


def gguf(data: bytes) -> None:
    try:
        header = read_header(_file("x.gguf", data))
        for key in header.kv:
            header.array(key)  # long arrays are read from the file here
    except InputError:
        pass


def torch_pickle(data: bytes) -> None:
    """A PyTorch zip checkpoint whose data.pkl is the fuzzed bytes, with one 64-byte storage."""
    path = _DIR / "x.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/data/0", bytes(64))
    try:
        reader = TorchFile(path)
        for name in reader.infos():
            reader.load(name)
    except InputError:
        pass


TARGETS = {"safetensors": safetensors, "gguf": gguf, "pickle": torch_pickle}

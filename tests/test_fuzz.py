"""Property-based fuzzing of the parsers that read untrusted files, bounded in time for CI."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
from targets import gguf, safetensors, torch_pickle  # noqa: E402

FUZZ = settings(max_examples=800, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

_ST_HEADER = json.dumps({"a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]},
                         "b": {"dtype": "BF16", "shape": [1], "data_offsets": [12, 14]}}).encode()
ST_SEED = struct.pack("<Q", len(_ST_HEADER)) + _ST_HEADER + bytes(range(14))


def mutate(seed: bytes):
    """Seeds with bytes overwritten, cut or inserted at drawn places."""
    return st.tuples(st.integers(0, len(seed)), st.binary(max_size=16), st.booleans(), st.integers(0, len(seed))).map(
        lambda t: (seed[:t[0]] + t[1] + seed[t[0] + (len(t[1]) if t[2] else 0):])[: max(t[3], t[0] + len(t[1]))])


@FUZZ
@given(st.one_of(st.binary(max_size=256), mutate(ST_SEED)))
def test_safetensors_parser_never_crashes(data):
    safetensors(data)


def gguf_seed() -> bytes:
    import gguf as g
    import numpy as np
    import tempfile

    path = Path(tempfile.mkdtemp()) / "seed.gguf"
    w = g.GGUFWriter(path, "chatglm")
    w.add_block_count(1)
    w.add_token_list(["a", "b", "c"])
    w.add_array("x.ints", [1, 2, 3])
    w.add_tensor("t", np.ones((2, 32), dtype=np.float32))
    w.add_tensor("u", np.ones(32, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


GGUF_SEED = gguf_seed()


@FUZZ
@given(st.one_of(st.binary(max_size=256).map(lambda b: b"GGUF\x03\x00\x00\x00" + b), mutate(GGUF_SEED)))
def test_gguf_validator_never_crashes(data):
    gguf(data)


def pickle_seed() -> bytes:
    import io
    import zipfile

    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.arange(8, dtype=torch.float32), "h": torch.ones(2, 2, dtype=torch.float16)}, buf)
    with zipfile.ZipFile(buf) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))


PICKLE_SEED = pickle_seed()


@FUZZ
@given(st.one_of(st.binary(max_size=128), mutate(PICKLE_SEED)))
def test_pickle_reader_never_crashes(data):
    torch_pickle(data)

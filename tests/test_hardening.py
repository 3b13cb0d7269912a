"""Malformed inputs from crafted bytes: each gets its one-line error (exit code 2, no traceback, no output file).

The corpus is generated here: safetensors headers that lie, truncations at many offsets, and GGUF files whose header
and tensor table were edited field by field. The GGUF pre-validator runs before llama.cpp sees a file, so none of
these may reach a native loader.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from chatglm.cli.app import app
from chatglm.convert.safetensors_file import SafetensorsFile
from chatglm.errors import InputError
from chatglm.gguf_file import read_header

runner = CliRunner()


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


GOOD = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
SAFETENSORS_CASES = {
    "empty": b"",
    "short": b"\x01\x00\x00",
    "len-past-end": struct.pack("<Q", 1000) + b"{}",
    "len-huge": struct.pack("<Q", 2**63) + b"{}",
    "not-json": struct.pack("<Q", 5) + b"{oops",
    "bad-utf8": struct.pack("<Q", 4) + b"\xff\xfe{}",
    "json-array": safetensors_bytes([1, 2]),  # type: ignore[arg-type]
    "entry-not-object": safetensors_bytes({"w": 3}),
    "unknown-dtype": safetensors_bytes({"w": {"dtype": "Q4", "shape": [4], "data_offsets": [0, 2]}}, b"\0\0"),
    "dtype-is-a-list": safetensors_bytes({"w": {"dtype": [2, 3], "shape": [1], "data_offsets": [0, 4]}},
                                         b"\0" * 4),  # found by atheris
    "no-dtype": safetensors_bytes({"w": {"shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "negative-dim": safetensors_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
    "float-dim": safetensors_bytes({"w": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4),
    "nan-dim": struct.pack("<Q", 58) + b'{"w":{"dtype":"F32","shape":[NaN],"data_offsets":[0,4]}}  ' + b"\0" * 4,
    "huge-dims": safetensors_bytes({"w": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},
                                   b"\0" * 16),
    "offsets-reversed": safetensors_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
    "offsets-past-end": safetensors_bytes({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}),
    "size-lie": safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8),
    "overlap": safetensors_bytes({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                  "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12),
    "duplicate-name": struct.pack("<Q", 102) + (b'{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                               b'"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}') + b"\0" * 4,
    "deep-json": struct.pack("<Q", 200000) + b"[" * 100000 + b"]" * 100000,
    **{f"truncated-{n}": safetensors_bytes(GOOD, b"\0" * 16)[:n] for n in (9, 30, 60, 80)},
}


@pytest.mark.parametrize("name", sorted(SAFETENSORS_CASES))
def test_malformed_safetensors(tmp_path, name):
    path = tmp_path / "model.safetensors"
    path.write_bytes(SAFETENSORS_CASES[name])
    with pytest.raises(InputError) as err:
        SafetensorsFile(path).load("w")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def gguf_fields(raw: bytes) -> dict[str, int]:
    """Byte offsets of structural fields in a valid GGUF, found by an independent walk of the format."""
    pos = 24
    fields = {"version": 4, "n_tensors": 8, "n_kv": 16}
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)

    def string(p):
        (n,) = struct.unpack_from("<Q", raw, p)
        return p + 8 + n

    for i in range(n_kv):
        key_at = pos
        pos = string(pos)
        (vtype,) = struct.unpack_from("<I", raw, pos)
        fields.setdefault("first_key_len", key_at)
        fields.setdefault("first_value_type", pos)
        pos += 4
        if vtype == 8:
            fields.setdefault("string_len", pos)
            pos = string(pos)
        elif vtype == 9:
            (itype, count) = struct.unpack_from("<IQ", raw, pos)
            fields.setdefault("array_type", pos)
            fields.setdefault("array_count", pos + 4)
            pos += 12
            for _ in range(count):
                pos = string(pos) if itype == 8 else pos + sizes[itype]
        else:
            pos += sizes[vtype]
    for i in range(n_tensors):
        pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        if i == 1:
            fields.update(n_dims=pos, dim0=pos + 4, ttype=pos + 4 + 8 * n_dims, toffset=pos + 12 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
    return fields


def gguf_cases(raw: bytes) -> dict[str, bytes]:
    f = gguf_fields(raw)

    def put(fmt: str, at: int, value) -> bytes:
        b = bytearray(raw)
        struct.pack_into(fmt, b, at, value)
        return bytes(b)

    cases = {
        "empty": b"", "bad-magic": b"GGML" + raw[4:], "version-1": put("<I", f["version"], 1),
        "version-99": put("<I", f["version"], 99), "n-tensors-huge": put("<Q", f["n_tensors"], 2**60),
        "n-kv-huge": put("<Q", f["n_kv"], 2**62), "key-len-huge": put("<Q", f["first_key_len"], 2**63),
        "value-type-unknown": put("<I", f["first_value_type"], 77), "string-len-past-end": put("<Q", f["string_len"],
                                                                                               len(raw)),
        "array-count-huge": put("<Q", f["array_count"], 2**61), "array-type-nested": put("<I", f["array_type"], 9),
        "tensor-zero-dims": put("<I", f["n_dims"], 0), "tensor-nine-dims": put("<I", f["n_dims"], 9),
        "tensor-dim-zero": put("<Q", f["dim0"], 0), "tensor-dim-huge": put("<Q", f["dim0"], 2**62),
        "tensor-type-unknown": put("<I", f["ttype"], 99), "tensor-offset-unaligned": put("<Q", f["toffset"], 3),
        "tensor-offset-past-end": put("<Q", f["toffset"], 2**40), "tensor-offset-overlap": put("<Q", f["toffset"], 0),
        "tensor-row-not-block": put("<Q", f["dim0"], 63),
        "kv-count-short": put("<Q", f["n_kv"], 1),
    }
    cases.update({f"truncated-{frac}": raw[: int(len(raw) * frac / 100)] for frac in (1, 5, 20, 50, 90, 99)})
    rng = np.random.default_rng(0)
    for i, at in enumerate(rng.integers(8, 24, 4)):  # bit flips in the counts
        b = bytearray(raw)
        b[at] ^= 0x80
        cases[f"bitflip-header-{i}"] = bytes(b)
    return cases


def test_gguf_corpus_fails_cleanly(glm3_gguf, tmp_path):
    raw = glm3_gguf.read_bytes()
    read_header(glm3_gguf)  # the base file is valid
    cases = gguf_cases(raw)
    assert len(cases) + len(SAFETENSORS_CASES) >= 40
    for name, data in cases.items():
        bad = tmp_path / f"{name}.gguf"
        bad.write_bytes(data)
        r = runner.invoke(app, ["run", str(bad), "-p", "hi", "-n", "1"])
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2, (name, r.output, r.exception)
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], (name, r.output)


@pytest.mark.parametrize("key,value,problem", [
    ("chatglm.attention.head_count", 0, "positive"),
    ("chatglm.attention.head_count_kv", 3, "multiple"),
    ("chatglm.rope.dimension_count", 999, "rope"),
    ("tokenizer.ggml.eos_token_id", 10**6, "outside the vocabulary"),
])
def test_hparams_that_would_crash_llama_are_refused(glm3_gguf, tmp_path, key, value, problem):
    import gguf

    reader = gguf.GGUFReader(glm3_gguf)
    bad = tmp_path / "bad.gguf"
    writer = gguf.GGUFWriter(bad, "chatglm")
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        v = value if field.name == key else field.contents()
        vtype = field.types[0] if field.name != key else gguf.GGUFValueType.UINT32
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_array(field.name, v)
        else:
            writer.add_key_value(field.name, v, vtype)
    for t in reader.tensors:
        writer.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    r = runner.invoke(app, ["run", str(bad), "-p", "hi", "-n", "1"])
    assert r.exit_code == 2 and problem in r.output, r.output


def test_convert_leaves_nothing_when_killed(glm3, tmp_path):
    """SIGKILL at several points of a conversion: the destination never exists half-written, and nothing is left
    beside it (the temporary file is unnamed until complete; a named one left by a kill in the instant between
    naming and renaming is removed by the next run)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    dest = tmp_path / "killed.gguf"
    for delay in (0.2, 0.6, 1.0, 1.5):
        proc = subprocess.Popen([sys.executable, "-m", "chatglm.cli", "convert", str(glm3.ckpt), "-o", str(dest),
                                 "-t", "q4_0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if dest.exists():  # it finished before the kill: a complete, valid file
            read_header(dest)
            dest.unlink()
        leftovers = [p.name for p in tmp_path.iterdir() if p.name != "killed.gguf"]
        assert all(n.startswith(".killed.gguf.") and n.endswith(".partial") for n in leftovers)
    assert not os.path.exists(dest)
    r = subprocess.run([sys.executable, "-m", "chatglm.cli", "convert", str(glm3.ckpt), "-o", str(dest), "-t", "q4_0"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["killed.gguf"]


def test_write_errors_are_one_line(glm3, tmp_path):
    """A file-size limit makes the write fail like a full disk: one line, nothing left behind."""
    import subprocess
    import sys

    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000)); "
            "from chatglm.cli.app import main; sys.argv = ['chatglm'] + sys.argv[1:]; main()")
    out = tmp_path / "full.gguf"
    r = subprocess.run([sys.executable, "-c", code, "convert", str(glm3.ckpt), "-o", str(out), "-t", "f32"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "write failed" in r.stderr and str(out) in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination(glm3, tmp_path):
    r = runner.invoke(app, ["convert", str(glm3.ckpt), "-o", str(tmp_path / "no-such-dir" / "x.gguf")])
    assert r.exit_code == 3 and r.output.count("\n") == 1 and "cannot write here" in r.output


@pytest.mark.parametrize("key,value,problem", [
    ("hidden_size", 0, "'hidden_size' must be an integer >= 1"),
    ("num_attention_heads", "four", "'num_attention_heads' must be an integer"),
    ("multi_query_group_num", 3, "not a multiple"),
    ("padded_vocab_size", 100, "expected [100, 64] from config.json"),
    ("seq_length", -5, "'seq_length' must be an integer >= 1"),
    ("layernorm_epsilon", float("nan"), "not valid config.json: NaN is not a JSON number"),  # RFC 8259 has no NaN
    ("rope_ratio", 0, "'rope_ratio' must be a positive number"),
    ("rmsnorm", False, "rmsnorm=False is not supported"),
])
def test_config_values_are_checked(glm3, tmp_path, key, value, problem):
    import shutil

    folder = tmp_path / "ckpt"
    shutil.copytree(glm3.ckpt, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["convert", str(folder), "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and problem in r.output and r.output.count("\n") == 1, r.output
    assert not (tmp_path / "x.gguf").exists()


def zip_checkpoint(path, pkl: bytes, storages: dict, compress_pkl=False, compress_data=False):
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pkl, zipfile.ZIP_DEFLATED if compress_pkl else zipfile.ZIP_STORED)
        for key, blob in storages.items():
            zf.writestr(f"archive/data/{key}", blob, zipfile.ZIP_DEFLATED if compress_data else zipfile.ZIP_STORED)


def test_zip_bombs_are_never_inflated(tmp_path):
    import torch
    from chatglm.convert.torch_file import TorchFile

    good = tmp_path / "good.bin"
    torch.save({"w": torch.zeros(4)}, good)
    import zipfile

    with zipfile.ZipFile(good) as zf:
        pkl = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
    bomb = tmp_path / "storage-bomb.bin"
    zip_checkpoint(bomb, pkl, {"0": b"\0" * (64 << 20)}, compress_data=True)  # 64 MB of zeros in ~64 KB
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(InputError, match="compressed, which PyTorch never writes"):
        TorchFile(bomb)
    pkl_bomb = tmp_path / "pickle-bomb.bin"
    zip_checkpoint(pkl_bomb, pkl + b"\0" * (32 << 20), {}, compress_pkl=True)
    with pytest.raises(InputError, match="data.pkl is"):
        TorchFile(pkl_bomb)


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_pickles_with_forbidden_globals(tmp_path, payload):
    import pickle

    from chatglm.convert.torch_file import TorchFile

    module, name = payload.split(".")
    marker = tmp_path / "ran"
    pkl = (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
           + pickle.dumps((f"touch {marker}",), protocol=2)[2:-1] + b"R.")
    bad = tmp_path / "evil.bin"
    zip_checkpoint(bad, pkl, {})
    with pytest.raises(InputError, match="refusing to load") as err:
        TorchFile(bad)
    assert name in str(err.value) and not marker.exists()


def test_pickle_memo_bomb_is_refused_without_allocating(tmp_path):
    """A LONG_BINPUT with a huge index would make CPython's unpickler allocate gigabytes (found by atheris)."""
    from chatglm.convert.torch_file import TorchFile

    bomb = tmp_path / "memo.bin"
    zip_checkpoint(bomb, b"\x80\x02}q\x00(X\x01\x00\x00\x00wr\x00\x00\x00\x48K\x01u.", {})
    with pytest.raises(InputError, match="memo index"):
        TorchFile(bomb)

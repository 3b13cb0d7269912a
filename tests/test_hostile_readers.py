"""Hostile input to the readers of untrusted files: pickles, zip containers, JSON, and paths that are not files.

Every input is made here: pickles opcode by opcode, zips edited with struct, JSON as strings. Each case goes through
``chatglm convert`` (in a child process where it once killed or hung the process) and, where useful, through the
reader class itself, and must end as promised: one ``error:`` line naming the file, exit 2, no traceback, nothing at
the destination, the sources byte-identical.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from chatglm import fsutil
from chatglm.convert import pickle_scan, torch_file
from chatglm.convert.safetensors_file import SafetensorsFile
from chatglm.convert.torch_file import TorchFile
from chatglm.errors import InputError
from hostile import assert_refused, cli, deadline, digest

# ------------------------------------------------------------------------------------------- pickles by hand

PROTO, STOP, MARK, NONE = b"\x80\x02", b".", b"(", b"N"
EMPTY_TUPLE, TUPLE1, EMPTY_LIST, APPEND, EMPTY_DICT = b")", b"\x85", b"]", b"a", b"}"
SETITEM, SETITEMS, DICT, REDUCE, BUILD = b"s", b"u", b"d", b"R", b"b"


def text(s: str) -> bytes:  # BINUNICODE
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def long1(n: int) -> bytes:  # LONG1, or LONG4 when it does not fit
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw if len(raw) < 256 else b"\x8b" + struct.pack("<i", len(raw)) + raw


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def state_dict(value: bytes) -> bytes:
    """``{"w": <value>}``"""
    return PROTO + EMPTY_DICT + text("w") + value + SETITEM + STOP


DEPTH = 1_000_000
DEEP_TUPLE = EMPTY_TUPLE + TUPLE1 * DEPTH
DEEP_PICKLES = {  # the first two killed the process (SIGSEGV: hashing a tuple recurses in C without a limit)
    "tuple-as-key": PROTO + EMPTY_DICT + DEEP_TUPLE + NONE + SETITEM + STOP,
    "tuple-in-frozenset": state_dict(MARK + DEEP_TUPLE + b"\x91"),
    "tuple": state_dict(DEEP_TUPLE),
    # the rest push every level before nesting any: 10**5 keeps the scan of them fast
    "list": state_dict(EMPTY_LIST * 10**5 + APPEND * (10**5 - 1)),
    "dict": state_dict((EMPTY_DICT + text("k")) * 10**5 + EMPTY_DICT + SETITEM * 10**5),
    "reduce": state_dict(glob("torch._utils", "_rebuild_parameter") * 10**5 + NONE + (TUPLE1 + REDUCE) * 10**5),
}
COLLIDING = [k * (2**61 - 1) for k in range(1, 50_001)]  # every one hashes to 0: a dict of them is quadratic
HASH_BOMBS = {
    "colliding-ints": PROTO + EMPTY_DICT + MARK + b"".join(long1(k) + NONE for k in COLLIDING) + SETITEMS + STOP,
    "colliding-ints-DICT": PROTO + MARK + b"".join(long1(k) + NONE for k in COLLIDING[:1000]) + DICT + STOP,
    "huge-int-key": PROTO + EMPTY_DICT + long1(7**400_000) + NONE + SETITEM + STOP,
    "tuple-key": PROTO + EMPTY_DICT + EMPTY_TUPLE + TUPLE1 * 50 + NONE + SETITEM + STOP,
    "set": PROTO + b"\x8f" + MARK + b"".join(long1(k) for k in COLLIDING[:1000]) + b"\x90" + STOP,
    "frozenset": PROTO + MARK + b"".join(long1(k) for k in COLLIDING[:1000]) + b"\x91" + STOP,
}
HASH_PROBLEMS = {
    "colliding-ints": "has a dictionary key that is a int, not a string",
    "colliding-ints-DICT": "has a dictionary key that is a int, not a string",
    "huge-int-key": "has a dictionary key that is a int, not a string",
    "tuple-key": "has a dictionary key that is a tuple, not a string",
    "set": "uses the pickle opcode EMPTY_SET, which a state dict never needs",
    "frozenset": "uses the pickle opcode FROZENSET, which a state dict never needs",
}


def torch_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None, **extra: bytes) -> Path:
    """A zip laid out as torch.save lays it out, around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for key, blob in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", blob)
        for name, blob in extra.items():
            zf.writestr(f"archive/{name}", blob)
    return path


def folder_with(tmp_path: Path, name: str, blob: bytes | None = None, folder: str = "ckpt") -> Path:
    """A checkpoint folder of a minimal config.json and one weight file ``name`` holding ``blob``."""
    folder = tmp_path / folder
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": ["ChatGLMModel"], "model_type": "chatglm"}))
    if blob is not None:
        (folder / name).write_bytes(blob)
    return folder


def convert_refused(folder: Path, tmp_path: Path, names, problem: str, *, isolated: bool = False,
                    timeout: float = 60, extra=()) -> None:
    sources = digest([p for p in Path(folder).iterdir() if p.is_file() and not p.is_fifo()])
    dest = tmp_path / "out.gguf"
    with deadline(int(timeout) + 5):
        outcome = cli(["convert", folder, "-o", dest, "-t", "f32", *extra], isolated=isolated, timeout=timeout)
    assert_refused(outcome, names, code=2, problem=problem, dest=dest, sources=sources)


# ------------------------------------------------------------------------------------ 1. nesting depth


@pytest.mark.parametrize("kind", sorted(DEEP_PICKLES))
def test_pickle_nested_a_million_deep_is_refused_without_recursion(tmp_path, kind):
    folder = folder_with(tmp_path, "pytorch_model.bin")
    bin_path = torch_zip(folder / "pytorch_model.bin", DEEP_PICKLES[kind])
    convert_refused(folder, tmp_path, bin_path, "refusing to load: data.pkl nests objects more than 64 levels deep",
                    isolated=kind.startswith("tuple-"))  # the ones that crashed run in a child


def test_pickle_depth_limit_is_exact():
    allowed = torch_file.ALLOWED
    pickle_scan.scan_pickle(state_dict(EMPTY_TUPLE + TUPLE1 * 62), allowed)  # the dict is level 64
    with pytest.raises(pickle_scan.PickleRefused, match="more than 64 levels deep"):
        pickle_scan.scan_pickle(state_dict(EMPTY_TUPLE + TUPLE1 * 63), allowed)


def test_depth_gained_by_filling_a_shared_object_later_is_refused():
    """A list put inside another and appended to afterwards would grow deeper than any count made when it was
    placed; pickle never writes that, so it is refused."""
    pkl = PROTO + EMPTY_LIST + b"q\x00" + EMPTY_LIST + b"h\x00" + APPEND + b"0" + b"h\x00" + EMPTY_LIST + APPEND + STOP
    with pytest.raises(pickle_scan.PickleRefused, match="changes an object after it was put inside another one"):
        pickle_scan.scan_pickle(pkl, torch_file.ALLOWED)
    self_loop = PROTO + EMPTY_LIST + b"q\x00" + b"h\x00" + APPEND + STOP
    with pytest.raises(pickle_scan.PickleRefused, match="an object contains itself"):
        pickle_scan.scan_pickle(self_loop, torch_file.ALLOWED)


# ------------------------------------------------------------------------------------------ 2. hash bombs


@pytest.mark.parametrize("kind", sorted(HASH_BOMBS))
def test_pickle_hash_bombs_are_refused_at_once(tmp_path, kind):
    folder = folder_with(tmp_path, "pytorch_model.bin")
    bin_path = torch_zip(folder / "pytorch_model.bin", HASH_BOMBS[kind])
    start = time.perf_counter()
    convert_refused(folder, tmp_path, bin_path, HASH_PROBLEMS[kind], isolated=kind.startswith("colliding"),
                    timeout=60)  # the colliding ones hung for hours
    assert time.perf_counter() - start < 30


def test_item_count_of_one_container_is_bounded(monkeypatch):
    monkeypatch.setattr(pickle_scan, "MAX_ITEMS", 100)
    items = b"".join(text(f"k{i}") + NONE for i in range(60))
    with pytest.raises(pickle_scan.PickleRefused, match="puts more than 100 items in one container"):
        pickle_scan.scan_pickle(PROTO + EMPTY_DICT + MARK + items + SETITEMS + STOP, torch_file.ALLOWED)


# ------------------------------------------------------------------------------ 3. stand-ins are per load


def good_bin(path: Path) -> Path:
    import torch

    torch.save({"w": torch.arange(4, dtype=torch.float32)}, path)
    return path


LEAKS = {  # BUILD on a shared stand-in: the next load would read F32 storages as F16, or call other defaults
    "storage-type": glob("torch", "FloatStorage") + EMPTY_DICT + text("dtype") + text("F16") + SETITEM + BUILD,
    "function": glob("torch._utils", "_rebuild_tensor_v2") + NONE + EMPTY_DICT + text("__defaults__")
                + EMPTY_TUPLE + SETITEM + b"\x86" + BUILD,  # (None, {"__defaults__": ()}): setattr on the function
    "class": glob("collections", "OrderedDict") + NONE + EMPTY_DICT + text("items") + NONE + SETITEM + b"\x86"
             + BUILD,
}


@pytest.mark.parametrize("kind", sorted(LEAKS))
def test_build_on_a_stand_in_is_refused_and_never_leaks_into_the_next_load(tmp_path, kind):
    evil = torch_zip(tmp_path / "evil.bin", PROTO + EMPTY_DICT + text("w") + LEAKS[kind] + SETITEM + STOP)
    with pytest.raises(InputError, match="refusing to load: data.pkl sets the state of a global"):
        TorchFile(evil)
    f = TorchFile(good_bin(tmp_path / "good.bin"))
    assert f.infos()["w"].dtype == "F32"
    np.testing.assert_array_equal(f.load("w"), np.arange(4, dtype=np.float32))


@pytest.mark.parametrize("kind", sorted(LEAKS))
def test_stand_ins_are_fresh_even_for_an_unpickler_without_the_scan(tmp_path, kind):
    """Two loads in one process: what the first does to its stand-ins (here past the scan, straight through the
    unpickler) is invisible to the second."""
    import io

    evil = PROTO + EMPTY_DICT + text("w") + LEAKS[kind] + SETITEM + STOP
    try:
        torch_file._StateDictUnpickler(io.BytesIO(evil)).load()
    except Exception:
        pass  # some BUILDs fail inside the unpickler; what matters is the next load
    f = TorchFile(good_bin(tmp_path / "good.bin"))
    assert f.infos()["w"].dtype == "F32"
    np.testing.assert_array_equal(f.load("w"), np.arange(4, dtype=np.float32))
    first, second = torch_file.standins(), torch_file.standins()
    assert all(first[k] is not second[k] for k in first)


def test_build_cannot_replace_the_methods_the_reader_calls(tmp_path):
    """BUILD on an OrderedDict may set attributes (state dicts carry _metadata), even one named "items"."""
    od = glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE
    pkl = PROTO + od + EMPTY_DICT + text("items") + glob("torch._utils", "_rebuild_tensor_v2") + SETITEM + BUILD + STOP
    assert TorchFile(torch_zip(tmp_path / "items.bin", pkl)).infos() == {}


# ------------------------------------------------------------------------------------------ 4. broken zips

END = struct.Struct("<4s4H2LH")


def good_zip_bytes(tmp_path: Path, rezip: bool = False) -> bytes:
    """torch.save's zip (torch names its folder after the file), or its members re-zipped by ``zipfile`` (which,
    unlike torch's writer, adds no zip64 end records of its own)."""
    raw = good_bin(tmp_path / "archive.bin").read_bytes()
    if not rezip:
        return raw
    with zipfile.ZipFile(tmp_path / "archive.bin") as src, zipfile.ZipFile(tmp_path / "plain.bin", "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return (tmp_path / "plain.bin").read_bytes()


def end_record(raw: bytes) -> int:
    return raw.rindex(b"PK\x05\x06")


def directory_entries(raw: bytes) -> dict[str, int]:
    """Central directory entry offsets by member name."""
    _, _, _, _, count, _, offset, _ = END.unpack_from(raw, end_record(raw))
    out, pos = {}, offset
    for _ in range(count):
        name_len, extra_len, comment_len = struct.unpack_from("<3H", raw, pos + 28)
        out[raw[pos + 46 : pos + 46 + name_len].decode()] = pos
        pos += 46 + name_len + extra_len + comment_len
    return out


def put(raw: bytes, offset: int, fmt: str, *values) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def member(raw: bytes, suffix: str) -> int:
    return next(pos for name, pos in directory_entries(raw).items() if name.endswith(suffix))


def local_data(raw: bytes, suffix: str) -> int:
    header = struct.unpack_from("<L", raw, member(raw, suffix) + 42)[0]
    name_len, extra_len = struct.unpack_from("<2H", raw, header + 26)
    return header + 30 + name_len + extra_len


def bad_crc(raw: bytes) -> bytes:
    pos = local_data(raw, "data.pkl") + 5
    return raw[:pos] + bytes([raw[pos] ^ 0x01]) + raw[pos + 1 :]


def zip64_lie(raw: bytes, directory_size: int, record_at: int | None = None) -> bytes:
    """The end record says "see zip64" and a zip64 record + locator before it declare ``directory_size``."""
    end_at = end_record(raw)
    _, d1, d2, n1, n2, size, offset, comment = END.unpack_from(raw, end_at)
    record = struct.pack("<4sQ2H2L4Q", b"PK\x06\x06", 44, 45, 45, 0, 0, n1, n2, directory_size, offset)
    locator = struct.pack("<4sLQL", b"PK\x06\x07", 0, end_at if record_at is None else record_at, 1)
    end = END.pack(b"PK\x05\x06", d1, d2, 0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF, comment)
    return raw[:end_at] + record + locator + end


def grow_member(raw: bytes, suffix: str, by: int) -> bytes:
    pos = member(raw, suffix)
    csize, usize = struct.unpack_from("<2L", raw, pos + 20)
    return put(raw, pos + 20, "<2L", csize + by, usize + by)


def method(raw: bytes, suffix: str, value: int) -> bytes:
    return put(raw, member(raw, suffix) + 10, "<H", value)


def flags(raw: bytes, suffix: str, value: int) -> bytes:
    return put(raw, member(raw, suffix) + 8, "<H", value)


def duplicate_member(tmp_path: Path) -> bytes:
    import warnings

    path = torch_zip(tmp_path / "dup.bin", state_dict(NONE), {"0": b"\0" * 16})
    with warnings.catch_warnings(), zipfile.ZipFile(path, "a") as zf:
        warnings.simplefilter("ignore")
        zf.writestr("archive/data/0", b"\1" * 16)
    return path.read_bytes()


def deflated_pkl_broken(tmp_path: Path) -> bytes:
    path = tmp_path / "deflated.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", state_dict(NONE) * 50, zipfile.ZIP_DEFLATED)
    raw = path.read_bytes()
    pos = local_data(raw, "data.pkl")
    return raw[:pos] + b"\xff" * 8 + raw[pos + 8 :]


def byteorder_bomb(tmp_path: Path) -> bytes:
    path = tmp_path / "order.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", state_dict(NONE))
        zf.writestr("archive/byteorder", b"\0" * (32 << 20), zipfile.ZIP_DEFLATED)
    return path.read_bytes()


BROKEN_ZIPS = {  # name -> (bytes from a good torch.save zip, the problem)
    "bad-crc": (bad_crc, "archive/data.pkl cannot be read from the zip archive (BadZipFile: Bad CRC-32"),
    "directory-cut": (lambda r: r[: end_record(r) - 40] + r[end_record(r):],
                      "damaged zip archive"),
    "directory-larger-than-file": (lambda r: put(r, end_record(r) + 12, "<L", len(r) * 2),
                                   "central directory"),
    "truncated-end": (lambda r: r[: end_record(r) + 10], "the zip archive has no central directory"),
    "zip64-no-locator": (lambda r: put(r, end_record(r) + 12, "<2L", 0xFFFFFFFF, 0xFFFFFFFF),
                         "declares zip64 sizes but has no zip64 locator"),
    "zip64-directory-lies": (lambda r: zip64_lie(r, 2**40), "central directory (1099511627776 bytes) is larger"),
    "zip64-record-outside": (lambda r: zip64_lie(r, 100, record_at=2**50), "zip64 end record lies outside the file"),
    "member-size-4GB": (lambda r: put(r, member(r, "data/0") + 20, "<2L", 0xFFFFFFFF, 0xFFFFFFFF),
                        "member archive/data/0 lies outside the file"),
    "stored-size-disagrees": (lambda r: put(r, member(r, "data/0") + 24, "<L", 4),
                              "member archive/data/0 is stored uncompressed but declares 4 bytes and holds 16"),
    "overlapping": (lambda r: grow_member(r, "data.pkl", 40), "overlap in the zip archive"),
    "header-elsewhere": (lambda r: put(r, member(r, "data/0") + 42, "<L", 0),
                         "member archive/data/0's local header"),
    "encrypted": (lambda r: flags(r, "data/0", 1), "member archive/data/0 is encrypted"),
    "unknown-method": (lambda r: method(r, "data/0", 99), "compressed with zip method 99"),
}


@pytest.fixture
def good_raw(tmp_path):
    return good_zip_bytes(tmp_path)


# torch's writer already adds a zip64 locator (the edited end record is then valid): that case runs on Python's zipfile
ZIP_CASES = [(name, rezip) for name in sorted(BROKEN_ZIPS) for rezip in (False, True)
             if rezip or name != "zip64-no-locator"]


@pytest.mark.parametrize("name, rezip", ZIP_CASES, ids=[f"{n}-{'zipfile' if r else 'torch'}" for n, r in ZIP_CASES])
def test_broken_zip_containers(tmp_path, name, rezip):
    edit, problem = BROKEN_ZIPS[name]
    folder = folder_with(tmp_path, "pytorch_model.bin", edit(good_zip_bytes(tmp_path, rezip)))
    convert_refused(folder, tmp_path, folder / "pytorch_model.bin", problem)


@pytest.mark.parametrize("make, problem", [
    (duplicate_member, "the zip archive holds member archive/data/0 twice"),
    (deflated_pkl_broken, "archive/data.pkl cannot be read from the zip archive (error: Error -3"),
    (byteorder_bomb, "archive/byteorder is 33554432 bytes, more than the 16 it can be"),
])
def test_broken_zip_members(tmp_path, make, problem):
    folder = folder_with(tmp_path, "pytorch_model.bin", make(tmp_path))
    convert_refused(folder, tmp_path, folder / "pytorch_model.bin", problem)


def test_names_from_the_archive_cannot_break_the_line(tmp_path):
    path = tmp_path / "names.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", state_dict(NONE))
        zf.writestr("archive/data/0\nerror: forged", b"\0" * 4, zipfile.ZIP_DEFLATED)
    folder = folder_with(tmp_path, "pytorch_model.bin", path.read_bytes())
    convert_refused(folder, tmp_path, folder / "pytorch_model.bin", "storage 0\\nerror: forged is compressed")


def test_every_truncation_of_a_checkpoint_is_one_line(tmp_path, good_raw):
    for n in range(0, len(good_raw), max(1, len(good_raw) // 97)):
        path = tmp_path / "cut.bin"
        path.write_bytes(good_raw[:n])
        with pytest.raises(InputError) as err:
            TorchFile(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)


# -------------------------------------------------------------------------------------------------- 5. JSON

NESTED = "[" * 100_000 + "]" * 100_000
JSON_CASES = {  # text -> problem
    "deep-array": (NESTED, "nested more than 100 levels deep"),
    "deep-object": ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested more than 100 levels deep"),
    "deep-inside": (json.dumps({"architectures": ["ChatGLMModel"], "x": None}).replace("null", NESTED),
                    "nested more than 100 levels deep"),
    "syntax": ('{"a": 1,\n  "b" 2}', "Expecting ':' delimiter at line 2 column 7"),
    "nan": ('{"a": NaN}', "NaN is not a JSON number"),
    "infinity": ('{"a": -Infinity}', "-Infinity is not a JSON number"),
    "overflow": ('{"a": 1e999}', "number 1e999 is out of range"),
    "huge-int": ('{"a": ' + "9" * 5000 + "}", "an integer of 5000 digits is out of range"),
    "not-utf8": (b'{"a": "\xff"}', "not UTF-8 text (byte 7)"),
    "lone-surrogate": ('{"a": "x\\udc80"}', "a string holds a lone UTF-16 surrogate (\\udc80)"),
}


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize("name", sorted(JSON_CASES))
def test_config_json(tmp_path, name):
    content, problem = JSON_CASES[name]
    folder = folder_with(tmp_path, "x")
    write(folder / "config.json", content)
    convert_refused(folder, tmp_path, folder / "config.json", f"not valid config.json: {problem}")


def test_json_reader_bounds(tmp_path):
    path = write(tmp_path / "a.json", '{"a": [1, 2, {"b": "[[[[{{{{"}]}')
    assert fsutil.read_json(path) == {"a": [1, 2, {"b": "[[[[{{{{"}]}
    assert fsutil.read_json(write(tmp_path / "b.json", "[" * 100 + "]" * 100), max_depth=100)
    with pytest.raises(InputError, match="nested more than 100 levels deep"):
        fsutil.read_json(write(tmp_path / "c.json", "[" * 101 + "]" * 101))
    with pytest.raises(InputError, match=f"a.json: JSON is {path.stat().st_size} bytes, more than the 10 this tool"):
        fsutil.read_json(path, max_bytes=10)
    escaped = write(tmp_path / "d.json", json.dumps(["\\\"[" * 1000]))  # brackets inside strings do not count
    assert fsutil.read_json(escaped) == ["\\\"[" * 1000]


def safetensors_with(header: str) -> bytes:
    raw = header.encode()
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("where", ["model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json"])
def test_deep_json_in_checkpoint_files(tmp_path, where):
    folder = folder_with(tmp_path, "x")
    if where == "model.safetensors":
        write(folder / where, safetensors_with(NESTED))
        what = "safetensors header"
    else:
        write(folder / where, NESTED)
        what = "index"
    convert_refused(folder, tmp_path, folder / where, f"not valid {what}: nested more than 100 levels deep")


def test_deep_tokenizer_files(tmp_path):
    from chatglm.convert.vocab_bpe import added_tokens_from_config, build_tokenizer_json_vocab

    for name, read in [("tokenizer.json", lambda p: build_tokenizer_json_vocab(p, 100)),
                       ("tokenizer_config.json", added_tokens_from_config)]:
        path = write(tmp_path / name, '{"model": ' + NESTED + "}")
        with pytest.raises(InputError, match=f"{name}: not valid {name}: nested more than 100 levels deep"):
            read(path)


def test_deep_safetensors_header_directly(tmp_path):
    path = write(tmp_path / "m.safetensors", safetensors_with('{"w": ' + NESTED + "}"))
    with pytest.raises(InputError, match="not valid safetensors header: nested more than 100 levels deep"):
        SafetensorsFile(path)


def test_deep_adapter_config(tmp_path, glm3):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    write(adapter / "adapter_config.json", NESTED)
    out = tmp_path / "a.gguf"
    outcome = cli(["lora", glm3.ckpt, adapter, "-o", out])
    assert_refused(outcome, adapter / "adapter_config.json", problem="nested more than 100 levels deep", dest=out)


def test_deep_tools_file_and_conversation(tmp_path):
    from chatglm.runtime.chatfiles import read_conversation, read_tools

    lone = write(tmp_path / "lone.json", '[{"role": "user", "content": "\\ud800"}]')
    with pytest.raises(InputError, match="lone.json: not valid JSON: a string holds a lone UTF-16 surrogate"):
        read_conversation(lone)
    deep = write(tmp_path / "deep.json", '{"tools": ' + NESTED + "}")
    for reader in (read_tools, read_conversation):
        with pytest.raises(InputError, match="deep.json: not valid JSON: nested more than 100 levels deep"):
            reader(deep)
    outcome = cli(["run", "--tools", deep, "-p", "hi"])
    assert_refused(outcome, deep, problem="not valid JSON: nested more than 100 levels deep")


# ------------------------------------------------------------------------------------- 6. not regular files


def fifo(path: Path) -> Path:
    path.unlink(missing_ok=True)
    os.mkfifo(path)
    return path


@pytest.mark.parametrize("name", ["config.json", "pytorch_model.bin", "model.safetensors"])
def test_fifo_in_a_checkpoint_never_blocks(tmp_path, name):
    folder = folder_with(tmp_path, "x")
    fifo(folder / name)
    convert_refused(folder, tmp_path, folder / name, "is not a regular file (a FIFO)", timeout=20)


def test_device_and_directory_where_a_file_belongs(tmp_path):
    folder = folder_with(tmp_path, "x")
    (folder / "config.json").unlink()
    (folder / "config.json").symlink_to("/dev/zero")
    convert_refused(folder, tmp_path, folder / "config.json", "is not a regular file (a character device)",
                    isolated=True, timeout=60)
    folder = folder_with(tmp_path, "x", folder="other")
    (folder / "model.safetensors").mkdir()
    convert_refused(folder, tmp_path, folder / "model.safetensors", "is a directory, not a file")


@pytest.mark.parametrize("command", [["info"], ["run", "-p", "hi"]])
def test_fifo_gguf_never_blocks(tmp_path, command):
    path = fifo(tmp_path / "m.gguf")
    isolated = command[0] == "run"  # a native loader blocked there would not see the alarm
    with deadline(25):
        outcome = cli([command[0], path, *command[1:]], isolated=isolated, timeout=20)
    assert_refused(outcome, path, problem="is not a regular file (a FIFO)")


def test_fifo_tools_texts_and_tokenizer(tmp_path, glm3):
    tools = fifo(tmp_path / "tools.json")
    with deadline(20):
        assert_refused(cli(["run", "--tools", tools, "-p", "hi"]), tools, problem="is not a regular file (a FIFO)")
    text_file = fifo(tmp_path / "text.txt")
    with deadline(20):
        assert_refused(cli(["perplexity", glm3.ckpt / "config.json", text_file]), text_file,
                       problem="is not a regular file (a FIFO)")
    folder = tmp_path / "glm3"
    shutil.copytree(glm3.ckpt, folder)
    fifo(folder / "tokenizer.model")
    convert_refused(folder, tmp_path, folder / "tokenizer.model", "is not a regular file (a FIFO)", timeout=20)
    imatrix = fifo(tmp_path / "imatrix.dat")
    convert_refused(glm3.ckpt, tmp_path, imatrix, "is not a regular file (a FIFO)", timeout=20,
                    extra=["--imatrix", str(imatrix), "-t", "q4_0"])


def test_open_regular_reports_what_the_path_is(tmp_path):
    for path, problem in [(fifo(tmp_path / "p"), "is not a regular file (a FIFO)"),
                          (Path("/dev/null"), "is not a regular file (a character device)"),
                          (tmp_path, "is a directory, not a file"), (tmp_path / "none", "file not found")]:
        with pytest.raises(InputError, match=problem.replace("(", r"\(").replace(")", r"\)")):
            fsutil.open_regular(path)
    with fsutil.open_regular(write(tmp_path / "f", "abc")) as fh:
        assert fh.read() == b"abc"


def test_zlib_is_the_one_that_would_fail():  # guards the deflate case above against a silent no-op edit
    with pytest.raises(zlib.error):
        zlib.decompressobj(-15).decompress(b"\xff" * 8)

"""llama.cpp importance matrices: both file formats built byte by byte, llama-quantize's normalisation, and the
checks that turn away malformed files and matrices of another model."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from chatglm.convert.imatrix import load_imatrix, n_values, write_legacy
from chatglm.errors import InputError


def _legacy_entry(name: str, ncall: int, values: list[float]) -> bytes:
    raw = name.encode()
    return struct.pack(f"<i{len(raw)}sii{len(values)}f", len(raw), raw, ncall, len(values), *values)


def _legacy(entries: list[bytes], trailer: bytes = b"") -> bytes:
    return struct.pack("<i", len(entries)) + b"".join(entries) + trailer


def test_legacy_values_are_divided_by_ncall(tmp_path: Path) -> None:
    path = tmp_path / "imatrix.dat"
    trailer = struct.pack("<ii9s", 12, 9, b"wiki.text")
    path.write_bytes(_legacy([_legacy_entry("blk.0.attn_qkv.weight", 4, [2.0, 6.0, 1.0]),
                              _legacy_entry("blk.0.ffn_up.weight", 0, [3.0, 5.0])], trailer))
    m = load_imatrix(path)
    assert m.legacy and m.chunk_count == 12 and m.datasets == ["wiki.text"]
    np.testing.assert_array_equal(m.entries["blk.0.attn_qkv.weight"], np.float32([0.5, 1.5, 0.25]))
    np.testing.assert_array_equal(m.entries["blk.0.ffn_up.weight"], np.float32([3.0, 5.0]))  # ncall 0: as stored
    assert all(v.dtype == np.float32 for v in m.entries.values())


def test_legacy_trailer_is_optional_and_writer_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "bare.dat"
    path.write_bytes(_legacy([_legacy_entry("output.weight", 2, [4.0])]))
    m = load_imatrix(path)
    assert m.chunk_count == 0 and m.datasets == [] and m.entries["output.weight"].tolist() == [2.0]
    write_legacy(tmp_path / "w.dat", {"output.weight": (2, np.float32([4.0]))}, chunk_count=3, dataset="d")
    assert (tmp_path / "w.dat").read_bytes() == path.read_bytes() + struct.pack("<ii1s", 3, 1, b"d")


@pytest.mark.parametrize("content, message", [
    (struct.pack("<i", 0), "not an imatrix file: entry count 0"),
    (b"\x01\x00", "truncated imatrix: entry count at byte 0 needs 4 bytes, 2 left"),
    (_legacy([_legacy_entry("a.weight", 1, [1.0, 2.0])])[:-4],
     "truncated imatrix: a.weight values at byte 24 needs 8 bytes, 4 left"),
    (struct.pack("<ii", 1, -5), "not an imatrix file: entry 0 has a name length of -5"),
    (struct.pack("<ii", 1, 1 << 30), "not an imatrix file: entry 0 has a name length of 1073741824"),
    (_legacy([struct.pack("<i1sii", 1, b"a", 1, 0)]), "imatrix entry a has 0 values"),
    (_legacy([_legacy_entry("a.weight", 1, [1.0, -2.0])]), "imatrix entry a.weight has negative or non-finite"),
    (_legacy([_legacy_entry("a.weight", 1, [float("nan")])]), "imatrix entry a.weight has negative or non-finite"),
])
def test_malformed_legacy_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.dat"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        load_imatrix(path)
    assert str(e.value).startswith(f"{path}: {message}")


def _gguf_imatrix(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], metadata: bool = True) -> Path:
    """What llama-imatrix writes: <name>.in_sum2 (n_expert, n_cols) and <name>.counts (n_expert, 1), f32."""
    w = gguf.GGUFWriter(path, arch="imatrix")
    w.add_type("imatrix")
    if metadata:
        w.add_array("imatrix.datasets", ["calib.txt"])
        w.add_uint32("imatrix.chunk_count", 7)
        w.add_uint32("imatrix.chunk_size", 512)
    for name, (sums, counts) in entries.items():
        w.add_tensor(f"{name}.in_sum2", np.asarray(sums, np.float32))
        w.add_tensor(f"{name}.counts", np.asarray(counts, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_values_are_divided_by_rounded_counts(tmp_path: Path) -> None:
    path = _gguf_imatrix(tmp_path / "imatrix.gguf", {
        "blk.0.attn_qkv.weight": (np.float32([[3.0, 6.0, 9.0, 1.0]]), np.float32([[2.5]])),  # lround(2.5) = 3
        # three experts: counts 2, 0.4 (rounds to 0: ones), 4
        "blk.1.ffn_down_exps.weight": (np.float32([[2, 4], [5, 5], [8, 1]]), np.float32([[2.0], [0.4], [4.0]])),
    })
    m = load_imatrix(path)
    assert not m.legacy and m.datasets == ["calib.txt"] and m.chunk_count == 7
    np.testing.assert_array_equal(m.entries["blk.0.attn_qkv.weight"], np.float32([1.0, 2.0, 3.0, 1.0 / 3.0]))
    np.testing.assert_array_equal(m.entries["blk.1.ffn_down_exps.weight"], np.float32([1, 2, 1, 1, 2, 0.25]))


def test_gguf_problems(tmp_path: Path) -> None:
    one = {"a.weight": (np.ones((1, 4)), np.ones((1, 1)))}
    with pytest.raises(InputError, match="not an imatrix GGUF: no imatrix.datasets, imatrix.chunk_count, "
                                         r"imatrix.chunk_size \(a model file\?\)"):
        load_imatrix(_gguf_imatrix(tmp_path / "nometa.gguf", one, metadata=False))
    w = gguf.GGUFWriter(tmp_path / "half.gguf", arch="imatrix")
    w.add_array("imatrix.datasets", ["x"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 1)
    w.add_tensor("a.weight.in_sum2", np.ones(4, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match="imatrix GGUF has .in_sum2 without .counts or the reverse for a.weight"):
        load_imatrix(tmp_path / "half.gguf")
    with pytest.raises(InputError, match="imatrix entry b.weight: 5 sums do not split into 2 experts"):
        load_imatrix(_gguf_imatrix(tmp_path / "split.gguf", {"b.weight": (np.ones(5), np.ones((2, 1)))}))
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\xff" * 20)
    with pytest.raises(InputError, match="malformed imatrix GGUF"):
        load_imatrix(tmp_path / "junk.gguf")
    with pytest.raises(InputError, match="cannot read imatrix"):
        load_imatrix(tmp_path / "missing.dat")


SHAPES = {"token_embd.weight": (64, 256), "blk.0.attn_qkv.weight": (384, 256), "blk.0.ffn_down.weight": (256, 160),
          "blk.1.ffn_up_exps.weight": (8, 64, 256)}


def test_matrix_of_another_model_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "other.dat"
    write_legacy(path, {"blk.0.attn_qkv.weight": (1, np.ones(4096, np.float32))})
    with pytest.raises(InputError) as e:
        load_imatrix(path).check_model(SHAPES)
    assert str(e.value) == (f"{path}: imatrix for another model: blk.0.attn_qkv.weight has 4096 values, the model's "
                            "tensor needs 256 (shape (384, 256))")
    write_legacy(path, {"model.layers.0.mlp.weight": (1, np.ones(4, np.float32))})
    with pytest.raises(InputError, match=r"imatrix for another model: none of its 1 tensors \(model.layers.0.mlp"):
        load_imatrix(path).check_model(SHAPES)


def test_matching_matrix_is_served_per_tensor(tmp_path: Path) -> None:
    path = tmp_path / "ok.dat"
    write_legacy(path, {"blk.0.attn_qkv.weight": (1, np.ones(256, np.float32)),
                        "blk.1.ffn_up_exps.weight": (2, np.full(8 * 256, 4.0, np.float32)),
                        "token_embd.weight": (1, np.ones(3, np.float32))})
    m = load_imatrix(path)
    m.check_model(SHAPES)
    assert m.for_tensor("blk.1.ffn_up_exps.weight", SHAPES["blk.1.ffn_up_exps.weight"]).tolist() == [2.0] * 2048
    assert m.for_tensor("blk.0.ffn_down.weight", SHAPES["blk.0.ffn_down.weight"]) is None  # no entry: none used
    assert m.for_tensor("token_embd.weight", SHAPES["token_embd.weight"]) is None  # wrong size ignored, as llama.cpp
    assert n_values((8, 64, 256)) == 2048 and n_values((384, 256)) == 256

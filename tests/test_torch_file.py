"""The safe PyTorch zip reader: identical arrays to torch.load, no pickle code ever run, clear errors on bad files."""

from __future__ import annotations

import builtins
import io
import json
import mmap
import os
import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from chatglm.convert.checkpoint import Checkpoint
from chatglm.convert.pipeline import convert
from chatglm.convert.torch_file import TorchFile
from chatglm.devtools.checkpoints import read_published_state
from chatglm.errors import InputError

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """What the reader's load() promises: floats as float32, integers and bools as they are."""
    t = t.detach()
    return t.float().numpy() if t.is_floating_point() else t.numpy()


def every_kind_of_tensor() -> OrderedDict:
    gen = torch.Generator().manual_seed(0)
    sd: OrderedDict = OrderedDict()
    for dtype in DTYPES:
        base = torch.randn(5, 7, generator=gen) * 50
        sd[f"t.{dtype}"] = base.to(dtype)
    whole = torch.randn(6, 8, generator=gen)
    sd["view.transposed"] = whole.t()  # non-contiguous: strides (1, 8)
    sd["view.rows"] = whole[2:5]  # shares the storage, at an offset
    sd["view.every_other"] = whole[:, ::2]
    sd["scalar"] = torch.tensor(3.5)
    sd["empty"] = torch.zeros(0, 4)
    sd["param"] = torch.nn.Parameter(torch.randn(3, generator=gen))
    sd["bf16.specials"] = torch.tensor([float("inf"), -0.0, 1e-40, 3.0e38], dtype=torch.bfloat16)
    return sd


def test_reader_equals_torch_load_for_every_dtype_and_layout(tmp_path):
    path = tmp_path / "all.bin"
    torch.save(every_kind_of_tensor(), path)
    expected = torch.load(path, weights_only=True)
    f = TorchFile(path)
    assert list(f.infos()) == list(expected)
    for name, tensor in expected.items():
        got = f.load(name)
        info = f.infos()[name]
        assert info.shape == tuple(tensor.shape), name
        assert got.dtype == as_numpy(tensor).dtype, name
        np.testing.assert_array_equal(got, as_numpy(tensor), err_msg=name)
    assert f.infos()["t.torch.bfloat16"].dtype == "BF16" and f.infos()["t.torch.int8"].dtype == "I8"


def test_tensors_are_views_of_the_mapped_file_not_copies(tmp_path):
    path = tmp_path / "m.bin"
    torch.save({"w": torch.arange(4096, dtype=torch.float16).reshape(64, 64)}, path)
    f = TorchFile(path)
    raw = f.raw("w")
    assert not raw.flags.owndata and not raw.flags.writeable
    assert raw.dtype == np.float16 and raw.shape == (64, 64)
    base = raw
    while not isinstance(base, memoryview):
        base = base.base  # ndarray views (and numpy's stride-tricks wrapper) down to the buffer
    assert isinstance(base.obj, mmap.mmap)
    # The info's offset points at the tensor's bytes in the file itself.
    info = f.infos()["w"]
    assert path.read_bytes()[info.offset : info.offset + info.nbytes] == raw.tobytes()


def test_module_state_dict_with_metadata_loads(tmp_path):
    lin = torch.nn.Linear(4, 3)
    torch.save(lin.state_dict(), tmp_path / "lin.bin")  # an OrderedDict carrying a _metadata attribute
    f = TorchFile(tmp_path / "lin.bin")
    np.testing.assert_array_equal(f.load("weight"), lin.weight.detach().numpy())
    np.testing.assert_array_equal(f.load("bias"), lin.bias.detach().numpy())


# ------------------------------------------------------------------------------------------- hostile pickles


def torch_zip(path: Path, data_pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A zip laid out as torch writes it, around a hand-made data.pkl."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data_pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return path


class CallsSystem:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class CallsEval:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.eval, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class Unexpected:
    """An ordinary class whose reconstruction has a side effect (as any class's __init__ may)."""

    marker: str

    def __init__(self, marker: str):
        Path(marker).write_text("ran")

    def __reduce__(self):
        return Unexpected, (self.marker,)


@pytest.mark.parametrize("payload, refused",
                         [(CallsSystem, r"posix\.system"), (CallsEval, r"(__builtin__|builtins)\.eval")])
def test_code_calling_pickles_are_refused_and_never_run(tmp_path, payload, refused):
    marker = tmp_path / "ran"
    data = pickle.dumps({"w": payload(marker)}, protocol=2)
    path = torch_zip(tmp_path / "evil.bin", data)
    with pytest.raises(InputError, match=f"refusing to load: data.pkl calls {refused}") as err:
        TorchFile(path)
    assert "nothing was executed" in str(err.value)
    assert not marker.exists()
    pickle.loads(data)  # the same bytes through plain pickle do run: the payload above was live
    assert marker.exists()


def test_reduce_on_an_unexpected_class_inside_a_real_torch_save_is_refused(tmp_path):
    marker = tmp_path / "ran"
    obj = Unexpected.__new__(Unexpected)  # built without __init__: nothing written yet
    obj.marker = str(marker)
    path = tmp_path / "mixed.bin"
    torch.save({"w": torch.ones(2), "extra": obj}, path)
    assert not marker.exists()
    with pytest.raises(InputError, match=r"data.pkl calls test_torch_file\.Unexpected"):
        TorchFile(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # an unrestricted load does run it
    assert marker.exists()


def test_refused_global_hidden_in_stack_global_protocol_4(tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps([CallsSystem(marker)], protocol=4)  # STACK_GLOBAL instead of GLOBAL
    with pytest.raises(InputError, match="data.pkl calls posix.system"):
        TorchFile(torch_zip(tmp_path / "p4.bin", data))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------- bad inputs


def rewrite_zip(src: Path, dst: Path, drop: str = "", shorten: str = "") -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(drop) and drop:
                continue
            if info.filename.endswith(shorten) and shorten:
                data = data[: len(data) // 2]
            zout.writestr(info.filename, data)
    return dst


@pytest.fixture()
def good_bin(tmp_path) -> Path:
    path = tmp_path / "good.bin"
    torch.save({"a": torch.randn(16, 16), "b": torch.randn(8)}, path)
    return path


def test_truncated_zip_is_refused(tmp_path, good_bin):
    cut = tmp_path / "cut.bin"
    cut.write_bytes(good_bin.read_bytes()[: good_bin.stat().st_size // 2])
    with pytest.raises(InputError, match="no central directory \\(truncated download\\?\\)"):
        TorchFile(cut)


def test_missing_storage_is_named(tmp_path, good_bin):
    path = rewrite_zip(good_bin, tmp_path / "nostorage.bin", drop="/data/1")
    with pytest.raises(InputError, match="tensor 'b' refers to storage '1', which the archive lacks"):
        TorchFile(path)


def test_storage_shorter_than_its_tensor_is_refused(tmp_path, good_bin):
    path = rewrite_zip(good_bin, tmp_path / "short.bin", shorten="/data/0")
    with pytest.raises(InputError, match=r"tensor 'a' \(shape \[16, 16\], offset 0\) runs past its storage '0'"):
        TorchFile(path)


def test_expanded_view_larger_than_its_storage_is_refused(tmp_path):
    torch.save({"e": torch.ones(1, 4).expand(1000, 4)}, tmp_path / "e.bin")  # stride (0, 1): 4000 elements from 4
    with pytest.raises(InputError, match=r"tensor 'e' \(shape \[1000, 4\], stride \[0, 1\]\) has more elements"):
        TorchFile(tmp_path / "e.bin")


def test_legacy_torch_file_says_how_to_resave(tmp_path):
    path = tmp_path / "legacy.bin"
    torch.save({"a": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match="legacy \\(non-zip\\) PyTorch serialization format") as err:
        TorchFile(path)
    assert "torch.save(torch.load(" in str(err.value) and str(path) in str(err.value)


def test_other_files_and_non_state_dicts_are_refused(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"hello world" * 10)
    with pytest.raises(InputError, match="not a PyTorch checkpoint"):
        TorchFile(junk)
    path = tmp_path / "list.bin"
    torch.save([torch.ones(2)], path)
    with pytest.raises(InputError, match="data.pkl holds a list, not a dict of tensors"):
        TorchFile(path)
    path = tmp_path / "nested.bin"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(InputError, match="entry 'model' is a dict, not a tensor"):
        TorchFile(path)


def test_bad_storage_reference_in_pickle_is_corrupt(tmp_path):
    class Pid:
        def __reduce__(self):
            return OrderedDict, ()

    buf = io.BytesIO()
    p = pickle.Pickler(buf, protocol=2)
    p.persistent_id = lambda obj: ("storage", "not a storage type", "0", "cpu", 4) if isinstance(obj, Pid) else None
    p.dump({"w": Pid()})
    with pytest.raises(InputError, match="corrupt PyTorch checkpoint: data.pkl cannot be read"):
        TorchFile(torch_zip(tmp_path / "pid.bin", buf.getvalue()))


# ------------------------------------------------------------------------------------- checkpoints and GGUF


def save_bin_shards(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        fname = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        group = names[k * per : (k + 1) * per]
        torch.save({n: state[n] for n in group}, folder / fname)
        weight_map.update({n: fname for n in group})
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def bin_twin(safetensors_ckpt: Path, dest: Path, shards: int) -> Path:
    """The same checkpoint with its weights as .bin shards instead of safetensors."""
    dest.mkdir(parents=True)
    for p in safetensors_ckpt.iterdir():
        if "safetensors" not in p.name:
            (dest / p.name).write_bytes(p.read_bytes())
    save_bin_shards(read_published_state(safetensors_ckpt), dest, shards)
    return dest


@pytest.mark.parametrize("dtype, qtype", [("bfloat16", "f16"), ("float16", "q8_0"), ("float32", "f32")])
def test_gguf_from_bin_equals_gguf_from_safetensors(workdir, sp_model, tmp_path, dtype, qtype):
    from conftest import make_tiny

    tiny = make_tiny(workdir, sp_model, "chatglm3", seed=3, dtype=dtype)
    twin = bin_twin(tiny.ckpt, tmp_path / "bin" / tiny.ckpt.name, shards=3)  # same folder name: same general.name
    with Checkpoint(twin) as ck:
        assert {ck.file_of(n).suffix for n in ck.names()} == {".bin"}
        assert len({ck.file_of(n) for n in ck.names()}) == 3
    a = convert(tiny.ckpt, tmp_path / "from-safetensors.gguf", qtype)
    b = convert(twin, tmp_path / "from-bin.gguf", qtype)
    assert a.n_tensors == b.n_tensors > 0
    assert a.path.read_bytes() == b.path.read_bytes()


def test_single_pytorch_model_bin_is_found(workdir, sp_model, glm3, tmp_path):
    dest = tmp_path / "single"
    dest.mkdir()
    for p in glm3.ckpt.iterdir():
        if "safetensors" not in p.name:
            (dest / p.name).write_bytes(p.read_bytes())
    state = read_published_state(glm3.ckpt)
    torch.save(state, dest / "pytorch_model.bin")
    with Checkpoint(dest) as ck:
        assert sorted(ck.names()) == sorted(state)
        for name in ("transformer.output_layer.weight", "transformer.rotary_pos_emb.inv_freq"):
            np.testing.assert_array_equal(ck.load(name), state[name].numpy())

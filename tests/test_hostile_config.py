"""Hostile config.json, generation_config.json, adapter_config.json and imatrix files (issue 16, converter side).

Every input is generated here from the tiny fixtures. Each case asserts the promise through ``chatglm convert`` (or
``chatglm lora``): exit 2, one ``error:`` line naming the file and the problem, no traceback, nothing at the
destination, the sources byte-identical.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest

from chatglm.convert.gguf_writer import CheckedWriter, value_problem
from chatglm.convert.imatrix import write_legacy
from chatglm.convert.safe_regex import compile_pattern
from chatglm.errors import InputError
from fixtures_glm1 import glm1, glm1_dir, ice_model  # noqa: F401  (fixtures)
from tests.hostile import assert_refused, cli, digest
from tests.test_lora import module_shapes, pick, write_adapter

import gguf


def edited(src: Path, root: Path, name: str = "config.json", **changes) -> Path:
    """A copy of checkpoint ``src`` whose JSON file ``name`` has ``changes`` applied (a value of ... deletes)."""
    folder = root / "ckpt"
    shutil.copytree(src, folder)
    path = folder / name
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return folder


def refused_convert(folder: Path, tmp_path: Path, problem: str, names: str = "config.json", *extra: str,
                    isolated: bool = False) -> None:
    dest = tmp_path / "out.gguf"
    sources = digest([folder])
    outcome = cli(["convert", folder, "-o", dest, "-t", "f32", *extra], isolated=isolated, timeout=60)
    assert_refused(outcome, names, problem=problem, dest=dest, sources=sources)


# ----------------------------------------------------------------------------------------------- bullet 1: counts


@pytest.mark.parametrize("key, value, problem", [
    ("num_layers", 10**9, "'num_layers' is 1000000000 but the checkpoint holds 2 layers"),
    ("num_layers", 3, "'num_layers' is 3 but the checkpoint holds 2 layers"),
    ("padded_vocab_size", 10**9, "'padded_vocab_size' is 1000000000 but the checkpoint's "
                                 "transformer.embedding.word_embeddings.weight has"),
    ("hidden_size", 4096, "'hidden_size' is 4096 but the checkpoint's transformer.embedding.word_embeddings.weight "
                          "has 64 columns"),
    ("num_attention_heads", 1000, "'num_attention_heads' is 1000, more than 64"),
    ("kv_channels", 8, "num_attention_heads x kv_channels must equal hidden_size"),
])
def test_declared_counts_are_bounded_by_the_files(glm3, tmp_path, key, value, problem):
    # num_layers 10**9 once built a plan of 10**9 layers before any check: run it in a child with a timeout.
    refused_convert(edited(glm3.ckpt, tmp_path, **{key: value}), tmp_path, problem, isolated=key == "num_layers")


def test_huge_layer_count_is_refused_quickly(glm3, tmp_path):
    folder = edited(glm3.ckpt, tmp_path, num_layers=10**9)
    start = time.perf_counter()
    refused_convert(folder, tmp_path, "holds 2 layers")
    assert time.perf_counter() - start < 5


# ----------------------------------------------------------------------------------------------- bullet 3: GGUF ranges


@pytest.mark.parametrize("key, value, problem", [
    ("padded_vocab_size", 2**40, "'padded_vocab_size' is 1099511627776, more than 4,294,967,295"),
    ("seq_length", 2**32, "'seq_length' is 4294967296, more than 4,294,967,295"),
    ("seq_length", -1, "'seq_length' must be an integer >= 1, got -1"),
    ("rope_ratio", 1e39, "'rope_ratio' is 1e+39, more than 3.40282e+38"),
    ("rope_ratio", 1e36, "'rope_ratio' 1e+36 gives a rope base of 1e+40, more than a float32 holds"),
    ("rope_ratio", float("inf"), "not valid config.json: Infinity is not a JSON number"),
    ("layernorm_epsilon", float("nan"), "not valid config.json: NaN is not a JSON number"),
    ("layernorm_epsilon", 1e30, "'layernorm_epsilon' is 1e+30, more than 1"),
    ("ffn_hidden_size", 2**31, "'ffn_hidden_size' is 2147483648, more than 2,147,483,647"),
    ("seq_length", 10**400, "not valid config.json: an integer of 401 digits is out of range"),
])
def test_values_that_overflow_their_gguf_type(glm3, tmp_path, key, value, problem):
    folder = edited(glm3.ckpt, tmp_path)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg[key] = value
    path.write_text(json.dumps(cfg))  # json writes inf/nan as Infinity/NaN, which our strict reader refuses
    refused_convert(folder, tmp_path, problem)


@pytest.mark.parametrize("value, vtype, problem", [
    (2**40, gguf.GGUFValueType.UINT32, "outside the uint32 range"),
    (-1, gguf.GGUFValueType.UINT32, "outside the uint32 range"),
    (True, gguf.GGUFValueType.UINT32, "not an integer"),
    (1e40, gguf.GGUFValueType.FLOAT32, "more than a float32 holds"),
    (float("nan"), gguf.GGUFValueType.FLOAT32, "not a finite number"),
    (10**400, gguf.GGUFValueType.FLOAT32, "too large for any float"),
    ("x\ud800", gguf.GGUFValueType.STRING, "lone surrogate"),
    ([1, "a"], gguf.GGUFValueType.ARRAY, "mixes item types"),
    ([1, 2**31], gguf.GGUFValueType.ARRAY, "item 1 is 2147483648, outside the int32 range"),
    ([1.0, 1e39], gguf.GGUFValueType.ARRAY, "item 1 is 1e+39, more than a float32 holds"),
    ([], gguf.GGUFValueType.ARRAY, "not a non-empty list"),
])
def test_checked_writer_refuses_what_gguf_cannot_hold(tmp_path, value, vtype, problem):
    assert problem in value_problem(value, vtype)
    w = CheckedWriter(tmp_path / "x.gguf", "chatglm", tmp_path / "config.json")
    with pytest.raises(InputError) as exc:
        w.add_key_value("chatglm.some_key", value, vtype)
    assert str(exc.value).startswith(f"{tmp_path / 'config.json'}: the value for GGUF key chatglm.some_key")
    assert value_problem(7, gguf.GGUFValueType.UINT32) is None
    assert value_problem([0.5, -1.0], gguf.GGUFValueType.ARRAY) is None


def test_a_numpy_array_packs_whole_as_the_list_would(tmp_path):
    """A large metadata array (a P-Tuning prefix) is packed in one piece: the file equals the item-by-item one; a
    NaN, a wrong dtype, a nested array or an item type it does not pack whole is refused the same way."""
    values = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    files = []
    for i, val in enumerate([values.tolist(), values]):
        w = CheckedWriter(tmp_path / f"{i}.gguf", "chatglm", tmp_path / "config.json")
        w.add_key_value("chatglm.prefix", val, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.FLOAT32)
        w.add_key_value("chatglm.bits", np.arange(5, dtype=np.uint16) if i else list(range(5)),
                        gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        files.append((tmp_path / f"{i}.gguf").read_bytes())
    assert files[0] == files[1]
    read = gguf.GGUFReader(tmp_path / "1.gguf").fields["chatglm.prefix"]
    assert np.array_equal(np.concatenate([read.parts[j] for j in read.data]), values)
    w = CheckedWriter(tmp_path / "x.gguf", "chatglm", tmp_path / "config.json")
    bad = values.copy()
    bad[7] = np.nan
    for val, sub, problem in [(bad, gguf.GGUFValueType.FLOAT32, "item 7 is not a finite number"),
                              (values.astype(np.float64), gguf.GGUFValueType.FLOAT32, "float64 array, not float32"),
                              (values.reshape(10, 100), gguf.GGUFValueType.FLOAT32, "not a non-empty flat array"),
                              (values, gguf.GGUFValueType.STRING, "does not pack whole")]:
        with pytest.raises(InputError, match=problem):
            w.add_key_value("chatglm.prefix", val, gguf.GGUFValueType.ARRAY, sub)


# ----------------------------------------------------------------------------------------------- bullet 4: JSON types


@pytest.mark.parametrize("key, value, problem", [
    ("architectures", "ChatGLMModel", "'architectures' must be a list of strings or null, got 'ChatGLMModel'"),
    ("architectures", [1], "'architectures' must be a list of strings"),
    ("architectures", {"a": 1}, "'architectures' must be a list of strings"),
    ("model_type", ["chatglm"], "'model_type' must be a string or null"),
    ("eos_token_id", "2", "'eos_token_id' must be a token id"),
    ("eos_token_id", [2, "x"], "'eos_token_id' must be a token id"),
    ("eos_token_id", True, "'eos_token_id' must be a token id"),
    ("rope_scaling", [1, 2], "'rope_scaling' must be an object or null"),
    ("hidden_size", "64", "'hidden_size' must be an integer >= 1, got '64'"),
    ("hidden_size", True, "'hidden_size' must be an integer >= 1, got True"),
    ("hidden_size", 64.0, "'hidden_size' must be an integer >= 1, got 64.0"),
    ("num_layers", [2], "'num_layers' must be an integer >= 1, got [2]"),
    ("num_layers", None, "config.json has no 'num_layers'"),
    ("multi_query_attention", "yes", "'multi_query_attention' must be true or false, got 'yes'"),
    ("add_qkv_bias", 1, "'add_qkv_bias' must be true or false, got 1"),
    ("rmsnorm", 1, "rmsnorm=1 is not supported"),
    ("rope_ratio", "1.0", "'rope_ratio' must be a positive number, got '1.0'"),
    ("rope_scaling", {"type": "banana"}, "rope_scaling type 'banana' is not supported"),
])
def test_config_fields_of_the_wrong_type(glm3, tmp_path, key, value, problem):
    refused_convert(edited(glm3.ckpt, tmp_path, **{key: value}), tmp_path, problem)


@pytest.mark.parametrize("text, problem", [
    ("[1, 2]", "config.json is not a JSON object"),
    ('{"hidden_size": ' + "9" * 5000 + "}", "not valid config.json"),
])
def test_config_json_that_is_not_an_object(glm3, tmp_path, text, problem):
    folder = edited(glm3.ckpt, tmp_path)
    (folder / "config.json").write_text(text)
    refused_convert(folder, tmp_path, problem)


@pytest.mark.parametrize("key, value, problem", [
    ("eos_token_id", {"id": 2}, "'eos_token_id' must be a token id"),
    ("eos_token_id", [], "'eos_token_id' must be a token id"),
    ("max_length", "8192", "'max_length' must be an integer or null"),
    ("do_sample", 1, "'do_sample' must be true or false"),
])
def test_generation_config_fields_of_the_wrong_type(glm3, tmp_path, key, value, problem):
    folder = edited(glm3.ckpt, tmp_path, "generation_config.json", **{key: value})
    refused_convert(folder, tmp_path, problem, "generation_config.json")


# ----------------------------------------------------------------------------------------------- adapters


@pytest.fixture()
def adapter(glm3, tmp_path):
    folder = tmp_path / "adapter"
    write_adapter(folder, pick(module_shapes(glm3.model), "query_key_value"), r=4)
    return folder


def set_adapter(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("changes, problem", [
    ({"target_modules": 5}, "'target_modules' must be a string, a list of strings or null, got 5"),
    ({"target_modules": [["query_key_value"]]}, "'target_modules' must be a string, a list of strings"),
    ({"r": "4"}, "r must be a positive integer, got '4'"),
    ({"r": True}, "r must be a positive integer, got True"),
    ({"lora_alpha": None}, "lora_alpha must be a positive number, got None"),
    ({"lora_alpha": 10**400}, "not valid adapter_config.json: an integer of 401 digits is out of range"),
    ({"use_rslora": "yes"}, "'use_rslora' must be true or false"),
    ({"peft_type": ["LORA"]}, "'peft_type' must be a string"),
    ({"rank_pattern": ["query_key_value"]}, "'rank_pattern' must be an object of module pattern -> number"),
    ({"rank_pattern": {"query_key_value": 2.5}}, "rank_pattern: the value for 'query_key_value' must be a positive "
                                                 "integer, got 2.5"),
    ({"alpha_pattern": {"query_key_value": "8"}}, "'alpha_pattern' must be an object of module pattern -> number"),
    ({"modules_to_save": "lm_head"}, "'modules_to_save' must be a list of strings or null"),
])
def test_adapter_config_fields_of_the_wrong_type(glm3, tmp_path, adapter, changes, problem):
    set_adapter(adapter, **changes)
    dest = tmp_path / "out.gguf"
    sources = digest([glm3.ckpt, adapter])
    outcome = cli(["convert", glm3.ckpt, "-o", dest, "-t", "f32", "--lora", adapter])
    assert_refused(outcome, "adapter_config.json", problem=problem, dest=dest, sources=sources)


# ----------------------------------------------------------------------------------------------- bullet 5: regexes

CATASTROPHIC = ["(a+)+$", "(a*)*b", "(a|aa)+$", "(a|a?)+$", "(.*a){12}", "(\\w+\\.)*query_key_value",
                "(?:x+x+)+y", ".*.*.*.*.*x", "(a)\\1", "(?P<n>a)(?P=n)", "a" * 1001]
ISOLATED = ("(a+)+$", "(a|aa)+$")  # these two once hung the process: run in a child with a timeout


@pytest.mark.parametrize("pattern", CATASTROPHIC, ids=[p[:20] for p in CATASTROPHIC])
def test_catastrophic_target_modules_patterns_are_refused_fast(glm3, tmp_path, adapter, pattern):
    set_adapter(adapter, target_modules=pattern)
    dest = tmp_path / "out.gguf"
    sources = digest([glm3.ckpt, adapter])
    start = time.perf_counter()
    outcome = cli(["convert", glm3.ckpt, "-o", dest, "-t", "f32", "--lora", adapter], isolated=pattern in ISOLATED,
                  timeout=30)
    assert_refused(outcome, "adapter_config.json", problem="target_modules: pattern", dest=dest, sources=sources)
    assert time.perf_counter() - start < 20  # a child process start included; the check itself is instant


@pytest.mark.parametrize("pattern", CATASTROPHIC[::3], ids=[p[:20] for p in CATASTROPHIC[::3]])
def test_rank_pattern_keys_are_checked_too(glm3, tmp_path, adapter, pattern):
    set_adapter(adapter, rank_pattern={pattern: 4})
    dest = tmp_path / "out.gguf"
    outcome = cli(["convert", glm3.ckpt, "-o", dest, "-t", "f32", "--lora", adapter])
    assert_refused(outcome, "adapter_config.json", problem="rank_pattern: pattern", dest=dest)


def test_safe_patterns_match_long_names_in_well_under_a_second():
    names = ["a" * 199, "transformer.encoder.layers.1.self_attention.query_key_value" + "a" * 100, "x." * 99]
    patterns = [r".*\.(query_key_value|dense)$", r"^(?!.*vision).*\.(q_proj|v_proj)", r".*a.*a.*b",
                r"transformer\.encoder\.layers\.\d+\.mlp\..*", r"(?:query|key)_value"]
    start = time.perf_counter()
    for p in patterns:
        rx = compile_pattern(p, "target_modules", Path("adapter_config.json"))
        for name in names * 20:
            rx.fullmatch(name)
    assert time.perf_counter() - start < 0.5
    for bad in CATASTROPHIC:
        start = time.perf_counter()
        with pytest.raises(InputError, match="target_modules: pattern"):
            compile_pattern(bad, "target_modules", Path("adapter_config.json"))
        assert time.perf_counter() - start < 0.01


def test_a_module_name_longer_than_any_models_is_refused(glm3, tmp_path):
    folder = tmp_path / "adapter"
    write_adapter(folder, {"transformer." + "x" * 300 + ".dense": (64, 64)}, r=4, target_modules=".*dense")
    dest = tmp_path / "out.gguf"
    outcome = cli(["convert", glm3.ckpt, "-o", dest, "-t", "f32", "--lora", folder])
    assert_refused(outcome, "adapter_config.json", problem="module name of 318 characters", dest=dest)


def test_runtime_adapter_with_a_catastrophic_pattern(glm3, tmp_path, adapter):
    set_adapter(adapter, target_modules="(a+)+$")
    dest = tmp_path / "a.gguf"
    outcome = cli(["lora", glm3.ckpt, adapter, "-o", dest])
    assert_refused(outcome, "adapter_config.json", problem="catastrophic backtracking", dest=dest)


# ----------------------------------------------------------------------------------------------- bullet 6: imatrix


def gguf_bytes(kv: list[tuple[str, int, bytes]], tensors: list[tuple[str, list[int], int]], data: bytes = b"",
               n_tensors: int | None = None, n_kv: int | None = None) -> bytes:
    """A GGUF v3 file from raw parts: kv entries (key, type, packed value), tensor infos (name, dims, offset)."""
    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s.encode())) + s.encode()

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                len(kv) if n_kv is None else n_kv)
    for key, vtype, packed in kv:
        out += string(key) + struct.pack("<I", vtype) + packed
    for name, dims, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", 0, offset)  # type 0 = f32
    out += bytes(-len(out) % 32)
    return out + data


def imatrix_kv(chunks: int = 1) -> list[tuple[str, int, bytes]]:
    datasets = struct.pack("<IQ", 8, 1) + struct.pack("<Q", 4) + b"wiki"
    return [("imatrix.datasets", 9, datasets), ("imatrix.chunk_count", 4, struct.pack("<I", chunks)),
            ("imatrix.chunk_size", 4, struct.pack("<I", 512))]


IMATRIX_GGUF_CASES = {
    "tensor count 2**60": (lambda: gguf_bytes(imatrix_kv(), [], n_tensors=2**60),
                           "more than the file can hold"),
    "key count 2**62": (lambda: gguf_bytes(imatrix_kv(), [], n_kv=2**62), "more than the file can hold"),
    "array of 2**60 strings": (lambda: gguf_bytes([("imatrix.datasets", 9, struct.pack("<IQ", 8, 2**60))], []),
                               "claims 1152921504606846976 items"),
    "tensor dims beyond the file": (lambda: gguf_bytes(imatrix_kv(), [("blk.0.attn_qkv.weight.in_sum2", [2**40], 0)]),
                                    "runs past the end of the file"),
    "duplicate entry": (lambda: gguf_bytes(imatrix_kv(), [("blk.0.attn_qkv.weight.in_sum2", [64], 0),
                                                          ("blk.0.attn_qkv.weight.in_sum2", [64], 256)],
                                           bytes(512)),
                        "duplicate tensor name 'blk.0.attn_qkv.weight.in_sum2'"),
    "chunk count of the wrong type": (lambda: gguf_bytes(imatrix_kv()[:1] + [
        ("imatrix.chunk_count", 8, struct.pack("<Q", 1) + b"x"), imatrix_kv()[2]], []),
        "imatrix.chunk_count must be a non-negative integer"),
}


@pytest.mark.parametrize("case", list(IMATRIX_GGUF_CASES))
def test_hostile_imatrix_gguf(glm3, tmp_path, case):
    make, problem = IMATRIX_GGUF_CASES[case]
    bad = tmp_path / "bad.imatrix.gguf"
    bad.write_bytes(make())
    dest = tmp_path / "out.gguf"
    sources = digest([glm3.ckpt, bad])
    isolated = case in ("tensor count 2**60", "array of 2**60 strings")  # gguf-py's reader once ran away on these
    outcome = cli(["convert", glm3.ckpt, "-o", dest, "-t", "q8_0", "--imatrix", bad], isolated=isolated, timeout=60)
    assert_refused(outcome, bad, problem=problem, dest=dest, sources=sources)


def legacy_bytes(entries: list[tuple[str, int, int, bytes]], n_entries: int | None = None) -> bytes:
    """A legacy .dat imatrix from raw parts: (name, ncall, declared value count, value bytes) per entry."""
    out = struct.pack("<i", len(entries) if n_entries is None else n_entries)
    for name, ncall, count, values in entries:
        out += struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, count) + values
    return out


LEGACY_CASES = {
    "entry count 2**31-1": (legacy_bytes([("blk.0.attn_qkv.weight", 1, 1, bytes(4))], n_entries=2**31 - 1),
                            "truncated imatrix"),
    "value count 2**31-1": (legacy_bytes([("blk.0.attn_qkv.weight", 1, 2**31 - 1, bytes(4))]),
                            "truncated imatrix: blk.0.attn_qkv.weight values"),
    "negative value count": (legacy_bytes([("blk.0.attn_qkv.weight", 1, -3, b"")]), "has -3 values"),
    "name length 2**31-1": (struct.pack("<ii", 1, 2**31 - 1), "name length of 2147483647"),
}


@pytest.mark.parametrize("case", list(LEGACY_CASES))
def test_hostile_legacy_imatrix(glm3, tmp_path, case):
    raw, problem = LEGACY_CASES[case]
    bad = tmp_path / "bad.dat"
    bad.write_bytes(raw)
    dest = tmp_path / "out.gguf"
    outcome = cli(["convert", glm3.ckpt, "-o", dest, "-t", "q8_0", "--imatrix", bad])
    assert_refused(outcome, bad, problem=problem, dest=dest, sources=digest([bad]))


def test_legacy_imatrix_with_duplicate_entries(glm3, tmp_path):
    bad = tmp_path / "dup.dat"
    entry = ("blk.0.attn_qkv.weight", 1, 64, np.ones(64, dtype="<f4").tobytes())
    bad.write_bytes(legacy_bytes([entry, entry]))
    dest = tmp_path / "out.gguf"
    outcome = cli(["convert", glm3.ckpt, "-o", dest, "-t", "q8_0", "--imatrix", bad])
    assert_refused(outcome, bad, problem="imatrix has two entries for blk.0.attn_qkv.weight", dest=dest)


def test_valid_legacy_imatrix_still_reads(tmp_path):
    from chatglm.convert.imatrix import load_imatrix

    path = tmp_path / "ok.dat"
    write_legacy(path, {"blk.0.attn_qkv.weight": (2, np.full(64, 4.0, dtype=np.float32))}, 3, "wiki")
    matrix = load_imatrix(path)
    assert math.isclose(float(matrix.entries["blk.0.attn_qkv.weight"][0]), 2.0)


# ----------------------------------------------------------------------------------------------- GLM-4 families


@pytest.fixture(scope="module")
def glm4_folders(tmp_path_factory):
    from chatglm.devtools.glm4 import build_checkpoint, train_glm4_bpe

    tok = train_glm4_bpe()
    root = tmp_path_factory.mktemp("hostile-glm4")
    return {layout: build_checkpoint(layout, root / layout, tok)[1] for layout in ("glm45", "glm4-0414")}


@pytest.mark.parametrize("layout, key, value, problem", [
    ("glm45", "num_hidden_layers", 10**9, "'num_hidden_layers' is 1000000000 (+ 'num_nextn_predict_layers' 1) but "
                                          "the checkpoint holds 4 layers"),
    ("glm45", "num_nextn_predict_layers", 10**9, "(+ 'num_nextn_predict_layers' 1000000000) but the checkpoint "
                                                 "holds 4 layers"),
    ("glm45", "n_routed_experts", 2000, "'n_routed_experts' is 2000, more than 1,024"),
    ("glm45", "n_routed_experts", 100, "'n_routed_experts' is 100 but the checkpoint holds 8 experts per layer"),
    ("glm45", "num_experts_per_tok", 0, "'num_experts_per_tok' must be an integer >= 1, got 0"),
    ("glm45", "num_experts_per_tok", 9, "num_experts_per_tok=9 > n_routed_experts=8"),
    ("glm45", "n_group", True, "grouped expert routing (n_group=True)"),
    ("glm45", "norm_topk_prob", "yes", "'norm_topk_prob' must be true or false"),
    ("glm45", "first_k_dense_replace", 3, "3 leading dense layers (first_k_dense_replace, mlp_layer_types) leave no expert layer of 3"),
    ("glm45", "rope_scaling", {"rope_type": "banana", "factor": 4.0}, "rope type 'banana' is not supported"),
    ("glm45", "rope_scaling", {"type": ["yarn"]}, "rope type ['yarn'] is not supported"),
    ("glm4-0414", "rope_theta", 1e40, "'rope_theta' must be a positive number (at most 3.40282e+38), got 1e+40"),
    ("glm4-0414", "partial_rotary_factor", 2, "'partial_rotary_factor' must be a positive number (at most 1)"),
    ("glm4-0414", "num_key_value_heads", 64, "'num_key_value_heads' is 64, more than 4"),
    ("glm4-0414", "vocab_size", 2**33, "'vocab_size' is 8589934592, more than 4,294,967,295"),
    ("glm4-0414", "vocab_size", 10**6, "'vocab_size' is 1000000 but the checkpoint's model.embed_tokens.weight has"),
    ("glm4-0414", "rms_norm_eps", -1e-5, "'rms_norm_eps' must be a positive number"),
    ("glm4-0414", "tie_word_embeddings", "false", "'tie_word_embeddings' must be true or false"),
])
def test_glm4_family_configs(glm4_folders, tmp_path, layout, key, value, problem):
    refused_convert(edited(glm4_folders[layout], tmp_path, **{key: value}), tmp_path, problem)


@pytest.mark.parametrize("key, value, problem", [
    ("num_layers", 10**9, "'num_layers' is 1000000000 but the checkpoint holds 28 layers"),
    ("vocab_size", 2**32, "'vocab_size' is 4294967296, more than 4,294,967,295"),
    ("hidden_size", 128, "'hidden_size' is 128 but the checkpoint's transformer.word_embeddings.weight has 64 "
                         "columns"),
    ("layernorm_epsilon", 2.0, "'layernorm_epsilon' is 2.0, more than 1"),
    ("position_encoding_2d", 1, "position_encoding_2d=1 is not supported"),
    ("eos_token_id", "eop", "'eos_token_id' must be a token id"),
])
def test_chatglm1_configs(glm1, tmp_path, key, value, problem):
    refused_convert(edited(glm1.ckpt, tmp_path, **{key: value}), tmp_path, problem)


def test_more_layers_than_llama_cpp_allows(glm3, tmp_path):
    """A checkpoint that really holds 600 layers (one tiny tensor each) is refused before anything else is read."""
    from safetensors.numpy import save_file

    folder = tmp_path / "ckpt"
    folder.mkdir()
    for name in ("config.json", "tokenizer.model", "tokenizer_config.json"):
        if (glm3.ckpt / name).exists():
            shutil.copy(glm3.ckpt / name, folder / name)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "num_layers": 600}))
    tensors = {f"transformer.encoder.layers.{i}.input_layernorm.weight": np.ones(1, np.float32) for i in range(600)}
    save_file(tensors, str(folder / "model.safetensors"))
    refused_convert(folder, tmp_path, "'num_layers' is 600, more than llama.cpp's limit of 512 layers")


def test_undecodable_folder_name_becomes_valid_utf8_for_general_name(tmp_path):
    import os

    from chatglm.convert.gguf_writer import display_name

    assert display_name(Path(os.fsdecode(bytes(tmp_path) + b"/ck\xff"))) == "ck\ufffd"


def test_lora_scaling_past_float32(glm3, tmp_path, adapter):
    set_adapter(adapter, lora_alpha=1e40)
    dest = tmp_path / "out.gguf"
    outcome = cli(["convert", glm3.ckpt, "-o", dest, "-t", "f32", "--lora", adapter])
    assert_refused(outcome, "adapter_config.json", problem="gives a scaling of 2.5e+39, more than a float32 holds",
                   dest=dest)


def test_runtime_adapter_that_overflows_f16(glm3, tmp_path, adapter):
    set_adapter(adapter, lora_alpha=1e30)
    dest = tmp_path / "a.gguf"
    outcome = cli(["lora", glm3.ckpt, adapter, "-o", dest, "-t", "f16"])
    assert_refused(outcome, "adapter_model.safetensors", problem="(times the adapter's scaling) holds NaN or values "
                   "too large for float16", dest=dest)

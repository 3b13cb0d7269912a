"""GLM-5.x bad input: one-line errors before any native call, from the converter (config.json against the tensors)
and from the GGUF validator (every glm-dsa constraint llama.cpp's loader or graph asserts on)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chatglm.convert.pipeline import convert
from chatglm.devtools.glm4 import train_glm4_bpe
from chatglm.devtools.glm_moe_dsa import build_dsa_checkpoint
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.gguf_file import ArrayRef, read_header
from chatglm.runtime.loader import open_engine

from hostile import assert_nothing_at, assert_refused, cli
from test_hostile_gguf import write_gguf


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(checkpoint folder, its f32 GGUF)."""
    root = tmp_path_factory.mktemp("dsa-hostile")
    _, folder = build_dsa_checkpoint(root / "ck", train_glm4_bpe(), seed=9)
    return folder, convert(folder, root / "base.gguf", "f32").path


def variant(base, tmp_path: Path, config: dict | None = None, drop: tuple[str, ...] = ()) -> Path:
    """A copy of the base checkpoint with config.json keys changed and tensors left out of its shards."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(base[0], tmp_path / "ck")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(config or {})
    (folder / "config.json").write_text(json.dumps(cfg))
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    for name in drop:
        shard = folder / index["weight_map"].pop(name)
        state = load_file(str(shard))
        del state[name]
        save_file(state, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    return folder


CONFIG_CASES = {
    "index-head-dim-96": ({"index_head_dim": 96}, (), InputError, "'index_head_dim' must be a power of two"),
    "index-head-dim-32": ({"index_head_dim": 32}, (), InputError, "'index_head_dim' must be a power of two"),
    # a multiple of 64 is not enough: llama.cpp's Hadamard matrix is 64 x 64 for 192, GGML_ASSERT(can_mul_mat)
    "index-head-dim-192": ({"index_head_dim": 192}, (), InputError, "'index_head_dim' must be a power of two"),
    "kv-lora-too-big": ({"kv_lora_rank": 40}, (), InputError,
                        "'kv_lora_rank + qk_rope_head_dim' is 48 but the checkpoint's model.layers.0.self_attn"),
    "kv-lora-too-small": ({"kv_lora_rank": 24}, (), InputError,
                          "has shape [40, 64], expected [32, 64] from config.json"),
    "experts-1025": ({"n_routed_experts": 1025}, (), InputError, "'n_routed_experts' is 1025, more than 1,024"),
    "experts-used-9": ({"num_experts_per_tok": 9}, (), InputError, "num_experts_per_tok=9 > n_routed_experts=8"),
    "no-indexer-wk": ({}, ("model.layers.0.self_attn.indexer.wk.weight",), InputError,
                      "checkpoint lacks tensors: model.layers.0.self_attn.indexer.wk.weight"),
    "no-mtp-eh-proj": ({}, ("model.layers.3.eh_proj.weight",), InputError,
                       "checkpoint lacks tensors: model.layers.3.eh_proj.weight"),
    "no-mtp-layer-declared": ({"num_nextn_predict_layers": 0}, (), InputError, "does not know: model.layers.3."),
    "shared-layer-has-indexer": ({"indexer_types": ["full", "shared", "shared"]}, (), InputError,
                                 "does not know: model.layers.2.self_attn.indexer."),
    "full-layer-lacks-indexer": ({"indexer_types": ["full", "full", "full"]}, (), InputError,
                                 "lacks tensors: model.layers.1.self_attn.indexer."),
    "first-layer-shared": ({"indexer_types": ["shared", "shared", "full"]}, (), InputError,
                           "starts with a 'shared' layer"),
    "first-layer-shared-by-schedule": ({"indexer_types": None, "index_topk_freq": 2, "index_skip_topk_offset": 0},
                                       (), InputError, "index_skip_topk_offset' starts with a 'shared' layer"),
    "mlp-types-not-strings": ({"mlp_layer_types": [{"a": 1}, "sparse", "sparse"]}, (), InputError,
                              "'mlp_layer_types' must list 'dense' or 'sparse'"),
    "dense-after-sparse": ({"mlp_layer_types": ["dense", "sparse", "dense"]}, (), UnsupportedModelError,
                           "puts a dense layer after an expert layer"),
    "dense-count-disagrees": ({"first_k_dense_replace": 2}, (), InputError,
                              "first_k_dense_replace=2 disagrees with mlp_layer_types (1 leading"),
    "no-q-lora": ({"q_lora_rank": None}, (), UnsupportedModelError, "q_lora_rank is null"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_converter_refuses(base, tmp_path, case):
    config, drop, error, message = CONFIG_CASES[case]
    folder = variant(base, tmp_path, config, drop)
    with pytest.raises(error) as caught:
        convert(folder, tmp_path / "out.gguf", "f32")
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert_nothing_at(tmp_path / "out.gguf")


def test_cli_refuses_in_one_line(base, tmp_path):
    folder = variant(base, tmp_path, {"index_head_dim": 96})
    out = tmp_path / "out.gguf"
    assert_refused(cli(["convert", folder, "-t", "f32", "-o", out]), "config.json",
                   problem="'index_head_dim' must be a power of two", dest=out)


# -- GGUF side: the converted file with one thing changed --------------------------------------------------------------
def gguf_parts(path: Path) -> tuple[dict, dict]:
    header = read_header(path)
    kv = {k: (header.array(k).tolist() if isinstance(v, ArrayRef) else v) for k, v in header.kv.items()
          if not k.startswith("GGUF.")}
    return kv, {name: tuple(t.shape) for name, t in header.tensors.items()}


A = "glm-dsa"
GGUF_CASES = {
    "indexer-dim-96": ({f"{A}.attention.indexer.key_length": 96}, (), "must be a power of two >= 64"),
    "indexer-dim-192": ({f"{A}.attention.indexer.key_length": 192}, (), "must be a power of two >= 64"),
    "indexer-first-shared": ({f"{A}.attention.indexer.types": [False, True, True]}, (), "marks layer 0 'shared'"),
    "indexer-types-short": ({f"{A}.attention.indexer.types": [True, True]}, (), "one flag per trunk layer (3)"),
    "indexer-missing": ({}, ("blk.2.indexer.attn_q_b.weight",), "lacks tensor(s) blk.2.indexer.attn_q_b.weight"),
    "mtp-missing": ({}, ("blk.3.nextn.enorm.weight",), "lacks tensor(s) blk.3.nextn.enorm.weight"),
    "kv-heads-2": ({f"{A}.attention.head_count_kv": 2}, (), "MLA needs head_count_kv 1"),
    "key-length-wrong": ({f"{A}.attention.kv_lora_rank": 24}, (), "key_length kv_lora_rank + rope"),
    "rope-over-indexer": ({f"{A}.rope.dimension_count": 72, f"{A}.attention.key_length": 104,
                           f"{A}.attention.key_length_mla": 88}, (), "rope.dimension_count 72 is more than"),
    "rope-fills-head": ({f"{A}.rope.dimension_count": 24, f"{A}.attention.key_length": 56}, (),
                        "leaves no non-rope key dimension"),
    "no-mla-key-length": ({f"{A}.attention.key_length_mla": None}, (), "lacks glm-dsa.attention.key_length_mla"),
    "experts-1025": ({f"{A}.expert_count": 1025}, (), "expert_count must be"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_validator_refuses(base, tmp_path, case):
    changes, drop, message = GGUF_CASES[case]
    kv, shapes = gguf_parts(base[1])
    for key, value in changes.items():
        if value is None:
            kv.pop(key)
        else:
            kv[key] = value
    for name in drop:
        del shapes[name]
    path = write_gguf(tmp_path / f"{case}.gguf", kv, shapes)
    with pytest.raises(InputError) as caught:
        open_engine(path, n_ctx=64, n_threads=1)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_unchanged_rewrite_loads(base, tmp_path):
    """The rewriting above keeps a valid file valid (so each refusal is the change's doing)."""
    kv, shapes = gguf_parts(base[1])
    path = write_gguf(tmp_path / "same.gguf", kv, shapes)
    with open_engine(path, n_ctx=64, n_threads=1) as engine:
        assert engine.info.n_vocab == len(kv["tokenizer.ggml.tokens"])


def test_trunk_only_file_loads(base, tmp_path):
    """A file declaring its MTP layer but without its tensors (split off for a draft model) is what llama.cpp's
    loader accepts as trunk-only: validation lets it through and llama.cpp runs it."""
    kv, shapes = gguf_parts(base[1])
    n = kv[f"{A}.block_count"] - 1
    path = write_gguf(tmp_path / "trunk.gguf", kv, {k: v for k, v in shapes.items() if not k.startswith(f"blk.{n}.")})
    with open_engine(path, n_ctx=64, n_threads=1) as engine:
        assert engine.all_logits([1, 2, 3]).shape == (3, len(kv["tokenizer.ggml.tokens"]))


def test_file_of_another_converter_runs(base, tmp_path):
    """Without our glm.* keys (llama.cpp's own converter writes none) the file runs with GLM-4.7's chat format (its family's guess)."""
    kv, shapes = gguf_parts(base[1])
    path = write_gguf(tmp_path / "other.gguf", {k: v for k, v in kv.items() if not k.startswith("glm.")}, shapes)
    with open_engine(path, n_ctx=64, n_threads=1) as engine:
        assert engine.info.chat_format == "glm47"

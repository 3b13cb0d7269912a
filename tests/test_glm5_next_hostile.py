"""GLM-5.3-Flash bad input: one line naming the file and the problem, before any native call.

Converter side: config.json edits and removed tensors of the tiny checkpoint (``chatglm convert``). Runtime side:
GGUF metadata edits of its converted file that would reach llama.cpp's GGML_ASSERTs or loader exceptions
(``chatglm info``, in a child process so that an abort would fail the test instead of killing pytest).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
from safetensors.torch import load_file, save_file

from fixtures_glm5_next import glm5, rewrite_gguf  # noqa: F401  (fixture)
from tests.hostile import assert_refused, cli, digest
from test_hostile_gguf import run_table


def edited(src: Path, root: Path, text: dict | None = None, top: dict | None = None,
           drop: tuple[str, ...] = ()) -> Path:
    """A copy of the checkpoint with ``text_config`` / top-level keys changed (``...`` deletes) and tensors dropped
    from the shards that hold them."""
    folder = root / "ckpt"
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    for where, changes in ((config["text_config"], text or {}), (config, top or {})):
        for key, value in changes.items():
            if value is ...:
                where.pop(key, None)
            else:
                where[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in {index["weight_map"][name] for name in drop}:
        state = load_file(folder / shard)
        save_file({k: v for k, v in state.items() if k not in drop}, str(folder / shard), metadata={"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k not in drop}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


L = "model.language_model.layers."
CONFIG_CASES = {
    "hyper-connections": ({"hc_mult": 2}, (), "hc_mult=2 is not supported"),
    "topk-not-multiple-of-kpool": ({"index_topk": 10}, (), "'index_topk' (10) is not a multiple of index_kpool (4)"),
    "kpool-of-one": ({"index_kpool": 1, "index_topk": 8}, (), "index_kpool=1 is not supported"),
    "layer-kind-vs-tensors": ({"layer_types": ["indexed_attention"] * 2 + ["indexed_attention", "linear_attention"]},
                              (), "layer 0 is 'indexed_attention' in config.json (layer_types) but holds "
                                  "linear-attention (q_proj) attention tensors"),
    "shared-layer-with-indexer-tensors": ({"indexer_types": ["full", "full", "full", "full"]}, (),
                                          "layer 2 should have a full indexer"),
    "first-latent-layer-shared": ({"indexer_types": ["full", "shared", "shared", "full"]}, (),
                                  "the first latent-attention layer (1) has indexer_types 'shared'"),
    "no-tail": ({"index_kpool_always_select_tail": False}, (), "index_kpool_always_select_tail=false is not"),
    "rope-in-latent-attention": ({"qk_rope_head_dim": 8}, (), "qk_rope_head_dim=8 is not supported"),
    "linear-heads-differ": ({"linear_num_heads": 2}, (), "linear_num_heads (2) differs from num_attention_heads"),
    "too-many-experts": ({"n_routed_experts": 2000}, (), "'n_routed_experts' is 2000, more than 1,024"),
    "experts-missing": ({"n_routed_experts": 6}, (), "layer 1 has 4 experts"),
    "kv-lora-rank-vs-shapes": ({"kv_lora_rank": 16}, (), "kv_a_proj_with_mqa.weight' has shape [32, 64], "
                                                         "expected [16, 64]"),
    "nested-and-flat-disagree": ({"linear_attn_config": {"head_dim": 8}}, (),
                                 "'linear_head_dim' (16) disagrees with linear_attn_config.head_dim (8)"),
    "dense-count-disagrees": ({"first_k_dense_replace": 2}, (), "first_k_dense_replace=2 disagrees"),
    "interleaved-dense": ({"mlp_layer_types": ["dense", "sparse", "dense", "sparse"]}, (),
                          "puts a dense layer after an expert layer"),
    "mtp-layers-missing": ({"num_nextn_predict_layers": 2}, (), "(+ 'num_nextn_predict_layers' 2) but the "
                                                                 "checkpoint holds 5 layers"),
    "mtp-projection-missing": ({}, (L + "4.eh_proj.weight",), "checkpoint lacks tensors: " + L + "4.eh_proj.weight"),
    "indexer-tensor-missing": ({}, (L + "1.self_attn.indexer.wk.weight",), "layer 1 should have a full indexer"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_checkpoint_refused_in_one_line(glm5, tmp_path, case):
    text, drop, problem = CONFIG_CASES[case]
    folder = edited(glm5.ckpt, tmp_path, text=text, drop=drop)
    dest = tmp_path / "out.gguf"
    sources = digest([folder])
    outcome = cli(["convert", folder, "-o", dest, "-t", "f32"], timeout=60)
    assert_refused(outcome, folder.name, problem=problem, dest=dest, sources=sources)


def test_published_nested_linear_config_converts_to_the_same_file(glm5, tmp_path):
    """llama.cpp's converter expects ``linear_attn_config``; transformers saves flat keys: both give one GGUF."""
    flat = {k: ... for k in ("linear_head_dim", "linear_num_heads", "linear_conv_kernel_dim", "linear_lower_bound")}
    nested = {"head_dim": 16, "num_heads": 4, "short_conv_kernel_size": 4, "gate_lower_bound": -5.0}
    folder = edited(glm5.ckpt, tmp_path, text={**flat, "linear_attn_config": nested})
    out = tmp_path / "nested.gguf"
    assert cli(["convert", folder, "-o", out, "-t", "f32"]).code == 0
    assert _tensor_bytes(out) == _tensor_bytes(glm5.gguf)


def test_flat_published_layout_converts_to_the_same_file(glm5, tmp_path):
    """Text settings at the top level (nested linear_attn_config, first_k_dense_replace) and ``model.layers.*``
    names, as llama.cpp's converter reads GLM-5.3-Flash: the same GGUF tensors as transformers' layout."""
    folder = tmp_path / "flat"
    folder.mkdir()
    for path in glm5.ckpt.iterdir():
        if path.suffix != ".safetensors" and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(path, folder / path.name)
    index = json.loads((glm5.ckpt / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        state = load_file(glm5.ckpt / shard)
        save_file({k.replace("model.language_model.", "model."): v for k, v in state.items()}, str(folder / shard),
                  metadata={"format": "pt"})
    index["weight_map"] = {k.replace("model.language_model.", "model."): v for k, v in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = json.loads((glm5.ckpt / "config.json").read_text())
    text = config.pop("text_config")
    nested = {"head_dim": text.pop("linear_head_dim"), "num_heads": text.pop("linear_num_heads"),
              "short_conv_kernel_size": text.pop("linear_conv_kernel_dim"),
              "gate_lower_bound": text.pop("linear_lower_bound")}
    text.pop("mlp_layer_types")
    flat = {**text, "architectures": config["architectures"], "model_type": "glm5_next", "mla_use_nope": True,
            "linear_attn_config": nested, "first_k_dense_replace": 1, "vision_config": config["vision_config"]}
    (folder / "config.json").write_text(json.dumps(flat))
    out = tmp_path / "flat.gguf"
    assert cli(["convert", folder, "-o", out, "-t", "f32"]).code == 0
    assert _tensor_bytes(out) == _tensor_bytes(glm5.gguf)


def _tensor_bytes(path: Path) -> dict[str, bytes]:
    return {t.name: t.data.tobytes() for t in gguf.GGUFReader(path).tensors}


A = "glm5-next."
GGUF_CASES = {
    "no-tail": ({A + "attention.indexer.kpool_select_tail": False}, (), "kpool_select_tail false"),
    "hc-count": ({A + "hyper_connection.count": 2}, (), "hyper_connection.count is 2"),
    "topk-vs-kpool": ({A + "attention.indexer.top_k": 10}, (), "indexer top_k 10 must be a multiple"),
    "kv-pattern-vs-tensors": ({A + "attention.head_count_kv": [1, 1, 1, 0, 1]}, (), "lacks tensor(s) blk.0.attn_q_a"),
    "kv-pattern-values": ({A + "attention.head_count_kv": [0, 2, 2, 0, 1]}, (), "must list 0 (linear attention)"),
    "nextn-linear": ({A + "attention.head_count_kv": [0, 1, 1, 0, 0]}, (), "a NextN block is marked linear"),
    "rope-dims": ({A + "rope.dimension_count": 8}, (), "rope.dimension_count must be 0"),
    "indexer-types-length": ({A + "attention.indexer.types": [True, True]}, (), "must hold 4 booleans"),
    "first-latent-shared": ({A + "attention.indexer.types": [True, False, False, True]}, (),
                            "the first latent-attention block (1) shares"),
    "key-length": ({A + "attention.key_length": 48}, (), "key_length 48 must be kv_lora_rank 32"),
    "conv-kernel": ({A + "ssm.conv_kernel": 1}, (), "ssm.conv_kernel 1"),
    "clamp-length": ({A + "swiglu_clamp_exp": [3.0, 3.0]}, (), "swiglu_clamp_exp has 2 values for block_count 5"),
    "indexer-missing": ({}, ("blk.1.indexer.attn_k.weight",), "lacks tensor(s) blk.1.indexer.attn_k.weight"),
    "mtp-missing": ({}, ("blk.4.nextn.eh_proj.weight",), "lacks tensor(s) blk.4.nextn.eh_proj.weight"),
}


def test_bad_gguf_refused_before_llama_cpp(glm5, tmp_path):
    files = {name: rewrite_gguf(glm5.gguf, tmp_path / f"{name}.gguf", dict(kv), drop)
             for name, (kv, drop, _) in GGUF_CASES.items()}
    commands = [["info", str(path)] for path in files.values()]
    # the indexer caches 3 x 16 = 48 values per token: a q8_0 cache (blocks of 32) would hit a GGML_ASSERT
    commands.append(["run", str(glm5.gguf), "-p", "hi", "-n", "1", "--kv-type", "q8_0"])
    problems = [case[2] for case in GGUF_CASES.values()]
    problems.append("needs an indexer row (3 x indexer key length) that is a multiple of 32; this model's is 48")
    names = [*files, "q8_0-kv-cache"]
    for name, args, outcome, problem in zip(names, commands, run_table(commands), problems, strict=True):
        try:
            assert_refused(outcome, Path(args[1]).name, problem=problem)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None

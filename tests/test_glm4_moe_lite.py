"""GLM-4.7-Flash (``Glm4MoeLiteForCausalLM`` → llama.cpp ``deepseek2``) proven against transformers.

Tiny random checkpoints built with transformers' own class (MLA with q LoRA, 1 dense + 2 expert layers, 8 sigmoid-
routed experts with a score-correction bias, a shared expert, the MTP layer appended), saved sharded as users get
them; converted to f32 GGUF and run by llama.cpp with an f32 KV cache: logits at every position within 1e-4 relative
of transformers' float32, greedy ids equal over 32 steps, decoding on the cache equal to a full pass, a second turn
on the reused cache equal to a fresh prefill. Bad configs and GGUFs are refused in one line before any native call.
"""

from __future__ import annotations

import json
import re
import shutil

import gguf
import numpy as np
import pytest

from chatglm.convert.pipeline import convert
from chatglm.devtools.glm4 import special_ids, train_glm4_bpe
from chatglm.devtools.glm4_moe_lite import build_lite_checkpoint
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.gguf_file import read_header
from chatglm.runtime.loader import open_engine
from chatglm.runtime.memory import estimate
from chatglm.runtime.validate import check_transformer

from hostile import assert_refused, cli, digest
from test_memory import native_log  # noqa: F401  (fixture)

TEXT = "你好, world! 今天天气很好。 def f(x):\n\treturn x * 2 + 1  # 这是一个很长的句子, repeated."
F32 = {"n_ctx": 256, "n_threads": 1, "kv_type": "f32", "flash_attn": False}


@pytest.fixture(scope="module")
def tok():
    return train_glm4_bpe()


@pytest.fixture(scope="module")
def lite(tok, tmp_path_factory):
    """(transformers model, checkpoint folder, f32 GGUF): float32 weights, two shards, the MTP layer."""
    root = tmp_path_factory.mktemp("lite")
    model, folder = build_lite_checkpoint(root / "ck", tok, seed=3, rope_theta=20000.0)
    return model, folder, convert(folder, root / "lite.gguf", "f32").path


def prompt(tok) -> list[int]:
    ids = special_ids(tok)
    body = tok.encode(TEXT, add_special_tokens=False).ids
    return [ids["[gMASK]"], ids["<sop>"], ids["<|user|>"], *body, ids["<|assistant|>"]]


def relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def reference(model, ids) -> np.ndarray:
    from chatglm.devtools.glm4 import reference_logits

    return reference_logits(model, ids)


def test_checkpoint_is_published_layout(lite):
    _, folder, _ = lite
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "glm4_moe_lite" and cfg["mlp_layer_types"] == ["dense", "sparse", "sparse"]
    assert "first_k_dense_replace" not in cfg and "scoring_func" not in cfg  # what llama.cpp's converter misses
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    assert "model.layers.3.eh_proj.weight" in index["weight_map"]
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]


def test_metadata_and_tensors(lite):
    model, _, path = lite
    header = read_header(path)
    cfg = model.config
    assert header.arch == "deepseek2" and header.get("glm.family") == "glm4.7-flash"
    get = header.arch_get
    assert (get("block_count"), get("nextn_predict_layers"), get("leading_dense_block_count")) == (4, 1, 1)
    assert get("expert_gating_func") == gguf.ExpertGatingFuncType.SIGMOID
    assert get("expert_weights_scale") == pytest.approx(1.8) and get("expert_weights_norm") is True
    assert (get("attention.head_count"), get("attention.head_count_kv")) == (4, 1)
    assert (get("attention.q_lora_rank"), get("attention.kv_lora_rank")) == (32, 32)
    assert (get("attention.key_length"), get("attention.value_length")) == (32 + 8, 32)
    assert (get("attention.key_length_mla"), get("attention.value_length_mla")) == (16 + 8, 16)
    assert get("rope.dimension_count") == 8 and get("rope.freq_base") == pytest.approx(20000.0)
    t = header.tensors
    assert t["blk.1.attn_k_b.weight"].shape == (16, 32, 4)  # ggml order: (nope, kv_lora_rank, head)
    assert t["blk.1.attn_v_b.weight"].shape == (32, 16, 4)  # (kv_lora_rank, v, head)
    assert t["blk.1.attn_kv_a_mqa.weight"].shape == (64, 40)
    assert {"blk.0.ffn_gate.weight", "blk.1.exp_probs_b.bias", "blk.3.nextn.eh_proj.weight",
            "blk.3.nextn.shared_head_norm.weight", "blk.3.ffn_gate_exps.weight", "blk.3.attn_q_b.weight"} <= set(t)
    kv_b = model.model.layers[1].self_attn.kv_b_proj.weight.detach().numpy().reshape(4, 32, 32)
    data = {r.name: r.data for r in gguf.GGUFReader(path).tensors}
    np.testing.assert_array_equal(data["blk.1.attn_k_b.weight"], kv_b[:, :16, :].transpose(0, 2, 1))
    np.testing.assert_array_equal(data["blk.1.attn_v_b.weight"], kv_b[:, 16:, :])
    assert cfg.num_hidden_layers == 3


def test_logits_decode_and_cache_reuse(lite, tok):
    model, _, path = lite
    seq = prompt(tok)
    ref = reference(model, seq)
    with open_engine(path, **F32) as engine:
        assert engine.info.chat_format == "glm47"
        assert relative(engine.all_logits(seq), ref) < 1e-4
        engine.reset()
        engine.prefill(seq[:-6])
        for i, token in enumerate(seq[-6:]):  # decode on the cache, one token at a time
            engine.step(token)
            assert relative(engine.logits(), ref[len(seq) - 6 + i]) < 1e-4
        turn2 = seq + tok.encode(" 再来一次 again", add_special_tokens=False).ids
        assert engine.prefill(turn2) == len(turn2) - len(seq)  # only the new turn is evaluated
        reused = engine.logits().copy()
        engine.reset()
        engine.prefill(turn2)
        np.testing.assert_allclose(reused, engine.logits(), rtol=0, atol=1e-5 * np.abs(reused).max())
        assert relative(reused, reference(model, turn2)[-1]) < 1e-4


def test_greedy_32_steps_equal_transformers(lite, tok):
    import torch

    model, _, path = lite
    seq = prompt(tok)
    ids = torch.tensor([seq])
    with torch.no_grad():  # an explicit mask: generate would otherwise mask every prompt token equal to pad_token_id
        theirs = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                                do_sample=False, pad_token_id=0)[0, len(seq):].tolist()
    ours = []
    with open_engine(path, **F32) as engine:
        engine.prefill(seq)
        for _ in range(32):
            ours.append(int(np.argmax(engine.logits())))
            engine.step(ours[-1])
    assert ours == theirs


def test_sigmoid_gating_is_written(lite, tok, tmp_path):
    """Without expert_gating_func (what llama.cpp's converter writes for transformers' config, which has no
    scoring_func) llama.cpp routes with softmax and the logits are far off."""
    model, _, path = lite
    seq = prompt(tok)
    with open_engine(rewritten(path, tmp_path / "softmax.gguf", expert_gating_func=None), **F32) as engine:
        assert relative(engine.all_logits(seq), reference(model, seq)) > 0.05


@pytest.mark.parametrize("variant", ["bf16", "no-q-lora", "rope-halves", "first-k-dense"])
def test_variants_match_transformers(tok, tmp_path, variant):
    """bf16 shards; q_proj instead of the q LoRA (no MTP layer: llama.cpp's MTP graph needs the LoRA); rotate-half
    rope (``rope_interleave`` false: rope rows reordered into pairs); published-style ``first_k_dense_replace``."""
    settings = {"bf16": {"bf16": True}, "no-q-lora": {"q_lora_rank": None, "mtp": False},
                "rope-halves": {"rope_interleave": False}, "first-k-dense": {"mlp_layer_types": None}}[variant]
    model, folder = build_lite_checkpoint(tmp_path / "ck", tok, seed=5, **settings)
    if variant == "first-k-dense":
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop("mlp_layer_types")
        cfg["first_k_dense_replace"] = 1
        (folder / "config.json").write_text(json.dumps(cfg))
    path = convert(folder, tmp_path / "out.gguf", "f32").path
    seq = prompt(tok)
    with open_engine(path, **F32) as engine:
        assert relative(engine.all_logits(seq), reference(model, seq)) < 1e-4


@pytest.mark.parametrize("recipe", ["q8_0", "q4_k_m"])
def test_quantized_conversions_load_and_generate(lite, tok, tmp_path, recipe):
    """One-step quantized conversion (and ``chatglm quantize`` of the f32 file) equals llama-quantize run on our f32
    file (types and logits), and generates.
    (Tiny random MoE models are far from their f32 logits at q8_0 already, ~0.5 relative, for llama.cpp's own
    files too: one flipped expert choice moves a whole row; GLM-4.5's tiny model does the same.)"""
    from test_qtypes import llama_quantize

    from chatglm.convert.qtypes import get_recipe

    _, folder, f32 = lite
    path = convert(folder, tmp_path / f"{recipe}.gguf", recipe).path
    llama_quantize(f32, tmp_path / "theirs.gguf", get_recipe(recipe).ftype)
    assert cli(["quantize", f32, tmp_path / "requantized.gguf", recipe]).code == 0  # GGUF -> GGUF, too
    ours_types = {n: t.ggml_type for n, t in read_header(path).tensors.items()}
    assert ours_types == {n: t.ggml_type for n, t in read_header(tmp_path / "theirs.gguf").tensors.items()}
    assert ours_types == {n: t.ggml_type for n, t in read_header(tmp_path / "requantized.gguf").tensors.items()}
    seq = prompt(tok)
    with open_engine(tmp_path / "theirs.gguf", n_ctx=128, n_threads=1) as engine:
        theirs = engine.all_logits(seq)
    with open_engine(path, n_ctx=128, n_threads=1) as engine:
        logits = engine.all_logits(seq)
        engine.reset()
        engine.prefill(seq)
        engine.step(int(np.argmax(engine.logits())))
        assert np.isfinite(engine.logits()).all()
    np.testing.assert_array_equal(logits, theirs)


def test_kv_cache_estimate_is_the_compressed_cache(lite, native_log):
    """MLA caches [latent | rope] of one KV head per token and trunk block (no V, and the MTP block has none in the
    main context): 3 blocks x 40 values x 4 bytes in f32, as llama.cpp allocates it."""
    _, _, path = lite
    est = estimate(read_header(path), 8192, "f32", flash_attn=False)
    assert est.kv_cache == 8192 * 3 * (32 + 8) * 4
    with open_engine(path, n_ctx=8192, n_threads=1, kv_type="f32", flash_attn=False):
        assert est.kv_cache / 2**20 == pytest.approx(native_log.mib("KV buffer"), rel=0.01)


@pytest.mark.parametrize("n_ctx, flash", [(4096, True), (16384, False)])
def test_memory_estimate_matches_llama_cpp_buffers(lite, native_log, n_ctx, flash):
    _, _, path = lite
    est = estimate(read_header(path), n_ctx, "f16", flash_attn=flash)
    with open_engine(path, n_ctx=n_ctx, n_threads=1, kv_type="f16", flash_attn=flash):
        kv = native_log.mib("KV buffer")
        compute = native_log.mib("compute buffer") + native_log.mib("output buffer")
    assert est.kv_cache / 2**20 == pytest.approx(kv, rel=0.01)
    assert est.compute / 2**20 == pytest.approx(compute, rel=0.08)


# ------------------------------------------------------------------------------------------------ bad input


def edited_copy(src, root, **changes):
    folder = root / "ck"
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is ...:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes, problem", [
    ({"first_k_dense_replace": 2}, "first_k_dense_replace=2 disagrees with mlp_layer_types (1 leading dense"),
    ({"mlp_layer_types": ["sparse", "dense", "sparse"]}, "puts a dense layer after an expert layer"),
    ({"mlp_layer_types": ["dense", "sparse"]}, "'mlp_layer_types' must list 'dense' or 'sparse' for each of the 3"),
    ({"kv_lora_rank": 48}, "kv_a_proj_with_mqa.weight' has shape [40, 64], expected [56, 64]"),
    ({"q_lora_rank": None, "num_nextn_predict_layers": 0}, "lacks tensors: model.layers.0.self_attn.q_proj.weight"),
    ({"q_lora_rank": None}, "MTP layers without q_lora_rank are not supported"),
    ({"num_nextn_predict_layers": 2}, "'num_hidden_layers' is 3 (+ 'num_nextn_predict_layers' 2) but the checkpoint"),
    ({"n_routed_experts": 2000}, "'n_routed_experts' is 2000, more than 1,024"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9 > n_routed_experts=8"),
    ({"num_nextn_predict_layers": 0}, "does not know: model.layers.3."),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn' is not"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim (7) must be even"),
])
def test_bad_configs_are_refused_in_one_line(lite, tmp_path, changes, problem):
    folder = edited_copy(lite[1], tmp_path, **changes)
    dest = tmp_path / "out.gguf"
    sources = digest([folder])
    outcome = cli(["convert", folder, "-o", dest, "-t", "f32"], timeout=60)
    assert_refused(outcome, "ck", problem=problem, dest=dest, sources=sources)


def test_missing_mtp_tensors_are_refused(lite, tmp_path):
    """The config announces an MTP layer whose eh_proj is not in the files (a shard edited by hand)."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "ck"
    shutil.copytree(lite[1], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"].pop("model.layers.3.eh_proj.weight")
    tensors = load_file(shard)
    del tensors["model.layers.3.eh_proj.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InputError, match=r"checkpoint lacks tensors: model\.layers\.3\.eh_proj\.weight"):
        convert(folder, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


def rewritten(src, dst, drop=(), **kv):
    """A copy of GGUF ``src`` with arch keys changed (value None: removed) and tensors dropped."""
    reader = gguf.GGUFReader(src)
    arch = read_header(src).arch
    w = gguf.GGUFWriter(dst, arch)
    for field in reader.fields.values():
        name = field.name
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        key = name.removeprefix(f"{arch}.")
        if key in kv:
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(name, value, vtype)
    for key, value in kv.items():
        if value is not None:
            w.add_uint32(f"{arch}.{key}", value)
    for t in reader.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed(t.shape.tolist())),
                         raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


@pytest.mark.parametrize("change, problem", [
    ({"attention.head_count_kv": 2}, "MLA needs head_count_kv 1"),
    ({"attention.kv_lora_rank": 16}, "MLA needs head_count_kv 1, key_length kv_lora_rank + rope (24)"),
    ({"attention.key_length_mla": None}, "lacks deepseek2.attention.key_length_mla"),
    ({"attention.q_lora_rank": None}, "lacks deepseek2.attention.q_lora_rank"),
    ({"rope.dimension_count": 24}, "leaves no non-rope key dimension"),
    ({"nextn_predict_layers": 2}, "deepseek2's MTP graph runs one NextN block with an expert FFN"),
    ({"attention.q_lora_rank": 0}, "deepseek2's MTP graph needs a q LoRA"),
    ({"expert_shared_count": 0}, "needs expert_shared_count of at least 1"),
    ({"expert_count": 0}, "needs expert_count and expert_used_count above 0"),
])
def test_bad_gguf_values_are_refused_before_llama_cpp(lite, tmp_path, change, problem):
    path = rewritten(lite[2], tmp_path / "bad.gguf", **change)
    with pytest.raises(InputError, match=re.escape(problem)):
        check_transformer(read_header(path))
    with pytest.raises(InputError, match=re.escape(problem)):
        open_engine(path, **F32)


def test_glm45_mtp_graph_limits_are_checked(tok, tmp_path):
    """GLM-4.5/4.7 (glm4moe) too: llama.cpp's MTP graph asserts one NextN block."""
    from chatglm.devtools.glm4 import build_checkpoint

    _, folder = build_checkpoint("glm45", tmp_path / "ck", tok)
    path = convert(folder, tmp_path / "ok.gguf", "f32").path
    check_transformer(read_header(path))
    bad = rewritten(path, tmp_path / "bad.gguf", nextn_predict_layers=2)
    with pytest.raises(InputError, match=r"glm4moe's MTP graph runs one NextN block with an expert FFN; got "
                                         r"nextn_predict_layers 2"):
        check_transformer(read_header(bad))


def test_gguf_missing_a_split_kv_b_half_is_refused(lite, tmp_path):
    path = rewritten(lite[2], tmp_path / "bad.gguf", drop=("blk.2.attn_v_b.weight",))
    with pytest.raises(InputError, match=r"lacks tensor\(s\) blk\.2\.attn_v_b\.weight"):
        check_transformer(read_header(path))


def test_detection_and_info(lite, tmp_path):
    _, folder, path = lite
    outcome = cli(["info", path])
    assert outcome.code == 0, outcome.text
    assert "architecture   deepseek2 (family glm4.7-flash, chat format glm47)" in outcome.text
    assert "MTP layers     1 (NextN blocks usable for speculative decoding" in outcome.text
    bad = edited_copy(folder, tmp_path, architectures=["Glm4MoeForCausalLM"])
    with pytest.raises(UnsupportedModelError, match="unknown architecture"):
        convert(bad, tmp_path / "out.gguf", "f32")


def test_experts_stream_one_matrix_at_a_time(lite, tmp_path, monkeypatch):
    """Stacked expert tensors are read a block of rows of one expert at a time, never whole (a real GLM-5.3 layer's
    256 experts would be 12.9 GB in float32), and the file is the one the whole-tensor path writes, byte for byte."""
    from chatglm.convert.checkpoint import Checkpoint
    from chatglm.convert.family import OutTensor

    _, folder, _ = lite
    whole = Checkpoint.load

    def load(self, name):
        assert ".experts." not in name, f"{name} loaded whole"
        return whole(self, name)

    monkeypatch.setattr(Checkpoint, "load", load)
    streamed = convert(folder, tmp_path / "streamed.gguf", "q4_k_m").path
    monkeypatch.setattr(Checkpoint, "load", whole)
    monkeypatch.setattr(OutTensor, "is_expert_stack", property(lambda self: False))
    materialized = convert(folder, tmp_path / "whole.gguf", "q4_k_m").path
    assert any("_exps." in n for n in read_header(streamed).tensors)
    assert streamed.read_bytes() == materialized.read_bytes()

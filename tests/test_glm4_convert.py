"""GLM-4 family conversion proven against transformers: tiny random models made with transformers' own classes, saved
in the layouts users download, converted to f32 GGUF and run by llama.cpp; prefill and decode logits compared.

With an f32 KV cache and flash attention off, llama.cpp reproduces transformers to ~5e-7 relative (measured), so
any wrong row order, rope layout, norm or expert choice fails the 1e-5 bound; the default runtime settings (f16 KV
cache, which alone costs up to ~1e-3 on these random models) are checked against 3e-3.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from chatglm.convert.pipeline import convert
from chatglm.devtools.glm4 import build_checkpoint, reference_logits, special_ids, train_glm4_bpe
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.gguf_file import read_header
from chatglm.runtime.loader import open_engine

from hostile import cli

# layout -> (GGUF architecture, family name, chat format)
EXPECTED = {
    "glm4": ("chatglm", "glm4", "glm4"),
    "glm4-hf": ("chatglm", "glm4-hf", "glm4"),
    "glm4-0414": ("glm4", "glm4-0414", "glm4-0414"),
    "glm45": ("glm4moe", "glm4.5", "glm45"),
}
TEXT = "你好, world! 今天天气很好。 def f(x):\n\treturn x * 2"


@pytest.fixture(scope="module")
def tok():
    return train_glm4_bpe()


@pytest.fixture(scope="module")
def converted(tok, tmp_path_factory):
    """layout -> (transformers model, checkpoint folder, f32 GGUF path)."""
    root = tmp_path_factory.mktemp("glm4conv")
    out = {}
    for seed, layout in enumerate(EXPECTED):
        theta = 50000.0 if layout == "glm4" else 10000.0  # the THUDM layout stores it as rope_ratio = 5
        model, folder = build_checkpoint(layout, root / layout, tok, seed=seed, rope_theta=theta)
        result = convert(folder, root / f"{layout}.gguf", "f32")
        assert (result.arch, result.family) == EXPECTED[layout][:2]
        out[layout] = (model, folder, result.path)
    return out


def prompt(tok) -> list[int]:
    ids = special_ids(tok)
    body = tok.encode(TEXT, add_special_tokens=False).ids
    return [ids["[gMASK]"], ids["<sop>"], ids["<|user|>"], *body, ids["<|assistant|>"]]


def relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("layout", list(EXPECTED))
def test_logits_match_transformers(layout, tok, converted):
    model, _, path = converted[layout]
    seq = prompt(tok)
    ref = reference_logits(model, seq)
    with open_engine(path, n_ctx=128, n_threads=1, kv_type="f32", flash_attn=False) as engine:
        assert engine.info.chat_format == EXPECTED[layout][2]
        assert engine.tokenize(TEXT) == seq[3:-1]
        prefill = engine.all_logits(seq)
        assert relative(prefill, ref) < 1e-5
        engine.reset()
        engine.prefill(seq[:-4])
        for i, token in enumerate(seq[-4:]):  # decode: one token at a time on the cache
            engine.step(token)
            assert relative(engine.logits(), ref[len(seq) - 4 + i]) < 1e-5
    with open_engine(path, n_ctx=128, n_threads=1) as engine:  # default runtime settings: f16 KV cache rounds K and V
        assert relative(engine.all_logits(seq), ref) < 3e-3


def test_thudm_metadata(converted):
    _, folder, path = converted["glm4"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["rope_ratio"] == 5.0 and cfg["model_type"] == "chatglm"
    header = read_header(path)
    assert header.arch_get("rope.freq_base") == pytest.approx(50000.0)
    assert header.arch_get("rope.dimension_count") == 8  # half of head_dim 16
    assert "blk.0.attn_qkv.bias" in header.tensors


def test_hf_layouts_keep_split_qkv_and_post_norms(converted):
    glm = read_header(converted["glm4-hf"][2])
    assert {"blk.1.attn_q.weight", "blk.1.attn_k.bias", "blk.1.ffn_up.weight"} <= set(glm.tensors)
    assert "blk.1.attn_qkv.weight" not in glm.tensors
    glm4 = read_header(converted["glm4-0414"][2])
    assert {"blk.1.post_attention_norm.weight", "blk.1.post_ffw_norm.weight"} <= set(glm4.tensors)
    assert glm4.arch_get("rope.dimension_count") == 8


def test_moe_metadata_and_nextn_layer_kept(converted):
    """GLM-4.5 ... 4.7 keep their MTP layer as llama.cpp does: block L with its nextn.* tensors, block_count L + 1
    (the trunk's logits are checked unchanged by test_logits_match_transformers)."""
    model, folder, path = converted["glm45"]
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and "rope_parameters" not in cfg
    header = read_header(path)
    n = model.config.num_hidden_layers
    assert header.arch_get("block_count") == n + 1
    assert header.arch_get("nextn_predict_layers") == 1
    nextn = {t.removeprefix(f"blk.{n}.") for t in header.tensors if t.startswith(f"blk.{n}.")}
    assert {"nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "nextn.shared_head_norm.weight",
            "nextn.embed_tokens.weight", "nextn.shared_head_head.weight", "attn_q.weight", "ffn_gate_exps.weight",
            "post_attention_norm.weight", "exp_probs_b.bias"} <= nextn
    assert header.tensors[f"blk.{n}.nextn.eh_proj.weight"].shape == (128, 64)  # ggml order: [embedding; hidden]
    outcome = cli(["info", path])
    assert outcome.code == 0 and "MTP layers     1 (NextN blocks usable for speculative decoding" in outcome.text
    assert header.arch_get("expert_count") == 8 and header.arch_get("expert_used_count") == 2
    assert header.arch_get("expert_shared_count") == 1 and header.arch_get("leading_dense_block_count") == 1
    assert header.arch_get("expert_weights_scale") == pytest.approx(2.5)
    assert header.arch_get("expert_gating_func") == 2  # sigmoid
    assert header.tensors["blk.1.ffn_gate_exps.weight"].shape == (64, 32, 8)  # ggml order: ne0 first
    assert {"blk.0.ffn_gate.weight", "blk.1.exp_probs_b.bias", "blk.1.attn_q_norm.weight"} <= set(header.tensors)


def test_moe_nextn_layer_without_its_own_head(tok, tmp_path):
    """A checkpoint whose MTP layer has no embed_tokens/shared_head.head (llama.cpp then uses token_embd and
    output) gets none in the GGUF; a missing eh_proj is refused in one line."""
    from safetensors.numpy import load_file, save_file

    _, folder = build_checkpoint("glm45", tmp_path / "ck", tok)
    tensors = load_file(folder / "model.safetensors")
    for name in ("model.layers.3.embed_tokens.weight", "model.layers.3.shared_head.head.weight"):
        del tensors[name]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    header = read_header(convert(folder, tmp_path / "out.gguf", "f32").path)
    assert "blk.3.nextn.eh_proj.weight" in header.tensors
    assert not {"blk.3.nextn.embed_tokens.weight", "blk.3.nextn.shared_head_head.weight"} & set(header.tensors)
    del tensors["model.layers.3.eh_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"checkpoint lacks tensors: model\.layers\.3\.eh_proj\.weight"):
        convert(folder, tmp_path / "out2.gguf", "f32")


def _rewrite_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"num_experts_per_tok": 9}, "inconsistent expert counts: num_experts_per_tok=9 > n_routed_experts=8"),
    ({"n_routed_experts": 6}, ("inconsistent expert counts: layer 1 has experts 0..7 .8 of them., config.json "
                               "says n_routed_experts=6")),
    ({"num_local_experts": 4}, "inconsistent expert counts: n_routed_experts=8, num_local_experts=4"),
])
def test_moe_inconsistent_expert_counts(tok, tmp_path, changes, message):
    _, folder = build_checkpoint("glm45", tmp_path / "ck", tok)
    _rewrite_config(folder, **changes)
    with pytest.raises(InputError, match=message):
        convert(folder, tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


def test_moe_without_nextn_setting_rejects_the_extra_layer(tok, tmp_path):
    _, folder = build_checkpoint("glm45", tmp_path / "ck", tok)
    _rewrite_config(folder, num_nextn_predict_layers=0)
    with pytest.raises(InputError, match=r"does not know: model\.layers\.3\."):
        convert(folder, tmp_path / "out.gguf", "f32")


def test_grouped_routing_is_refused(tok, tmp_path):
    _, folder = build_checkpoint("glm45", tmp_path / "ck", tok)
    _rewrite_config(folder, n_group=2, topk_group=1)
    with pytest.raises(UnsupportedModelError, match=r"grouped expert routing \(n_group=2\)"):
        convert(folder, tmp_path / "out.gguf", "f32")


def test_rope_parameters_style_config_converts(tok, tmp_path):
    """Files saved by transformers 5 carry rope settings in rope_parameters; both styles give the same GGUF keys."""
    _, folder = build_checkpoint("glm4-0414", tmp_path / "ck", tok, rope_theta=20000.0)
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta"),
                              "partial_rotary_factor": cfg.pop("partial_rotary_factor")}
    path.write_text(json.dumps(cfg))
    header = read_header(convert(folder, tmp_path / "out.gguf", "f32").path)
    assert header.arch_get("rope.freq_base") == pytest.approx(20000.0)
    cfg["rope_parameters"]["rope_type"] = "yarn"
    path.write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="rope type 'yarn' is not supported"):
        convert(folder, tmp_path / "out2.gguf", "f32")


def test_tied_embeddings_use_the_token_embedding_as_output(tok, tmp_path):
    model, folder = build_checkpoint("glm4-hf", tmp_path / "ck", tok, seed=7, tie_word_embeddings=True)
    header = read_header(convert(folder, tmp_path / "out.gguf", "f32").path)
    assert "output.weight" not in header.tensors
    seq = prompt(tok)
    with open_engine(header.path, n_ctx=64, n_threads=1, kv_type="f32", flash_attn=False) as engine:
        assert relative(engine.all_logits(seq), reference_logits(model, seq)) < 1e-5

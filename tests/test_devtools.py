"""The tiny-checkpoint builders: corpus, SentencePiece trainer, published ChatGLM2/3 layout and its inverse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import sentencepiece
import torch

from chatglm.devtools import checkpoints as ck
from chatglm.devtools.chatformat import ChatEncoder, Message
from chatglm.devtools.corpus import RARE_LINES, bilingual_corpus, training_texts

# Keys of the published chatglm2-6b / chatglm3-6b config.json (as saved by their ChatGLMConfig).
PUBLISHED_CONFIG_KEYS = {
    "_name_or_path", "model_type", "architectures", "auto_map", "add_bias_linear", "add_qkv_bias",
    "apply_query_key_layer_scaling", "apply_residual_connection_post_layernorm", "attention_dropout",
    "attention_softmax_in_fp32", "bias_dropout_fusion", "classifier_dropout", "eos_token_id", "ffn_hidden_size",
    "fp32_residual_connection", "hidden_dropout", "hidden_size", "kv_channels", "layernorm_epsilon",
    "multi_query_attention", "multi_query_group_num", "num_attention_heads", "num_layers", "original_rope",
    "pad_token_id", "padded_vocab_size", "post_layer_norm", "pre_seq_len", "prefix_projection", "quantization_bit",
    "rmsnorm", "seq_length", "tie_word_embeddings", "torch_dtype", "transformers_version", "use_cache", "vocab_size",
}  # fmt: skip


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    return ck.train_sentencepiece(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.fixture(scope="module")
def sp(tok):
    return sentencepiece.SentencePieceProcessor(model_file=str(tok))


@pytest.fixture(scope="module")
def model():
    return ck.tiny_glm_model(seed=0)


# ------------------------------------------------------------------------------------------------ corpus / tokenizer


def test_corpus_is_deterministic_and_varied():
    lines = bilingual_corpus()
    assert lines == bilingual_corpus()
    assert len(lines) >= 150
    text = "".join(lines)
    for needle in ("\t", "\n", "    ", "你好", "，", "１", "😀", "def ", "{", "2024"):
        assert needle in text, needle
    assert set(RARE_LINES) <= set(lines) and not set(RARE_LINES) & set(training_texts())


def test_sentencepiece_is_deterministic(tok, tmp_path):
    again = ck.train_sentencepiece(tmp_path / "again.model")
    assert again.read_bytes() == tok.read_bytes()


def test_sentencepiece_round_trips_whole_corpus(sp):
    bad = [line for line in bilingual_corpus() if sp.decode(sp.encode(line)) != line]
    assert bad == []


def test_sentencepiece_has_chatglm_shape(sp):
    assert sp.vocab_size() == ck.DEFAULT_SP_VOCAB
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.id_to_piece(3) == "<0x00>" and sp.is_byte(3 + 0x0A)
    # dummy prefix, and newline only through byte fallback (published ChatGLM3 encodes "\n" as [30910, 13])
    assert sp.encode_as_pieces("\n") == ["▁", "<0x0A>"]
    assert sp.encode_as_pieces("2024")[-4:] == ["2", "0", "2", "4"]  # split_digits
    assert "１" in "".join(sp.encode_as_pieces("１２"))  # identity normalisation: no NFKC
    assert "▁▁▁▁" in sp.encode_as_pieces("a    b") or "▁▁▁▁▁" in sp.encode_as_pieces("a    b")


def test_rare_scripts_need_byte_fallback(sp):
    for line in RARE_LINES:
        assert any(sp.is_byte(i) for i in sp.encode(line)), line


def test_special_token_ids_follow_published_order(tok):
    ids = ck.special_token_ids(tok, "chatglm3")
    n = ck.DEFAULT_SP_VOCAB
    assert [ids[t] for t in ck.SPECIAL_TOKENS["chatglm3"]] == list(range(n, n + 9))
    assert ids["<|user|>"] == n + 6 and ids["<eos>"] == 2 and ids["<pad>"] == 0
    two = ck.special_token_ids(tok, "chatglm2")
    assert "<|user|>" not in two and two["eop"] == n + 4


def test_chat_encoder_matches_published_build_chat_input(tok, sp):
    enc = ChatEncoder(str(tok))
    s = ck.special_token_ids(tok)
    ids = enc.prompt([Message("system", "Be brief.")], "你好")
    expected = [s["[gMASK]"], s["sop"], s["<|system|>"], *sp.encode("\n"), *sp.encode("Be brief.")]
    expected += [s["<|user|>"], *sp.encode("\n"), *sp.encode("你好"), s["<|assistant|>"]]
    assert ids == expected
    assert enc.decode_reply([*enc.reply_ids("Hi there."), 5, 6]) == "Hi there."


# ------------------------------------------------------------------------------------------------ model / checkpoint


def test_tiny_model_is_seeded_and_non_trivial(model):
    again = ck.tiny_glm_model(seed=0)
    other = ck.tiny_glm_model(seed=1)
    name = "model.layers.0.self_attn.q_proj.bias"
    assert torch.equal(model.state_dict()[name], again.state_dict()[name])
    assert not torch.equal(model.state_dict()[name], other.state_dict()[name])
    state = model.state_dict()
    assert state[name].abs().min() > 0
    assert not torch.allclose(state["model.norm.weight"], torch.ones(64))
    assert model.config.rope_parameters["partial_rotary_factor"] == 0.5
    logits = ck.reference_logits(model, [1001, 1003, 1006, 5, 6, 1007])
    assert logits.shape == (6, 1024) and logits.dtype == np.float32 and logits.std() > 0.3


def test_unknown_tiny_setting_is_rejected():
    with pytest.raises(TypeError, match="hiden_size"):
        ck.tiny_glm_config(hiden_size=32)


def test_float32_checkpoint_reloads_exactly(model, tok, tmp_path):
    out = ck.save_chatglm_checkpoint(model, tmp_path / "m", tok)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"
    ]  # fmt: skip
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    back = ck.load_chatglm_checkpoint(out)
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key
    ids = [1001, 1003, 1006, 10, 20, 30, 1007]
    np.testing.assert_array_equal(ck.reference_logits(model, ids), ck.reference_logits(back, ids))


def test_published_layout_stacks_qkv_and_keeps_gate_up(model):
    pub = ck.to_published_state(model)
    hf = model.state_dict()
    qkv = pub["transformer.encoder.layers.1.self_attention.query_key_value.weight"]
    assert qkv.shape == (64 + 2 * 32, 64)  # (q_rows + 2 * kv_rows, hidden)
    assert torch.equal(qkv[64:96], hf["model.layers.1.self_attn.k_proj.weight"])
    bias = pub["transformer.encoder.layers.1.self_attention.query_key_value.bias"]
    assert torch.equal(bias[96:], hf["model.layers.1.self_attn.v_proj.bias"])
    assert torch.equal(pub["transformer.encoder.layers.0.mlp.dense_h_to_4h.weight"],
                       hf["model.layers.0.mlp.gate_up_proj.weight"])  # fmt: skip
    rotary = model.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(pub["transformer.rotary_pos_emb.inv_freq"].numpy(), rotary, rtol=1e-6)


@pytest.mark.parametrize("family,dtype,shards", [("chatglm2", "float16", 3), ("chatglm3", "bfloat16", 2)])
def test_sharded_checkpoint_index_is_consistent(model, tok, tmp_path, family, dtype, shards):
    from safetensors import safe_open

    out = ck.save_chatglm_checkpoint(model, tmp_path / "m", tok, family=family, dtype=dtype, shards=shards)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert files == [f"model-{k:05d}-of-{shards:05d}.safetensors" for k in range(1, shards + 1)]
    seen: dict[str, str] = {}
    total = 0
    for fname in files:
        with safe_open(str(out / fname), "pt") as f:
            assert list(f.keys()), fname
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                tensor = f.get_tensor(key)
                assert tensor.dtype == getattr(torch, dtype)
                total += tensor.numel() * tensor.element_size()
                seen[key] = fname
    assert seen == index["weight_map"]
    assert index["metadata"]["total_size"] == total
    assert set(seen) == set(ck.to_published_state(model))
    back = ck.load_chatglm_checkpoint(out)
    cast = getattr(torch, dtype)
    for key, value in model.state_dict().items():
        assert torch.equal(value.to(cast).float(), back.state_dict()[key]), key


def test_config_json_has_published_keys(model, tok, tmp_path):
    out = ck.save_chatglm_checkpoint(
        model, tmp_path / "m", tok, family="chatglm2", dtype="float16", extra_config={"seq_length": 32768}
    )
    cfg = json.loads((out / "config.json").read_text())
    assert PUBLISHED_CONFIG_KEYS <= set(cfg)
    assert cfg["model_type"] == "chatglm" and cfg["architectures"] == ["ChatGLMModel"]
    assert (cfg["num_layers"], cfg["padded_vocab_size"], cfg["kv_channels"]) == (2, 1024, 16)
    assert (cfg["multi_query_attention"], cfg["multi_query_group_num"]) == (True, 2)
    assert (cfg["ffn_hidden_size"], cfg["torch_dtype"], cfg["seq_length"]) == (96, "float16", 32768)
    assert cfg["add_qkv_bias"] is True and cfg["add_bias_linear"] is False
    assert "rope_ratio" not in cfg and cfg["_name_or_path"] == "THUDM/chatglm2-6b"
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "ChatGLMTokenizer"


def test_rope_ratio_round_trips(tok, tmp_path):
    model = ck.tiny_glm_model(seed=3, rope_theta=500000.0, num_key_value_heads=4)
    out = ck.save_chatglm_checkpoint(model, tmp_path / "m", tok, drop_config_keys=["_name_or_path"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_ratio"] == 50.0 and "_name_or_path" not in cfg
    assert (cfg["multi_query_attention"], cfg["multi_query_group_num"]) == (False, 1)
    back = ck.load_chatglm_checkpoint(out)
    assert back.config.rope_parameters["rope_theta"] == 500000.0
    assert back.config.num_key_value_heads == 4


def test_vocab_too_small_for_specials_is_rejected(tok, tmp_path):
    small = ck.tiny_glm_model(seed=0, vocab_size=1004)
    with pytest.raises(ValueError, match=re.escape("vocab_size 1004 < 1009")):
        ck.save_chatglm_checkpoint(small, tmp_path / "m", tok)
    assert not (tmp_path / "m").exists()


# ------------------------------------------------------------------------------------------------ bundled demo model

DEMO = Path(__file__).resolve().parents[1] / "chatglm" / "models" / "demo"


@pytest.fixture(scope="module")
def demo_expected() -> dict:
    return json.loads((DEMO / "expected.json").read_text())


def test_demo_model_is_small_and_in_published_layout():
    names = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in DEMO.iterdir()) < 10_500_000
    cfg = json.loads((DEMO / "config.json").read_text())
    assert PUBLISHED_CONFIG_KEYS <= set(cfg) and cfg["torch_dtype"] == "float16"


def test_demo_greedy_replies_are_sensible_and_reproducible(demo_expected):
    model = ck.load_chatglm_checkpoint(DEMO)
    enc = ChatEncoder(str(DEMO / "tokenizer.model"))
    cases = {c["name"]: c for c in demo_expected["cases"]}
    assert "你好" in cases["greeting_zh"]["reply"]
    for name in ("add_en", "add_en_system", "multi_turn"):
        assert "2 + 3 = 5" in cases[name]["reply"], name
    for case in demo_expected["cases"]:
        history = [Message(m["role"], m["content"]) for m in case["history"]]
        prompt = enc.prompt(history, case["query"])
        assert prompt == case["prompt_ids"], case["name"]
        out = ck.greedy_generate(model, prompt, enc.stop_ids())
        assert out == case["generated_ids"], case["name"]
        assert enc.decode_reply(out) == case["reply"]
        assert out[-1] == enc.special["<|user|>"]

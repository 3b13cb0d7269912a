"""ChatGLM2/3 conversion: metadata, vocabulary, tensor map, input formats and output types."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from chatglm.convert.pipeline import convert
from chatglm.gguf_file import read_header
from chatglm.ggml.quants import tensor_nbytes

from conftest import make_tiny


def test_metadata_follows_config(glm3, glm3_gguf):
    h = read_header(glm3_gguf)
    cfg = glm3.model.config
    assert h.arch == "chatglm"
    assert h.get("glm.family") == "chatglm3" and h.get("glm.chat_format") == "chatglm3"
    assert h.arch_get("block_count") == cfg.num_hidden_layers
    assert h.arch_get("embedding_length") == cfg.hidden_size
    assert h.arch_get("feed_forward_length") == cfg.intermediate_size
    assert h.arch_get("attention.head_count") == cfg.num_attention_heads
    assert h.arch_get("attention.head_count_kv") == cfg.num_key_value_heads
    assert h.arch_get("rope.dimension_count") == cfg.head_dim // 2
    assert h.arch_get("rope.freq_base") == pytest.approx(10000.0)
    assert h.arch_get("context_length") == cfg.max_position_embeddings


def test_vocab_special_tokens_and_padding(glm3, glm3_gguf):
    import sentencepiece as spm

    h = read_header(glm3_gguf)
    sp = spm.SentencePieceProcessor(model_file=str(glm3.sp_model))
    tokens = h.get("tokenizer.ggml.tokens")
    types = h.array("tokenizer.ggml.token_type")
    assert len(tokens) == glm3.model.config.vocab_size
    assert tokens[: sp.vocab_size()] == [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    for text in ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"):
        assert tokens[glm3.special[text]] == text
        assert types[glm3.special[text]] == gguf.TokenType.CONTROL
    assert tokens[-1] == f"[PAD{len(tokens) - 1}]" and types[-1] == gguf.TokenType.UNUSED
    assert h.get("tokenizer.ggml.model") == "llama"
    assert h.get("tokenizer.ggml.eos_token_id") == sp.eos_id()
    assert h.get("tokenizer.ggml.eot_token_id") == glm3.special["<|user|>"]
    assert h.get("tokenizer.ggml.eom_token_id") == glm3.special["<|observation|>"]
    assert h.get("tokenizer.ggml.add_bos_token") is False


def test_chatglm2_has_no_role_tokens(glm2, workdir):
    h = read_header(convert(glm2.ckpt, workdir / "glm2.gguf", "f16").path)
    assert h.get("glm.chat_format") == "chatglm2"
    tokens = h.get("tokenizer.ggml.tokens")
    assert "<|user|>" not in tokens and tokens[glm2.special["sop"]] == "sop"
    assert "tokenizer.ggml.eot_token_id" not in h.kv


def test_tensor_map_is_complete(glm3, glm3_gguf):
    h = read_header(glm3_gguf)
    n_layer = glm3.model.config.num_hidden_layers
    per_layer = ["attn_norm.weight", "attn_qkv.weight", "attn_qkv.bias", "attn_output.weight", "ffn_norm.weight",
                 "ffn_up.weight", "ffn_down.weight"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"}
    expected |= {f"blk.{i}.{n}" for i in range(n_layer) for n in per_layer}
    assert set(h.tensors) == expected


def test_weights_are_copied_exactly(glm3, glm3_gguf):
    reader = gguf.GGUFReader(glm3_gguf)
    got = {t.name: np.array(t.data) for t in reader.tensors}
    state = {k: v.detach().numpy() for k, v in glm3.model.state_dict().items()}
    q, k, v = (state[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert np.array_equal(got["blk.0.attn_qkv.weight"], np.concatenate([q, k, v]))
    assert np.array_equal(got["blk.0.ffn_up.weight"], state["model.layers.0.mlp.gate_up_proj.weight"])
    assert np.array_equal(got["output.weight"], state["lm_head.weight"])


def test_sharded_bf16_equals_single_file(workdir, sp_model):
    one = make_tiny(workdir, sp_model, "chatglm3", seed=3, dtype="bfloat16")
    three = make_tiny(workdir, sp_model, "chatglm3", seed=3, dtype="bfloat16", shards=3)
    assert (three.ckpt / "model.safetensors.index.json").is_file()
    a = convert(one.ckpt, workdir / "one.gguf", "f32").path
    b = convert(three.ckpt, workdir / "three.gguf", "f32").path
    ta = {t.name: np.array(t.data) for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: np.array(t.data) for t in gguf.GGUFReader(b).tensors}
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[n], tb[n]) for n in ta)


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_output_types(glm3, workdir, qtype):
    out = convert(glm3.ckpt, workdir / f"glm3-{qtype}.gguf", qtype)
    h = read_header(out.path)
    want = gguf.GGMLQuantizationType[qtype.upper()]
    QT = gguf.GGMLQuantizationType
    for name, t in h.tensors.items():
        expect = QT.F32 if len(t.shape) == 1 else want
        if name == "output.weight" and want not in (QT.F16, QT.BF16):
            # llama.cpp's recipes keep the output at q6_k, which falls back to q8_0 for rows of 64 (< 256).
            expect = QT.Q8_0
        assert t.ggml_type == expect, name
        assert t.nbytes == tensor_nbytes(expect, t.shape[::-1])
    assert h.get("general.file_type") == gguf.LlamaFileType[
        "ALL_F32" if qtype == "f32" else f"MOSTLY_{qtype.upper()}"]

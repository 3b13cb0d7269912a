"""Converting ChatGLM-6B checkpoints: detection, metadata, tensors, and the errors of variants we do not run."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from fixtures_glm1 import glm1, glm1_dir, glm1_gguf, ice_model  # noqa: F401  (fixtures)

from chatglm.convert.checkpoint import Checkpoint
from chatglm.convert.family import detect
from chatglm.convert.pipeline import convert
from chatglm.devtools.glm1 import tiny_glm1_checkpoint
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.gguf_file import read_header
from chatglm.runtime.loader import describe


def test_metadata_and_tensors(glm1, glm1_gguf):
    header = read_header(glm1_gguf)
    c = glm1.config
    assert header.arch == "chatglm1"
    assert header.get("glm.family") == "chatglm1" and header.get("glm.chat_format") == "chatglm1"
    expected = {"block_count": 28, "embedding_length": 64, "feed_forward_length": 256, "attention.head_count": 4,
                "context_length": 2048, "rope.dimension_count": 8}
    assert {k: header.arch_get(k) for k in expected} == expected
    assert math.isclose(header.arch_get("residual_scale"), math.sqrt(56), rel_tol=1e-6)
    assert math.isclose(header.arch_get("attention.layer_norm_epsilon"), 1e-5, rel_tol=1e-6)
    assert len(header.get("tokenizer.ggml.tokens")) == c["vocab_size"]
    # 12 tensors per layer (6 weights, 6 biases) + embeddings, final norm (2), lm_head.
    assert len(header.tensors) == 28 * 12 + 4
    assert header.tensors["blk.0.attn_qkv.weight"].shape == (64, 192)
    assert header.tensors["blk.27.ffn_down.bias"].shape == (64,)
    info = describe(header)
    assert info.chat_format == "chatglm1"
    assert {"[gMASK]", "[MASK]", "<sop>", "<eop>"} <= set(info.special)


def test_qkv_keeps_the_per_head_layout(glm1, glm1_gguf):
    header = read_header(glm1_gguf)
    t = header.tensors["blk.3.attn_qkv.weight"]
    data = np.memmap(glm1_gguf, dtype=np.float32, mode="r", offset=header.data_offset + t.offset,
                     shape=tuple(reversed(t.shape)))
    np.testing.assert_array_equal(data, glm1.weights["transformer.layers.3.attention.query_key_value.weight"])


def test_detected_as_glm1_only(glm1):
    with Checkpoint(glm1.ckpt) as ckpt:
        family = detect(ckpt)
    assert family.name == "chatglm1" and family.arch == "chatglm1"
    assert family.hp.n_head_kv == family.hp.n_head == 4


def test_tied_embeddings_convert_and_run(glm1_dir, ice_model):
    from chatglm.runtime.loader import open_engine

    folder, config, _ = tiny_glm1_checkpoint(glm1_dir / "tied", ice_model, num_layers=2, tied=True)
    path = convert(folder, glm1_dir / "tied.gguf", "f16").path
    assert "output.weight" not in read_header(path).tensors
    with open_engine(path, n_ctx=16, n_threads=1) as engine:
        engine.prefill([5, 6, config["gmask_token_id"], config["bos_token_id"]])
        assert np.isfinite(engine.logits()).all()


def edited(glm1, tmp_path, name: str, **changes):
    folder = tmp_path / name
    shutil.copytree(glm1.ckpt, folder)
    config = {**glm1.config, **changes}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("changes, error, message", [
    ({"quantization_bit": 4}, UnsupportedModelError, "pre-quantized ChatGLM-6B"),
    ({"pre_seq_len": 128}, InputError, "no prefix_encoder.embedding.weight tensor"),  # P-Tuning without its prefix
    ({"position_encoding_2d": False}, UnsupportedModelError, "position_encoding_2d=False"),
    ({"num_attention_heads": 5}, InputError, "head size"),
    ({"vocab_size": 100}, InputError, "more than vocab_size 100"),
])
def test_unsupported_variants_are_refused(glm1, tmp_path, changes, error, message):
    with pytest.raises(error, match=message):
        convert(edited(glm1, tmp_path, "v", **changes), tmp_path / "out.gguf", "f32")
    assert not (tmp_path / "out.gguf").exists()


def test_missing_tokenizer_is_named(glm1, tmp_path):
    folder = edited(glm1, tmp_path, "notok")
    (folder / "ice_text.model").unlink()
    with pytest.raises(InputError, match="ice_text.model"):
        convert(folder, tmp_path / "out.gguf", "f32")

"""Bad input to the GLM-1 engine gives a clear error and leaves the process (and the engine) alive.

Every refusal here would otherwise reach a GGML_ASSERT, which aborts the whole Python process.
"""

from __future__ import annotations

import logging
import shutil
import threading

import numpy as np
import pytest
from fixtures_glm1 import glm1, glm1_dir, glm1_engine, glm1_gguf, ice_model  # noqa: F401  (fixtures)

from chatglm.errors import Cancelled, ContextOverflowError, InputError, ModelRuntimeError
from chatglm.ggml import ops
from chatglm.gguf_file import read_header
from chatglm.runtime.loader import open_engine


def still_works(engine, glm1) -> None:
    engine.reset()
    engine.prefill(glm1.tok.encode("你好") + [glm1.ids["gmask"], glm1.ids["bos"]])
    assert np.isfinite(engine.logits()).all()


def test_context_overflow(glm1, glm1_gguf):
    with open_engine(glm1_gguf, n_ctx=16, n_threads=1) as engine:
        with pytest.raises(ContextOverflowError, match="does not fit the context of 16"):
            engine.prefill(list(range(5, 22)))
        engine.prefill(list(range(5, 20)) + [glm1.ids["bos"]])  # exactly full
        with pytest.raises(ContextOverflowError, match="is full"):
            engine.step(7)
        with pytest.raises(ContextOverflowError):
            engine._eval([7, 8])  # the engine's own check, below the Engine API's
        still_works(engine, glm1)


def test_empty_prompt(glm1, glm1_engine, glm1_gguf):
    with pytest.raises(ModelRuntimeError, match="empty prompt"):
        glm1_engine.prefill([])
    with pytest.raises(ModelRuntimeError, match="empty prompt"):
        glm1_engine.all_logits([])
    from chatglm.runtime.model import Model

    with pytest.raises(InputError, match="empty prompt"):
        Model(glm1_engine).generate("")
    still_works(glm1_engine, glm1)


def test_token_ids_outside_the_vocabulary(glm1, glm1_engine):
    for bad in (-1, glm1.config["vocab_size"], 2**40):
        with pytest.raises(ModelRuntimeError, match="outside the vocabulary"):
            glm1_engine.prefill([5, bad])
    with pytest.raises(InputError, match="outside the vocabulary"):
        glm1_engine.token_bytes(glm1.config["vocab_size"])
    still_works(glm1_engine, glm1)


def swap_dims(src, dst, name: str) -> None:
    """Copy a GGUF with one 2-D tensor's dimensions swapped in its header (same byte size, wrong shape)."""
    shutil.copyfile(src, dst)
    header = read_header(src)
    ne0, ne1 = header.tensors[name].shape
    raw = bytearray(dst.read_bytes())
    key = len(name).to_bytes(8, "little") + name.encode() + (2).to_bytes(4, "little")
    at = raw.index(key) + len(key)
    raw[at:at + 16] = ne1.to_bytes(8, "little") + ne0.to_bytes(8, "little")
    dst.write_bytes(bytes(raw))


def test_wrong_tensor_shape(glm1_gguf, tmp_path):
    bad = tmp_path / "swapped.gguf"
    swap_dims(glm1_gguf, bad, "blk.5.ffn_up.weight")
    assert read_header(bad).tensors["blk.5.ffn_up.weight"].shape == (256, 64)  # a valid file otherwise
    with pytest.raises(InputError, match=r"blk.5.ffn_up.weight has shape \[256, 64\], expected \[64, 256\]"):
        open_engine(bad, n_ctx=16, n_threads=1)


def test_bad_settings(glm1_gguf, caplog):
    with pytest.raises(InputError, match="KV cache in f16 or f32 or bf16"):
        open_engine(glm1_gguf, n_ctx=16, n_threads=1, kv_type="q8_0")
    with pytest.raises(InputError, match="thread .0. counts must be positive"):
        open_engine(glm1_gguf, n_ctx=16, n_threads=0)
    with caplog.at_level(logging.WARNING):
        with open_engine(glm1_gguf, n_ctx=2304, n_threads=1) as engine:
            assert engine.info.n_ctx == 2304
    assert "longer than the 2048 ChatGLM-6B was trained on" in caplog.text


def test_cancel_keeps_the_cache_consistent(glm1, glm1_engine):
    ids = glm1.tok.encode("取消") + [glm1.ids["gmask"], glm1.ids["bos"]]
    glm1_engine.reset()
    stop = threading.Event()
    stop.set()
    with pytest.raises(Cancelled):
        glm1_engine.prefill(ids, cancel=stop)
    assert glm1_engine.tokens == []
    with pytest.raises(ModelRuntimeError, match="no logits"):
        glm1_engine.logits()
    still_works(glm1_engine, glm1)


def test_graph_builders_refuse_instead_of_aborting():
    g = ops.Graph(32, 64)
    try:
        a, b = g.new(ops.F32, (8, 4)), g.new(ops.F32, (6, 4))
        pos = g.new(ops.I32, (3,))
        with pytest.raises(ops.GGMLError, match="do not multiply"):
            g.mul_mat(a, b)
        with pytest.raises(ops.GGMLError, match="runs past its storage"):
            g.view(a, (8, 5), (a.nb[1],), 0)
        with pytest.raises(ops.GGMLError, match="does not broadcast"):
            g.add(a, b)
        with pytest.raises(ops.GGMLError, match="cannot view"):
            g.reshape(a, (5, 7))
        with pytest.raises(ops.GGMLError, match="positions"):
            g.rope_neox(g.new(ops.F32, (8, 2, 4)), pos, 4, 10000.0)
        with pytest.raises(ops.GGMLError, match="cannot rotate"):
            g.rope_neox(g.new(ops.F32, (8, 2, 3)), pos, 4, 10000.0, offset=6)
        with pytest.raises(ops.GGMLError, match="mask"):
            g.soft_max(a, g.new(ops.F32, (7, 4)), 1.0)
        with pytest.raises(ops.GGMLError, match="not a multiple"):
            g.new(2, (30, 2))  # q4_0 rows come in blocks of 32
        with pytest.raises(ops.GGMLError, match="context full"):
            for _ in range(40):
                g.new(ops.F32, (1,))
    finally:
        g.close()

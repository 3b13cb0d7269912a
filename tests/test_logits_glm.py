"""What llama.cpp runs from our GGUF is the published model: logits equal transformers' on the same weights."""

from __future__ import annotations

import numpy as np
import pytest

from chatglm.convert.pipeline import convert
from chatglm.runtime.model import load


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference over a row, relative to the row's largest reference magnitude (worst row)."""
    return float(np.max(np.abs(got - ref).max(axis=-1) / np.abs(ref).max(axis=-1)))


def sequence(tiny, model) -> list[int]:
    text = "你好，ChatGLM! def add(a, b):\n\treturn a + b  # 加法 😀"
    return [tiny.special["[gMASK]"], tiny.special["sop"], tiny.special["<|user|>"]] + model.tokenize(text)


def test_prefill_logits_match_transformers(glm3, glm3_model):
    ids = sequence(glm3, glm3_model)
    ref = glm3.logits(ids)
    got = glm3_model.engine.all_logits(ids)
    assert got.shape == ref.shape
    assert rel_err(got, ref) < 1e-5


def test_cached_decode_logits_match_transformers(glm3, glm3_model):
    ids = sequence(glm3, glm3_model)
    ref = glm3.logits(ids)
    engine = glm3_model.engine
    split = len(ids) // 2
    engine.reset()
    assert engine.prefill(ids[:split]) == split
    rows = [engine.logits().copy()]
    for tok in ids[split:]:
        engine.step(tok)
        rows.append(engine.logits().copy())
    assert rel_err(np.stack(rows[:-1]), ref[split - 1:-1]) < 1e-5
    assert rel_err(rows[-1][None], ref[-1:]) < 1e-5


def test_prefill_reuses_the_cache(glm3, glm3_model):
    ids = sequence(glm3, glm3_model)
    engine = glm3_model.engine
    engine.reset()
    engine.prefill(ids[:10])
    assert engine.prefill(ids) == len(ids) - 10  # only the new tokens are evaluated
    assert rel_err(engine.logits()[None], glm3.logits(ids)[-1:]) < 1e-5


# Defaults (f16 KV cache, flash attention where llama.cpp picks it): f16 rounding of K, V and Q·K costs ~1e-3.
@pytest.mark.parametrize("qtype,bound", [("f32", 3e-3), ("f16", 5e-3), ("q8_0", 4e-2)])
def test_quantized_logits_within_bounds(glm3, workdir, qtype, bound):
    path = convert(glm3.ckpt, workdir / f"logits-{qtype}.gguf", qtype).path
    with load(path, n_ctx=256, n_threads=2) as m:
        ids = sequence(glm3, m)
        assert rel_err(m.engine.all_logits(ids), glm3.logits(ids)) < bound

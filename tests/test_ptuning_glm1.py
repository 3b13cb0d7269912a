"""P-Tuning v2 on ChatGLM-6B (our own ggml graph, issue 22) against the float64 reference of the published forward
(test_glm1_logits.reference_logits fed the prefix as the published ``get_prompt`` feeds it: per layer P keys and
values in front of the tokens' own, never rotated, seen by every token; 2D positions as without a prefix)."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_glm1 import glm1, glm1_dir, ice_model  # noqa: F401  (fixtures)
from test_glm1_logits import chat_ids, reference_logits, rel_err
from test_ptuning import _prefix_dir

from chatglm.convert.pipeline import convert
from chatglm.gguf_file import read_header
from chatglm.runtime import ptuning as rt_ptuning

P = 5
REL = 1e-5


@pytest.fixture(scope="module")
def pt1(glm1, glm1_dir):
    """(the prefix as (n_layer, 2, P, hidden), the f32 GGUF of the base model with it)."""
    c = glm1.config
    n_layer, hidden = c["num_layers"], c["hidden_size"]
    emb = np.random.default_rng(11).normal(0, 1, (P, n_layer * 2 * hidden)).astype(np.float32)
    folder = _prefix_dir(glm1.ckpt, glm1_dir / "pt1", emb, pre_seq_len=P, prefix_projection=False)
    gguf = convert(glm1.ckpt, glm1_dir / "pt1.gguf", "f32", ptuning=folder).path
    prefix = emb.reshape(P, n_layer, 2, hidden).transpose(1, 2, 0, 3)
    return prefix, gguf


def test_glm1_prefix_logits_and_greedy_match_the_published_forward(glm1, pt1):
    from chatglm.runtime.loader import open_engine

    prefix, gguf = pt1
    np.testing.assert_array_equal(rt_ptuning.read_prefix(read_header(gguf)), prefix)
    ids = chat_ids(glm1, "[Round 0]\n问：你好，请介绍一下你自己。\n答：")
    ref = reference_logits(glm1.weights, glm1.config, ids, prefix)
    assert rel_err(reference_logits(glm1.weights, glm1.config, ids), ref) > 1e-2  # the prefix matters
    with open_engine(gguf, n_ctx=128, n_threads=1, kv_type="f32") as engine:
        assert engine.info.pre_seq_len == P
        err = rel_err(engine.all_logits(ids), ref)
        assert err < REL, err
        engine.n_batch = 3  # chunks after the context: the prefix columns in front of every chunk's mask
        text = ids + glm1.tok.encode("我是一个语言模型。")
        err = rel_err(engine.all_logits(text), reference_logits(glm1.weights, glm1.config, text, prefix))
        assert err < REL, err
        engine.n_batch = 512
        engine.reset()
        engine.prefill(ids)  # greedy, 32 cached steps
        seq, steps = list(ids), []
        for _ in range(32):
            seq.append(int(np.argmax(engine.logits())))
            engine.step(seq[-1])
            steps.append(engine.logits().copy())
    want, errors, last = list(ids), [], ref[-1]
    for got in steps:
        want.append(int(np.argmax(last)))
        last = reference_logits(glm1.weights, glm1.config, want, prefix)[-1]
        errors.append(rel_err(got, last))
    assert seq == want
    assert max(errors) < REL, max(errors)  # every step's logits, not only their argmax


def test_glm1_turns_trimming_and_clear_keep_the_prefix(glm1, pt1):
    """A conversation that outgrows the context drops old rounds (each turn a new bidirectional context), then
    /clear: the cache still holds the prefix in front of whatever it holds (its last logits are the published ones)."""
    from chatglm.runtime.model import load

    prefix, gguf = pt1

    def check(m):
        toks = list(m.engine.tokens)
        assert m.engine.prefill(toks) == 1  # everything before the last token comes from the cache
        ref = reference_logits(glm1.weights, glm1.config, toks, prefix)[-1]
        assert rel_err(m.engine.logits(), ref) < REL

    with load(gguf, n_ctx=96, n_threads=1, kv_type="f32") as m:
        s = m.session(temperature=0, max_tokens=4)
        for turn in range(4):
            s.send(" ".join(["hello world"] * 8) + f" {turn}")
            check(m)
        assert s.dropped_messages > 0  # old rounds were dropped
        s.clear()
        s.send("hello")
        check(m)

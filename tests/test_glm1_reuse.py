"""The GLM-1 decode graph is built once per span of cache cells and reused: its steps must give the logits of a
fresh full forward at every position, across span boundaries, after a reset and when a new turn reuses the cache;
and no length up to the context limit may reach a GGML_ASSERT (flash attention, set_rows)."""

from __future__ import annotations

import numpy as np
import pytest
from fixtures_glm1 import glm1, glm1_dir, glm1_engine, glm1_gguf, ice_model  # noqa: F401  (fixtures)
from test_glm1_logits import REL, chat_ids, reference_logits, rel_err

from chatglm.errors import ContextOverflowError, ModelRuntimeError
from chatglm.ggml import ops
from chatglm.runtime.glm1 import engine as glm1_engine_module
from chatglm.runtime.loader import open_engine


def greedy_steps(engine, glm1, seq: list[int], n: int) -> list[float]:
    """``n`` greedy steps; each step's logits against the float64 forward of the whole sequence so far."""
    errors = []
    for _ in range(n):
        seq.append(int(np.argmax(engine.logits())))
        engine.step(seq[-1])
        errors.append(rel_err(engine.logits(), reference_logits(glm1.weights, glm1.config, seq)[-1]))
    return errors


def test_reused_decode_graph_equals_full_forward(glm1, glm1_gguf):
    with open_engine(glm1_gguf, n_ctx=64, n_threads=1, kv_type="f32") as engine:
        engine.kv_pad = 4  # a new span every 4 cells: steps both reuse the graph and cross spans
        seq = chat_ids(glm1, "春眠不觉晓")
        engine.prefill(seq)
        spans, reused, errors = [], [], []
        for _ in range(9):
            errors += greedy_steps(engine, glm1, seq, 1)
            spans.append((len(engine.tokens), engine.decode_graph.n_kv))
            reused.append(engine.timing.reused)
        assert max(errors) < REL, errors
        assert all(n_kv == -(-used // 4) * 4 for used, n_kv in spans), spans
        assert len({n_kv for _, n_kv in spans}) >= 2  # spans were crossed
        # built once per span: every step but the first of each span found the kept graph
        firsts = [i == 0 or spans[i][1] != spans[i - 1][1] for i in range(len(spans))]
        assert reused[1:] == [not f for f in firsts[1:]]


def test_reuse_after_reset_and_across_turns(glm1, glm1_gguf):
    with open_engine(glm1_gguf, n_ctx=96, n_threads=1, kv_type="f32") as engine:
        engine.kv_pad = 8
        first = chat_ids(glm1, "[Round 0]\n问：你好\n答：")
        engine.prefill(first)
        errors = greedy_steps(engine, glm1, first, 4)
        kept = engine.decode_graph
        # a new turn: the old turn stays cached, only its continuation is evaluated
        second = chat_ids(glm1, "[Round 0]\n问：你好\n答：") + first[-4:] + glm1.tok.encode("\n[Round 1]\n问：再见\n答：")
        before = engine.n_evaluated
        engine.prefill(second)
        assert engine.n_evaluated - before < len(second)  # the cache was reused
        errors.append(rel_err(engine.logits(), reference_logits(glm1.weights, glm1.config, second)[-1]))
        errors += greedy_steps(engine, glm1, second, 4)
        # /clear: a shorter conversation from an empty cache; stale cells past it are masked out
        engine.reset()
        third = chat_ids(glm1, "短")
        engine.prefill(third)
        errors += greedy_steps(engine, glm1, third, 3)
        assert engine.decode_graph.n_kv < kept.n_kv or engine.decode_graph is kept
    assert max(errors) < REL, errors


@pytest.mark.parametrize("kv_pad", [5, 256])
def test_decode_up_to_the_context_limit(glm1, glm1_gguf, kv_pad):
    """Steps until the cache is full (the last span is cut to the context), then a clear refusal."""
    with open_engine(glm1_gguf, n_ctx=20, n_threads=1, kv_type="f16") as engine:
        engine.kv_pad = kv_pad
        seq = chat_ids(glm1, "满")
        engine.prefill(seq)
        steps = 20 - len(seq)
        errors = greedy_steps(engine, glm1, seq, steps)
        assert len(engine.tokens) == 20 and engine.decode_graph.n_kv == 20
        assert max(errors) < 2e-3, errors  # f16 cache
        with pytest.raises(ContextOverflowError, match="is full"):
            engine.step(7)
        assert np.isfinite(engine.logits()).all()
        engine.prefill(seq[:-1])  # shorter again: the full-length graph stays valid
        assert rel_err(engine.logits(), reference_logits(glm1.weights, glm1.config, seq[:-1])[-1]) < 2e-3


def test_inputs_are_checked_before_compute(glm1_engine):
    """A cache cell outside the cache would reach set_rows' GGML_ASSERT while computing."""
    fwd = glm1_engine._decode_graph(1)
    mask = np.zeros((1, fwd.n_kv), np.float16)
    for bad in (-1, glm1_engine.kv.n_ctx):
        with pytest.raises(ModelRuntimeError, match="outside the"):
            glm1_engine_module._feed(fwd.inputs, [5], np.zeros(2, np.int32), np.array([bad], np.int32), mask,
                                     glm1_engine.kv.n_ctx)


def test_attention_builders_refuse_instead_of_aborting():
    with ops.Graph(32, 64) as g:
        q, k = g.new(ops.F32, (8, 1, 2)), g.new(ops.F16, (8, 6, 2))
        mask = g.new(ops.F16, (6, 1))
        assert g.flash_attn(q, k, k, mask, 1.0).ne == (8, 2, 1, 1)
        with pytest.raises(ops.GGMLError, match="mask"):
            g.flash_attn(q, k, k, g.new(ops.F32, (6, 1)), 1.0)
        with pytest.raises(ops.GGMLError, match="mask"):
            g.flash_attn(q, k, k, g.new(ops.F16, (5, 1)), 1.0)
        with pytest.raises(ops.GGMLError, match="do not fit"):
            g.flash_attn(g.new(ops.F32, (4, 1, 2)), k, k, mask, 1.0)
        with pytest.raises(ops.GGMLError, match="f32/f16/bf16"):
            g.flash_attn(q, g.new(2, (32, 6, 2)), k, mask, 1.0)
        rows = g.new(ops.I32, (1,))
        with pytest.raises(ops.GGMLError, match="row ids"):
            g.set_rows(k, q, g.new(ops.I32, (2,)))
        with pytest.raises(ops.GGMLError, match="rows .* into"):
            g.set_rows(k, g.new(ops.F32, (4, 1, 2)), rows)
        assert g.set_rows(k, q, rows).ne == k.ne


def test_profile_of_the_decode_step(glm1, glm1_engine):
    """Every op of the decode graph is timed once per layer as built; profiling leaves the cache valid."""
    seq = chat_ids(glm1, "测一测")
    glm1_engine.reset()
    glm1_engine.prefill(seq)
    errors = greedy_steps(glm1_engine, glm1, seq, 1)
    nodes = {o.op: o.n_nodes for o in glm1_engine.profile_last_step(repeats=1).ops}
    n_layer = glm1.config["num_layers"]
    assert nodes["FLASH_ATTN_EXT"] == n_layer
    # one token: one rope (both halves), one cache write, 3 element-wise ops per LayerNorm with its residual term
    assert nodes["MUL_MAT f32"] == 4 * n_layer + 1  # the fixture's weights are f32; the cache is read by FA
    assert nodes["ROPE"] == n_layer and nodes["SET_ROWS"] == n_layer
    assert nodes["NORM"] == 2 * n_layer + 1 and "SOFT_MAX" not in nodes and "CPY" not in nodes
    assert sum(nodes.values()) == 22 * n_layer + 5
    errors += greedy_steps(glm1_engine, glm1, seq, 2)
    assert max(errors) < REL, errors


def test_context_and_sop_in_one_pass(glm1, glm1_engine):
    """The bidirectional context and the causal tokens after it share a chunk: <sop> costs no pass of its own."""
    ids = chat_ids(glm1, "一次就够") + glm1.tok.encode("好")
    glm1_engine.reset()
    glm1_engine.prefill(ids)
    assert glm1_engine.timing.n_tokens == len(ids)
    assert rel_err(glm1_engine.logits(), reference_logits(glm1.weights, glm1.config, ids)[-1]) < REL

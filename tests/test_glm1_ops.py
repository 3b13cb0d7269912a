"""The ggml bindings: shapes tracked in Python equal ggml's own, and the primitives the GLM-1 graph relies on
(tanh GELU from exact ops, rotary on a sub-range of strided rows) compute what numpy computes."""

from __future__ import annotations

import numpy as np

from chatglm.ggml import ops
from chatglm.ggml.backend import Allocator, Backend, cpu_buffer_type, tensor_get, tensor_set


def run(g: ops.Graph, out: ops.Tensor, inputs: dict, shape) -> np.ndarray:
    g.expand(out)
    backend, alloc = Backend(1), Allocator(cpu_buffer_type())
    try:
        alloc.allocate(g)
        for t, value in inputs.items():
            tensor_set(t, value)
        assert backend.compute(g)
        return tensor_get(out, np.empty(shape, dtype=np.float32))
    finally:
        alloc.close()
        backend.close()


def test_tracked_shapes_equal_ggml_struct():
    with ops.Graph(64, 64) as g:
        x = g.new(ops.F32, (24, 5, 3))
        made = [x, g.reshape(x, (12, 2, 15)), g.view(x, (8, 5, 3), (x.nb[1], x.nb[2]), 16),
                g.permute(x, 1, 2, 0), g.cont(g.permute(x, 0, 2, 1)), g.mul_mat(x, g.new(ops.F32, (24, 7, 3))),
                g.get_rows(g.new(2, (64, 10)), g.new(ops.I32, (4,))), g.norm(x, 1e-5), g.scale(x, 2.0),
                g.soft_max(g.new(ops.F32, (6, 4, 2)), g.new(ops.F32, (6, 4)), 0.5), g.tanh(x)]
        for t in made:
            s = t.struct()
            assert (tuple(s.ne), tuple(s.nb), s.type) == (t.ne, t.nb, t.type)


def test_gelu_tanh_from_primitives_is_exact():
    from chatglm.runtime.glm1.graph import gelu_tanh

    x = np.linspace(-8, 8, 4096, dtype=np.float32).reshape(64, 64)
    with ops.Graph(32, 64) as g:
        inp = g.input(ops.F32, (64, 64), "x")
        got = run(g, gelu_tanh(g, inp), {inp: x}, (64, 64))
    xd = x.astype(np.float64)
    want = 0.5 * xd * (1 + np.tanh(0.7978845608028654 * xd * (1 + 0.044715 * xd * xd)))
    assert np.abs(got - want).max() < 1e-5  # ggml_gelu's f16 table is off by ~1e-3


def test_two_rotary_halves_on_strided_heads():
    hd, nh, T = 16, 3, 5
    qkv = np.random.default_rng(0).standard_normal((T, nh, 3 * hd)).astype(np.float32)
    pos, block = np.array([0, 1, 2, 4, 4], np.int32), np.array([0, 0, 0, 1, 2], np.int32)
    with ops.Graph(32, 64) as g:
        x = g.input(ops.F32, (3 * hd, nh, T), "qkv")
        p, b = g.input(ops.I32, (T,), "p"), g.input(ops.I32, (T,), "b")
        k = g.view(x, (hd, nh, T), (x.nb[1], x.nb[2]), hd * 4)  # the k part of each head
        out = g.rope_neox(g.rope_neox(k, p, hd // 2, 10000.0), b, hd // 2, 10000.0, offset=hd // 2)
        got = run(g, out, {x: qkv, p: pos, b: block}, (T, nh, hd))

    def rotate(v, angle_pos):  # rotate-half over the last axis, float64
        d = v.shape[-1]
        ang = angle_pos[:, None, None] * (1.0 / 10000 ** (np.arange(0, d, 2) / d))[None, None, :]
        cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
        return v * cos + np.concatenate([-v[..., d // 2:], v[..., :d // 2]], -1) * sin

    k = qkv[..., hd:2 * hd].astype(np.float64)
    want = np.concatenate([rotate(k[..., :hd // 2], pos), rotate(k[..., hd // 2:], block)], -1)
    assert np.abs(got - want).max() < 1e-5

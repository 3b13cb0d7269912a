"""GLM-ASR's rotary audio encoder and adapter as one ggml graph over a 30 s window of log-mel features.

Shapes in ggml order (ne0 first): the window (3000, n_mel) -> conv1 (d, 3000) -> conv2 (d, 1500) = T positions ->
layers -> (d, T) -> frames stacked (d * stack, T / stack) -> adapter (n_out, T / stack). transformers' module for each
step is named in its comment (modeling_glmasr.py).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from chatglm.ggml.backend import Allocator, Backend, cpu_buffer_type, tensor_get, tensor_set
from chatglm.ggml.ops import F32, I32, Graph, Tensor
from chatglm.runtime.glmasr.mel import WINDOW_FRAMES
from chatglm.runtime.glmasr.weights import EncoderWeights

T_POS = WINDOW_FRAMES // 2  # positions after the stride-2 conv
MAX_TENSORS_PER_LAYER = 48


def _layer_norm(g: Graph, x: Tensor, w: dict[str, Tensor], name: str, eps: float) -> Tensor:
    """nn.LayerNorm over the rows of x (d, T)."""
    return g.add(g.mul(g.norm(x, eps), w[f"{name}.weight"]), w[f"{name}.bias"])


def _linear(g: Graph, x: Tensor, w: dict[str, Tensor], name: str, bias: bool = True) -> Tensor:
    y = g.mul_mat(w[f"{name}.weight"], x)
    return g.add(y, w[f"{name}.bias"]) if bias else y


def _attention(g: Graph, x: Tensor, ew: EncoderWeights, pos: Tensor, b: str) -> Tensor:
    """GlmAsrAttention: q, k rotated on their first rope_dim dims (rotate-half), no mask. x (d, T) -> (d, T)."""
    p, w = ew.params, ew.tensors
    hd, n_t = p.head_dim, x.ne[1]
    q = g.reshape(_linear(g, x, w, b + "attn_q"), (hd, p.n_head, n_t))  # (D, H, T)
    k = g.reshape(_linear(g, x, w, b + "attn_k", p.k_bias), (hd, p.n_head_kv, n_t))  # (D, Hkv, T)
    v = g.reshape(_linear(g, x, w, b + "attn_v"), (hd, p.n_head_kv, n_t))
    q = g.rope_neox(q, pos, p.rope_dim, p.theta)
    k = g.rope_neox(k, pos, p.rope_dim, p.theta)
    q = g.cont(g.permute(q, 0, 2, 1, 3))  # (D, T, H)
    k = g.cont(g.permute(k, 0, 2, 1, 3))  # (D, T, Hkv)
    scores = g.soft_max(g.mul_mat(k, q), None, hd ** -0.5)  # (T_k, T_q, H); key heads shared by H / Hkv heads
    vt = g.cont(g.permute(v, 1, 2, 0, 3))  # (T, D, Hkv)
    out = g.mul_mat(vt, scores)  # (D, T_q, H)
    out = g.reshape(g.cont(g.permute(out, 0, 2, 1, 3)), (hd * p.n_head, n_t))  # (D * H, T)
    return _linear(g, out, w, b + "attn_out")


def build(g: Graph, ew: EncoderWeights, mel: Tensor, pos: Tensor) -> Tensor:
    """The adapter's output (n_out, T / stack) for one window ``mel`` (3000, n_mel)."""
    p, w = ew.params, ew.tensors
    x = g.gelu_erf(g.add(g.conv1d(w["a.conv1d.1.weight"], mel, 1, 1), w["a.conv1d.1.bias"]))  # (d, 3000)
    x = g.cont(g.permute(x, 1, 0, 2, 3))  # (3000, d): time along rows, as im2col reads it
    x = g.gelu_erf(g.add(g.conv1d(w["a.conv1d.2.weight"], x, 2, 1), w["a.conv1d.2.bias"]))  # (d, T)
    for i in range(p.n_layer):
        b = f"a.blk.{i}."
        x = g.add(x, _attention(g, _layer_norm(g, x, w, b + "ln1", p.eps), ew, pos, b))
        h = _layer_norm(g, x, w, b + "ln2", p.eps)
        x = g.add(x, _linear(g, g.gelu_erf(_linear(g, h, w, b + "ffn_up")), w, b + "ffn_down"))
    x = _layer_norm(g, x, w, "a.post_norm", p.eps)  # GlmAsrEncoder.norm
    x = g.reshape(x, (p.d * p.stack, x.ne[1] // p.stack))  # (d * stack, T / stack): consecutive frames side by side
    x = g.gelu_erf(_linear(g, x, w, "mm.a.mlp.1"))  # GlmAsrMultiModalProjector
    return _linear(g, x, w, "mm.a.mlp.2")


class AudioEncoder:
    """The graph built once, run per window; owns its CPU backend, graph and allocator."""

    def __init__(self, weights: EncoderWeights, n_threads: int):
        p = weights.params
        self.weights = weights
        self.backend = Backend(n_threads)
        self.alloc: Optional[Allocator] = None
        n = 32 + MAX_TENSORS_PER_LAYER * p.n_layer
        self.graph = Graph(n, n + len(weights.tensors) + 16)
        try:
            self.mel = self.graph.input(F32, (WINDOW_FRAMES, p.n_mel), "mel")
            self.pos = self.graph.input(I32, (T_POS,), "pos")
            self.out = self.graph.output(build(self.graph, weights, self.mel, self.pos))
            self.graph.expand(self.out)
            self.alloc = Allocator(cpu_buffer_type())
            self.alloc.allocate(self.graph)
        except BaseException:
            self.close()
            raise

    def encode(self, features: np.ndarray) -> np.ndarray:
        """(n_mel, 3000) log-mel -> (T / stack, n_out) float32 embeddings."""
        p = self.weights.params
        feats = np.ascontiguousarray(features, dtype=np.float32)
        if feats.shape != (p.n_mel, WINDOW_FRAMES):
            raise ValueError(f"features of shape {feats.shape}, expected {(p.n_mel, WINDOW_FRAMES)}")
        tensor_set(self.mel, feats)
        tensor_set(self.pos, np.arange(T_POS, dtype=np.int32))
        self.backend.compute(self.graph)
        return tensor_get(self.out, np.empty((T_POS // p.stack, p.n_out), dtype=np.float32))

    def close(self) -> None:
        for part in (self.alloc, self.graph, self.backend):
            if part is not None:
                part.close()
        self.alloc = None

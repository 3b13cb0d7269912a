"""The ChatGLM-6B forward pass as a ggml graph: one function per block, shapes in ggml order (ne0 first).

Semantics follow the published modeling_chatglm.py of THUDM/chatglm-6b (final release):

- x = embed(ids); per layer: h = LN1(x); x = alpha * h + attn(h); h = LN2(x); x = alpha * h + mlp(h);
  logits = lm_head(LN_f(x)). LayerNorms have biases; alpha = sqrt(2 * 28).
- attn: query_key_value is laid out per head as [q | k | v] (head_dim each); the first half of every q/k head is
  rotated (rotate-half, base 10000) by the position id, the second half by the block position id; scores scaled by
  1/sqrt(head_dim); the context (tokens before <sop>) attends bidirectionally, later tokens causally.
- mlp: dense_h_to_4h, exact tanh GELU, dense_4h_to_h, both with biases.

Position ids, block position ids, the cache cells written and the mask are computed on the host
(:mod:`chatglm.runtime.glm1.layout`) and fed as inputs, so a graph depends only on its shape (tokens, cells attended
to): the engine builds the single-token decode graph once per span of cells and reuses it step after step.
Attention is ggml's flash attention over the f16 (or f32/bf16) cache; masked cells are skipped, not computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from chatglm.errors import InputError
from chatglm.ggml.ops import F16, I32, Graph, Tensor

GELU_C = math.sqrt(2.0 / math.pi)  # the published gelu_impl's 0.7978845608028654
TENSORS_PER_LAYER = 64  # an upper bound on the tensors one layer's builders create (43 today)


@dataclass(frozen=True)
class GLM1Config:
    n_layer: int
    n_embd: int
    n_head: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    eps: float
    rope_base: float
    alpha: float

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def rot_dims(self) -> int:
        """Dims rotated by each of the two position ids (half a head)."""
        return self.head_dim // 2

    @classmethod
    def from_header(cls, header: Any) -> "GLM1Config":
        """Hyperparameters from a ``chatglm1`` GGUF header, each checked (a bad value must not reach ggml)."""
        def get(key: str, kind: type, minimum: float | None = 1) -> Any:
            value = header.arch_get(key)
            if value is None:
                raise InputError(f"GGUF lacks chatglm1.{key}", header.path)
            if kind is int and (type(value) is not int or value < (minimum or 0)):
                raise InputError(f"chatglm1.{key} must be an integer >= {minimum}, got {value!r}", header.path)
            if kind is float and (not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0):
                raise InputError(f"chatglm1.{key} must be a positive number, got {value!r}", header.path)
            return kind(value)

        n_embd, n_head = get("embedding_length", int), get("attention.head_count", int)
        if n_embd % n_head or (n_embd // n_head) % 4:
            raise InputError(f"head size {n_embd}/{n_head} must be a whole multiple of 4", header.path)
        rot = get("rope.dimension_count", int)
        if rot != n_embd // n_head // 2:
            raise InputError(f"chatglm1.rope.dimension_count is {rot}, expected half the head size "
                             f"({n_embd // n_head // 2})", header.path)
        n_vocab = len(header.get("tokenizer.ggml.tokens") or [])
        if n_vocab < 1:
            raise InputError("GGUF has no tokenizer.ggml.tokens", header.path)
        return cls(n_layer=get("block_count", int), n_embd=n_embd, n_head=n_head,
                   n_ff=get("feed_forward_length", int), n_vocab=n_vocab, n_ctx_train=get("context_length", int),
                   eps=get("attention.layer_norm_epsilon", float), rope_base=get("rope.freq_base", float),
                   alpha=get("residual_scale", float))


@dataclass
class LayerWeights:
    attn_norm: Tensor  # (n_embd,)
    attn_norm_b: Tensor
    qkv: Tensor  # (n_embd, 3 * n_embd): per head [q | k | v]
    qkv_b: Tensor  # (3 * n_embd,)
    attn_out: Tensor  # (n_embd, n_embd)
    attn_out_b: Tensor
    ffn_norm: Tensor
    ffn_norm_b: Tensor
    ffn_up: Tensor  # (n_embd, n_ff)
    ffn_up_b: Tensor  # (n_ff,)
    ffn_down: Tensor  # (n_ff, n_embd)
    ffn_down_b: Tensor
    # derived when loading (see pair_tensors): per sublayer [norm weight, alpha * norm weight] and [norm bias,
    # alpha * norm bias + the sublayer's output bias], each (n_embd, 2)
    attn_pair_w: Optional[Tensor] = None
    attn_pair_b: Optional[Tensor] = None
    ffn_pair_w: Optional[Tensor] = None
    ffn_pair_b: Optional[Tensor] = None


def pair_tensors(alpha: float, norm_w: np.ndarray, norm_b: np.ndarray, out_b: np.ndarray) -> tuple[np.ndarray, ...]:
    """The (2, n_embd) f32 rows of a sublayer's pair tensors: one multiply-add of LN(x) by them gives the
    sublayer's input h = LN(x)·w + b and its residual term alpha·h + out_b side by side."""
    w = np.stack([norm_w, np.float32(alpha) * norm_w]).astype(np.float32)
    b = np.stack([norm_b, alpha * norm_b.astype(np.float64) + out_b]).astype(np.float32)
    return w, b


@dataclass
class Weights:
    tok_embd: Tensor  # (n_embd, n_vocab)
    layers: list[LayerWeights]
    out_norm: Tensor
    out_norm_b: Tensor
    output: Tensor  # (n_embd, n_vocab); the embeddings when tied

    def count(self) -> int:
        return 5 + 16 * len(self.layers)


@dataclass
class KVCache:
    """Per layer one (2 * head_dim, n_head, n_ctx) tensor, f16/bf16/f32: each cell holds every head's key and
    value side by side, [k | v], as the fused projection lays them out (one write per layer), and flash attention
    reads keys and values as two strided views, not transposed."""

    kv: list[Tensor]
    n_ctx: int


@dataclass
class Inputs:
    """Everything that changes between evaluations of one graph shape: the graph itself never holds a position."""

    tokens: Tensor  # i32 (T,)
    positions: Tensor  # i32 (2T,): the position ids, then the block position ids
    rows: Tensor  # i32 (T,): the cache cell each token's key and value go to
    mask: Tensor  # f16 (n_kv, T): 0 where a query may attend, -inf elsewhere (cells past the used ones included)


@dataclass
class Forward:
    graph: Graph
    inputs: Inputs
    logits: Tensor  # f32 (n_vocab, T) or (n_vocab, 1)
    n_kv: int  # cache cells 0..n_kv-1 are attended to (through the mask)

    def close(self) -> None:
        self.graph.close()


# --------------------------------------------------------------------------------------------------------- blocks
def layer_norm(g: Graph, x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    return g.add(g.mul(g.norm(x, eps), w), b)


def sublayer_input(g: Graph, cfg: GLM1Config, x: Tensor, w: Tensor, b: Tensor, pair_w: Tensor, pair_b: Tensor,
                   out_b: Tensor) -> tuple[Tensor, Tensor]:
    """(h, r): h = LN(x)·w + b, the sublayer's input, and r = alpha·h + out_b, what its output (without bias) is
    added to. One token: both from LN(x) in one broadcast multiply-add with the pair tensors, (n_embd, 2)."""
    n = g.norm(x, cfg.eps)
    if x.ne[1] == 1:
        hr = g.add(g.mul(pair_w, n), pair_b)  # (n_embd, 2): [h | r]
        return g.view(hr, (cfg.n_embd, 1), (hr.nb[1],), 0), g.view(hr, (cfg.n_embd, 1), (hr.nb[1],), hr.nb[1])
    h = g.add(g.mul(n, w), b)
    return h, g.add(g.scale(h, cfg.alpha), out_b)


def gelu_tanh(g: Graph, x: Tensor) -> Tensor:
    """0.5 x (1 + tanh(c x (1 + 0.044715 x^2))) = x sigmoid(2c x (1 + 0.044715 x^2)), c = sqrt(2/pi): exact ops
    (ggml_gelu reads an f16 table), 5 of them."""
    z = g.mul(x, g.scale_bias(g.sqr(x), 2 * GELU_C * 0.044715, 2 * GELU_C))
    return g.mul(x, g.sigmoid(z))


def rotate(g: Graph, cfg: GLM1Config, qkv: Tensor, inp: Inputs) -> Tensor:
    """q and k of every head rotated in place inside ``qkv``: the first half of each by the position id, the second
    by the block position id. Returns the tensor to take q, k and v from (it depends on every rotation)."""
    hd, nh, T, rot, es = cfg.head_dim, cfg.n_head, qkv.ne[1], cfg.rot_dims, 4
    if T == 1:  # rows (half, q/k, head): dim 2 is the half, which picks the position id or the block position id
        view = g.view(qkv, (rot, 2, 2, nh), (hd * es, rot * es, 3 * hd * es), 0)
        return g.rope_neox(view, inp.positions, rot, cfg.rope_base, inplace=True)
    pos = g.view(inp.positions, (T,), (), 0)
    block_pos = g.view(inp.positions, (T,), (), T * 4)
    first = g.rope_neox(g.view(qkv, (rot, 2, T, nh), (hd * es, qkv.nb[1], 3 * hd * es), 0), pos, rot,
                        cfg.rope_base, inplace=True)
    second = g.view(first, (rot, 2, T, nh), (hd * es, qkv.nb[1], 3 * hd * es), rot * es)
    g.expand(g.rope_neox(second, block_pos, rot, cfg.rope_base, inplace=True))  # before every read of q and k
    return first


def attention(g: Graph, cfg: GLM1Config, w: LayerWeights, kv: KVCache, il: int, h: Tensor, inp: Inputs,
              n_kv: int) -> Tensor:
    """The attention output before its bias (which the residual term carries)."""
    hd, nh, T, es = cfg.head_dim, cfg.n_head, h.ne[1], 4
    proj = g.add(g.mul_mat(w.qkv, h), w.qkv_b)  # (3 * n_embd, T): per head [q | k | v]
    token, head = proj.nb[1], 3 * hd * es  # bytes from one token to the next, from one head's q to the next
    qkv = rotate(g, cfg, proj, inp)
    q = g.view(qkv, (hd, T, nh), (token, head), 0)  # (hd, T, nh)
    new = g.view(qkv, (2 * hd, T, nh), (token, head), hd * es)  # [k | v]: (2 hd, T, nh)

    cache = kv.kv[il]  # (2 hd, nh, n_ctx)
    cells = g.view(cache, (2 * hd, kv.n_ctx, nh), (cache.nb[2], cache.nb[1]), 0)
    g.expand(g.set_rows(cells, new, inp.rows))  # the write comes before the reads below in node order
    keys = g.view(cache, (hd, n_kv, nh), (cache.nb[2], cache.nb[1]), 0)  # (hd, n_kv, nh)
    values = g.view(cache, (hd, n_kv, nh), (cache.nb[2], cache.nb[1]), hd * cache.nb[0])
    ctx = g.flash_attn(q, keys, values, inp.mask, 1.0 / math.sqrt(hd))  # (hd, nh, T)
    return g.mul_mat(w.attn_out, g.reshape(ctx, (cfg.n_embd, T)))  # heads concatenated: (n_embd, T)


def mlp(g: Graph, w: LayerWeights, h: Tensor) -> Tensor:
    """The MLP output before its bias (which the residual term carries)."""
    up = g.add(g.mul_mat(w.ffn_up, h), w.ffn_up_b)  # (n_ff, T)
    return g.mul_mat(w.ffn_down, gelu_tanh(g, up))  # (n_embd, T)


def block(g: Graph, cfg: GLM1Config, w: LayerWeights, kv: KVCache, il: int, x: Tensor, inp: Inputs,
          n_kv: int) -> Tensor:
    h, r = sublayer_input(g, cfg, x, w.attn_norm, w.attn_norm_b, w.attn_pair_w, w.attn_pair_b, w.attn_out_b)
    x = g.add(r, attention(g, cfg, w, kv, il, h, inp, n_kv))
    h, r = sublayer_input(g, cfg, x, w.ffn_norm, w.ffn_norm_b, w.ffn_pair_w, w.ffn_pair_b, w.ffn_down_b)
    return g.add(r, mlp(g, w, h))


def build(cfg: GLM1Config, weights: Weights, kv: KVCache, n_kv: int, n_tokens: int, all_logits: bool) -> Forward:
    """The graph evaluating ``n_tokens`` new tokens that attend to cache cells 0..n_kv-1 (themselves included).

    Positions, the cells written and the mask are inputs: one graph serves every step with the same shape."""
    if not 1 <= n_tokens <= n_kv <= kv.n_ctx:
        raise InputError(f"cannot evaluate {n_tokens} tokens over {n_kv} cells of a context of {kv.n_ctx}")
    max_tensors = TENSORS_PER_LAYER * (cfg.n_layer + 1)
    g = Graph(max_tensors, max_tensors + weights.count() + cfg.n_layer)
    try:
        inp = Inputs(g.input(I32, (n_tokens,), "tokens"), g.input(I32, (2 * n_tokens,), "positions"),
                     g.input(I32, (n_tokens,), "kv_rows"), g.input(F16, (n_kv, n_tokens), "mask"))
        x = g.get_rows(weights.tok_embd, inp.tokens)  # (n_embd, T)
        for il, w in enumerate(weights.layers):
            x = block(g, cfg, w, kv, il, x, inp, n_kv)
        if not all_logits:
            x = g.view(x, (cfg.n_embd, 1), (x.nb[1],), (n_tokens - 1) * x.nb[1])  # the last token only
        x = layer_norm(g, x, weights.out_norm, weights.out_norm_b, cfg.eps)
        logits = g.output(g.mul_mat(weights.output, x))  # (n_vocab, T or 1)
        g.expand(logits)
        return Forward(g, inp, logits, n_kv)
    except BaseException:
        g.close()
        raise

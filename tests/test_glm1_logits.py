"""GLM-1 engine logits against a float64 reference forward pass written from the published modeling code.

The reference below follows THUDM/chatglm-6b's final modeling_chatglm.py: 2D positions (position id = index in
the context, then the [gMASK] index; block position id = 0, then 1, 2, ... from <sop>), the prefix-bidirectional
mask filled with -10000, rotate-half rotary embeddings on the two halves of each head, scores / sqrt(head_dim),
LayerNorms with bias, residuals alpha * LN(x) + sublayer with alpha = sqrt(2 * 28), tanh GELU. Angles in float64.
A P-Tuning v2 prefix (``prefix``) is what the published ``get_prompt`` feeds as past keys/values: per layer, P keys and
values in front of the tokens' own, never rotated, visible to every token; the tokens' 2D positions stay as without it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import gguf
import numpy as np
import pytest
import torch
from fixtures_glm1 import glm1, glm1_dir, glm1_engine, glm1_gguf, ice_model  # noqa: F401  (fixtures)

from chatglm.families.chatglm1.convert import LAYER_KINDS, TENSOR_MAP
from chatglm.convert.pipeline import convert
from chatglm.devtools.glm1 import tiny_glm1_checkpoint
from chatglm.gguf_file import read_header
from chatglm.runtime.engine import common_prefix
from chatglm.runtime.loader import open_engine

REL = 1e-4


@contextmanager
def torch_threads(n: int):
    """Tiny float64 ops on a loaded 2-core machine: a second torch thread only waits (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_logits(weights: dict, config: dict, ids: list[int], prefix: Optional[np.ndarray] = None) -> np.ndarray:
    """(T, vocab) float64 logits of the published model for ``ids`` (a full forward, no cache); ``prefix``: a
    P-Tuning v2 prefix (n_layer, 2 (keys, values), P, hidden) as convert/ptuning.py reads it."""
    with torch_threads(1):
        return _reference(weights, config, list(ids), prefix)


def _reference(weights: dict, config: dict, ids: list[int], prefix: Optional[np.ndarray]) -> np.ndarray:
    t = {k: torch.from_numpy(np.asarray(v, dtype=np.float64)) for k, v in weights.items()}
    n, c = len(ids), ids.index(config["bos_token_id"]) if config["bos_token_id"] in ids else len(ids)
    mask_token = config["gmask_token_id"] if config["gmask_token_id"] in ids else config["mask_token_id"]
    pos = torch.arange(n)
    if mask_token in ids:
        pos[c:] = ids.index(mask_token)
    block = torch.cat([torch.zeros(c, dtype=torch.long), torch.arange(1, n - c + 1)])
    allowed = torch.ones(n, n).tril()
    allowed[:, :c] = 1
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    hd = hidden // heads
    past = torch.zeros(config["num_layers"], 2, 0, heads, hd, dtype=torch.float64)  # (L, k|v, P, heads, hd)
    if prefix is not None:
        past = torch.from_numpy(np.asarray(prefix, dtype=np.float64)).reshape(*prefix.shape[:3], heads, hd)
    allowed = torch.cat([torch.ones(n, past.shape[2]), allowed], 1)  # every token sees the prefix
    rd = hd // 2
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)

    def rotate(x, p):  # x: (n, heads, rd), rotate-half over rd dims
        angles = p[:, None].double() * inv_freq[None, :]
        emb = torch.cat([angles, angles], -1)[:, None, :]
        x1, x2 = x[..., :rd // 2], x[..., rd // 2:]
        return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()

    def ln(x, name):
        return torch.nn.functional.layer_norm(x, (hidden,), t[name + ".weight"], t[name + ".bias"],
                                              config["layernorm_epsilon"])

    def linear(x, name):
        return x @ t[name + ".weight"].T + t[name + ".bias"]

    def gelu(x):
        return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))

    alpha = math.sqrt(2 * 28)
    x = t["transformer.word_embeddings.weight"][ids]
    for i in range(config["num_layers"]):
        p = f"transformer.layers.{i}."
        h = ln(x, p + "input_layernorm")
        qkv = linear(h, p + "attention.query_key_value").view(n, heads, 3 * hd)  # per head [q | k | v]
        q, k, v = qkv[..., :hd], qkv[..., hd:2 * hd], qkv[..., 2 * hd:]
        q = torch.cat([rotate(q[..., :rd], pos), rotate(q[..., rd:], block)], -1)
        k = torch.cat([past[i, 0], torch.cat([rotate(k[..., :rd], pos), rotate(k[..., rd:], block)], -1)])
        v = torch.cat([past[i, 1], v])  # (P + n, heads, hd)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(allowed[None] < 0.5, -10000.0).softmax(-1)
        out = torch.einsum("hqk,khd->qhd", probs, v).reshape(n, hidden)
        x = h * alpha + linear(out, p + "attention.dense")
        h = ln(x, p + "post_attention_layernorm")
        x = h * alpha + linear(gelu(linear(h, p + "mlp.dense_h_to_4h")), p + "mlp.dense_4h_to_h")
    x = ln(x, "transformer.final_layernorm")
    head = t.get("lm_head.weight", t["transformer.word_embeddings.weight"])
    return (x @ head.T).numpy()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def chat_ids(glm1, text: str) -> list[int]:
    return glm1.tok.encode(text) + [glm1.ids["gmask"], glm1.ids["bos"]]


def test_prompt_logits_match_reference(glm1, glm1_engine):
    ids = chat_ids(glm1, "你好，请介绍一下你自己。\nHello  world\t!")
    got = glm1_engine.all_logits(ids)
    want = reference_logits(glm1.weights, glm1.config, ids)
    assert got.shape == want.shape
    assert rel_err(got, want) < REL


def test_cached_decode_steps_match_reference(glm1, glm1_engine):
    ids = chat_ids(glm1, "[Round 0]\n问：今天天气怎么样？\n答：很好。\n[Round 1]\n问：明天呢？\n答：")
    glm1_engine.reset()
    glm1_engine.prefill(ids)
    seq = list(ids)
    errors = [rel_err(glm1_engine.logits(), reference_logits(glm1.weights, glm1.config, seq)[-1])]
    for _ in range(6):
        seq.append(int(np.argmax(glm1_engine.logits())))
        evaluated = glm1_engine.n_evaluated
        glm1_engine.step(seq[-1])
        assert glm1_engine.n_evaluated == evaluated + 1  # one token per step: the cache was used
        errors.append(rel_err(glm1_engine.logits(), reference_logits(glm1.weights, glm1.config, seq)[-1]))
    assert max(errors) < REL, errors


@pytest.mark.parametrize("shape", ["no_sop", "mask_not_gmask", "sop_mid"])
def test_position_variants_match_reference(glm1, glm1_engine, shape):
    """The context-only sequence (the tokenizer's convention), [MASK] instead of [gMASK], text after <sop>."""
    words = glm1.tok.encode("一二三四五 six seven")
    ids = {"no_sop": words + [glm1.ids["gmask"]],
           "mask_not_gmask": words[:3] + [glm1.ids["mask"]] + words[3:] + [glm1.ids["bos"]] + words[:4],
           "sop_mid": words + [glm1.ids["gmask"], glm1.ids["bos"]] + words}[shape]
    assert rel_err(glm1_engine.all_logits(ids), reference_logits(glm1.weights, glm1.config, ids)) < REL


def test_chunked_prefill_equals_one_pass(glm1, glm1_gguf):
    """Chunks of 3 after the context (which stays whole) give the logits of a single pass."""
    ids = chat_ids(glm1, "春眠不觉晓") + glm1.tok.encode("处处闻啼鸟。夜来风雨声，花落知多少。")
    with open_engine(glm1_gguf, n_ctx=128, n_threads=1, kv_type="f32") as engine:
        engine.n_batch = 3
        chunked = engine.all_logits(ids)
        assert engine.timing.n_tokens <= 3
    want = reference_logits(glm1.weights, glm1.config, ids)
    assert rel_err(chunked, want) < REL


def test_changed_context_invalidates_the_cache(glm1, glm1_engine):
    reply = glm1.tok.encode("好的")
    first = chat_ids(glm1, "第一个问题") + reply
    glm1_engine.reset()
    glm1_engine.prefill(first)
    # Same context, different reply: the context and <sop> stay cached (and any piece both replies start with).
    second = first[:-len(reply)] + glm1.tok.encode("不")
    assert glm1_engine.reusable(second) == common_prefix(first, second) >= len(first) - len(reply)
    # One more context token before [gMASK]: every cached token attended to the old context.
    third = chat_ids(glm1, "第一个问题吗")
    assert glm1_engine.reusable(third) == 0
    before = glm1_engine.n_evaluated
    glm1_engine.prefill(third)
    assert glm1_engine.n_evaluated - before == len(third)
    assert rel_err(glm1_engine.logits(), reference_logits(glm1.weights, glm1.config, third)[-1]) < REL


@pytest.mark.parametrize("kv_type, tolerance", [("f16", 2e-3), ("bf16", 2e-2)])
def test_half_precision_cache_stays_close(glm1, glm1_gguf, kv_type, tolerance):
    ids = chat_ids(glm1, "量化可以减少显存占用。")
    with open_engine(glm1_gguf, n_ctx=64, n_threads=1, kv_type=kv_type) as engine:
        got = engine.all_logits(ids)
    assert rel_err(got, reference_logits(glm1.weights, glm1.config, ids)) < tolerance


# ------------------------------------------------------------------------------------------ every weight type
@pytest.fixture(scope="module")
def wide(glm1_dir, ice_model):
    """Rows of 256 (k-quant blocks) and 2 layers: quantized weights of every kind stay cheap."""
    return tiny_glm1_checkpoint(glm1_dir / "wide", ice_model, seed=3, hidden_size=256, inner_hidden_size=512,
                                num_layers=2, num_attention_heads=2, tied=True)


def dequantized_weights(path, config) -> dict[str, np.ndarray]:
    """The GGUF's tensors dequantized by gguf-py, under the published names (what the engine really multiplies)."""
    names = {}
    for kind, source in TENSOR_MAP.items():
        for bid in range(config["num_layers"]) if kind in LAYER_KINDS else [None]:
            fmt = {} if bid is None else {"bid": bid}
            for suffix in (".weight", ".bias"):
                names[gguf.TENSOR_NAMES[kind].format(**fmt) + suffix] = source.format(**fmt) + suffix
    header = read_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, t in header.tensors.items():
        shape = tuple(reversed(t.shape))  # numpy order
        raw = np.array(data[header.data_offset + t.offset:][:t.nbytes]).reshape(shape[:-1] + (-1,))
        out[names[name]] = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(t.ggml_type)).reshape(shape)
    return out


@pytest.mark.parametrize("qtype", ["f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_m", "q4_k_m",
                                   "q5_k_s", "q6_k", "iq4_nl", "iq4_xs"])
def test_every_weight_type_runs_the_reference(wide, glm1_dir, qtype):
    folder, config, _ = wide
    path = convert(folder, glm1_dir / f"wide-{qtype}.gguf", qtype).path
    types = {t.ggml_type for t in read_header(path).tensors.values()}
    assert types - {gguf.GGMLQuantizationType.F32}  # something is stored quantized (or half precision)
    ids = [5, 17, 40, 99, config["gmask_token_id"], config["bos_token_id"], 33, 71]
    want = reference_logits(dequantized_weights(path, config), config, ids)
    with open_engine(path, n_ctx=32, n_threads=1, kv_type="f32") as engine:
        got = engine.all_logits(ids)
    # Activations are rounded to the weights' dot-product type (q8 blocks, f16, bf16) before each matmul.
    assert rel_err(got, want) < {"f16": 5e-4, "bf16": 5e-3}.get(qtype, 1e-2)


def test_repacked_and_mapped_weights_agree(wide, glm1_dir):
    folder, config, _ = wide
    path = glm1_dir / "wide-q4_0.gguf"
    if not path.exists():
        convert(folder, path, "q4_0")
    ids = [5, 17, 40, config["gmask_token_id"], config["bos_token_id"], 9]
    with open_engine(path, n_ctx=16, n_threads=1, kv_type="f32") as engine:
        fast = engine.all_logits(ids)
        repacked = engine.model.repacked
    from chatglm.runtime.glm1.engine import GLM1Engine
    from chatglm.runtime.loader import describe

    header = read_header(path)
    with GLM1Engine(header, describe(header), n_ctx=16, n_threads=1, kv_type="f32", repack=False) as engine:
        plain = engine.all_logits(ids)
        assert engine.model.repacked == 0
    assert rel_err(fast, plain) < 1e-2
    assert repacked >= 0  # CPUs without a repacked q4_0 kernel map every weight

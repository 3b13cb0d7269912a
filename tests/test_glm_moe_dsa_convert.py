"""GLM-5.x (``GlmMoeDsaForCausalLM`` → llama.cpp ``glm-dsa``) proven against transformers.

A tiny random model made with transformers' own class (MLA, a 16-head lightning indexer with ``index_topk`` 8 and a
"shared" layer, GLM-4.5 experts after one dense layer, an MTP layer), saved as users get it (sharded safetensors),
converted to f32 and run by llama.cpp with an f32 KV cache: logits over every position of a sequence longer than
``index_topk`` (so the sparse path selects), greedy ids, incremental decoding and KV-cache reuse.
"""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest

from chatglm.convert.pipeline import convert
from chatglm.devtools.checkpoints import greedy_generate
from chatglm.devtools.glm4 import reference_logits, special_ids, train_glm4_bpe
from chatglm.devtools.glm_moe_dsa import build_dsa_checkpoint
from chatglm.gguf_file import read_header
from chatglm.runtime.loader import open_engine
from chatglm.runtime.memory import estimate

from test_hostile_vocab import REFERENCE

TEXT = "你好, world! 今天天气很好。 def f(x):\n\treturn x * 2  # 加法 and more words to pass the top-k"


@pytest.fixture(scope="module")
def tok():
    return train_glm4_bpe()


@pytest.fixture(scope="module")
def dsa(tok, tmp_path_factory):
    """(transformers model, checkpoint folder, f32 GGUF)."""
    root = tmp_path_factory.mktemp("dsa")
    model, folder = build_dsa_checkpoint(root / "ck", tok, seed=3)
    result = convert(folder, root / "dsa-f32.gguf", "f32")
    assert (result.arch, result.family) == ("glm-dsa", "glm5")
    return model, folder, result.path


def prompt(tok) -> list[int]:
    ids = special_ids(tok)
    body = tok.encode(TEXT, add_special_tokens=False).ids
    return [ids["[gMASK]"], ids["<sop>"], ids["<|user|>"], *body, ids["<|assistant|>"]]


def relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def f32_engine(path, n_ctx=256):
    return open_engine(path, n_ctx=n_ctx, n_threads=1, kv_type="f32", flash_attn=False)


def test_metadata_keeps_mtp_and_indexer(dsa):
    model, folder, path = dsa
    cfg = json.loads((folder / "config.json").read_text())
    assert (folder / "model.safetensors.index.json").is_file() and "rope_parameters" in cfg
    header = read_header(path)
    n = model.config.num_hidden_layers
    assert header.arch_get("block_count") == n + 1 and header.arch_get("nextn_predict_layers") == 1
    assert header.arch_get("attention.head_count_kv") == 1
    assert header.arch_get("attention.key_length") == 32 + 8 and header.arch_get("attention.value_length") == 32
    assert header.arch_get("attention.key_length_mla") == 24 and header.arch_get("attention.value_length_mla") == 16
    assert header.arch_get("attention.q_lora_rank") == 48 and header.arch_get("attention.kv_lora_rank") == 32
    assert header.arch_get("attention.indexer.head_count") == 16
    assert header.arch_get("attention.indexer.key_length") == 64 and header.arch_get("attention.indexer.top_k") == 8
    assert header.arch_get("attention.indexer.types") == [True, False, True]
    assert header.arch_get("expert_gating_func") == 2 and header.arch_get("leading_dense_block_count") == 1
    assert header.arch_get("expert_weights_scale") == pytest.approx(2.5)
    t = header.tensors
    assert t["blk.0.attn_k_b.weight"].shape == (16, 32, 4) and t["blk.0.attn_v_b.weight"].shape == (32, 16, 4)
    assert "blk.0.indexer.attn_q_b.weight" in t and "blk.1.indexer.attn_q_b.weight" not in t  # layer 1: shared
    assert t["blk.0.indexer.k_norm.bias"].shape == (64,)
    assert {f"blk.{n}.nextn.eh_proj.weight", f"blk.{n}.nextn.shared_head_norm.weight",
            f"blk.{n}.ffn_gate_exps.weight", f"blk.{n}.nextn.embed_tokens.weight"} <= set(t)


def test_logits_greedy_incremental_and_reuse(tok, dsa):
    model, _, path = dsa
    seq = prompt(tok)
    assert len(seq) > 3 * model.config.index_topk
    ref = reference_logits(model, seq)
    with f32_engine(path) as engine:
        assert engine.tokenize(TEXT) == seq[3:-1]
        assert relative(engine.all_logits(seq), ref) < 1e-4  # every position
        engine.reset()
        split = len(seq) - 6
        engine.prefill(seq[:split])
        rows = [engine.logits().copy()]
        for token in seq[split:]:  # one token at a time on the cache
            engine.step(token)
            rows.append(engine.logits().copy())
        assert relative(np.stack(rows), ref[split - 1:]) < 1e-4
        # a second turn reusing the cache: only the new tokens are evaluated, and the result is a fresh prefill's
        engine.reset()
        engine.prefill(seq[:20])
        assert engine.prefill(seq) == len(seq) - 20
        assert relative(engine.logits()[None], ref[-1:]) < 1e-4
        # greedy: 32 steps equal to transformers' generate without sampling
        expected = greedy_generate(model, seq, stop_ids=(), max_new_tokens=32)
        engine.reset()
        engine.prefill(seq)
        got = []
        for _ in range(32):
            got.append(int(np.argmax(engine.logits())))
            engine.step(got[-1])
        assert got == expected


def test_bf16_sharded_checkpoint(tok, tmp_path):
    model, folder = build_dsa_checkpoint(tmp_path / "ck", tok, seed=5, dtype="bfloat16", shards=3,
                                         indexer_types=["full", "full", "full"])
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    path = convert(folder, tmp_path / "bf16.gguf", "f32").path
    seq = prompt(tok)
    with f32_engine(path) as engine:
        assert relative(engine.all_logits(seq), reference_logits(model, seq)) < 1e-4


# Rows of 16-64 values quantize coarsely, and a perturbed indexer score or router logit flips a discrete choice
# (the sparse top-k, an expert): measured median row errors 0.045 (q8_0) and 0.21 (q4_k_m), worst rows 0.45 / 0.77.
@pytest.mark.parametrize("qtype,bound", [("q8_0", 0.1), ("q4_k_m", 0.4)])
def test_quantized_loads_and_generates(tok, dsa, tmp_path, qtype, bound):
    model, folder, _ = dsa
    path = convert(folder, tmp_path / f"dsa-{qtype}.gguf", qtype).path
    seq = prompt(tok)
    with open_engine(path, n_ctx=256, n_threads=1) as engine:
        logits, ref = engine.all_logits(seq), reference_logits(model, seq)
        assert np.isfinite(logits).all()
        assert np.median(np.abs(logits - ref).max(axis=-1)) / np.abs(ref).max() < bound
        engine.reset()
        engine.prefill(seq)
        engine.step(int(np.argmax(engine.logits())))
        assert np.isfinite(engine.logits()).all()


@pytest.mark.parametrize("flash", [False, True])
def test_memory_estimate_counts_mla_and_indexer_caches(dsa, caplog, flash):
    _, _, path = dsa
    n_ctx, kv_type = 32768, "f32" if not flash else "f16"
    est = estimate(read_header(path), n_ctx, kv_type, flash_attn=flash)
    # 3 trunk layers x (kv_lora 32 + rope 8) + 2 full indexer layers x 64 per token, K only (V is a view of K)
    assert est.kv_cache == (3 * 40 + 2 * 64) * (4 if kv_type == "f32" else 2) * n_ctx
    with caplog.at_level(logging.DEBUG, logger="llama.cpp"):
        with open_engine(path, n_ctx=n_ctx, n_threads=1, kv_type=kv_type, flash_attn=flash):
            pass

    def mib(what: str) -> float:
        return sum(float(m.group(1)) for r in caplog.records
                   if (m := re.search(what + r" size = +([\d.]+) MiB", r.getMessage())))

    assert est.kv_cache / 2**20 == pytest.approx(mib("KV buffer"), rel=0.01)  # the MLA cache and the indexer's
    measured = mib("KV buffer") + mib("compute buffer") + mib("output buffer")
    assert (est.kv_cache + est.compute) / 2**20 == pytest.approx(measured, rel=0.1)


GLM_53 = REFERENCE / "configs" / "GLM-5.3" / "config.json"
TINY_WIDTHS = {"hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_attention_heads": 4,
               "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
               "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8, "index_topk": 8,
               "max_position_embeddings": 1048576}


@pytest.mark.skipif(not GLM_53.is_file(), reason=f"{GLM_53} not found (set CHATGLM_REFERENCE)")
def test_glm_5_3_config_keys(tok, tmp_path):
    """GLM-5.3's own config.json, widths cut down and 5 layers kept (3 dense, its indexer pattern full, full, full,
    shared, shared): its keys as they are, a 1M context (where llama.cpp would otherwise guess GLM-5.2's pattern),
    the real indexer (32 heads of 128)."""
    real = json.loads(GLM_53.read_text())
    n = 5
    cfg = {k: v for k, v in real.items() if k not in ("architectures", "model_type", "transformers_version",
                                                      "dtype", "head_dim", "qk_head_dim", "vocab_size",
                                                      "rope_parameters")}
    cfg.update(TINY_WIDTHS, num_hidden_layers=n, indexer_types=real["indexer_types"][:n],
               mlp_layer_types=real["mlp_layer_types"][:n], eos_token_id=None, pad_token_id=None,
               rope_theta=real["rope_parameters"]["rope_theta"])
    assert cfg["first_k_dense_replace"] == 3 and cfg["index_n_heads"] == 32 and cfg["index_head_dim"] == 128
    model, folder = build_dsa_checkpoint(tmp_path / "ck", tok, seed=13, **cfg)
    saved = json.loads((folder / "config.json").read_text())
    assert saved["scoring_func"] == "sigmoid" and saved["rope_parameters"]["rope_theta"] == 8000000
    path = convert(folder, tmp_path / "glm53.gguf", "f32").path
    header = read_header(path)
    assert header.arch_get("attention.indexer.types") == [True, True, True, False, False]
    assert header.arch_get("leading_dense_block_count") == 3 and header.arch_get("block_count") == n + 1
    seq = prompt(tok)
    with f32_engine(path) as engine:
        assert relative(engine.all_logits(seq), reference_logits(model, seq)) < 1e-4

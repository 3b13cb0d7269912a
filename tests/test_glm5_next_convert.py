"""GLM-5.3-Flash (``glm5_next`` -> llama.cpp ``glm5-next``): what llama.cpp runs from our GGUF is transformers' model.

The tiny checkpoint (tests/fixtures_glm5_next.py) has both layer kinds, a shared-indexer layer, experts, the NextN
layer and the vision tower; its test sequence is longer than index_topk, the k-pool and the 64-token KDA chunk.
"""

from __future__ import annotations

import re

import gguf
import numpy as np
import pytest
import torch

from chatglm.convert import qtypes
from chatglm.convert.pipeline import convert
from chatglm.gguf_file import read_header
from chatglm.runtime.memory import estimate
from chatglm.runtime.model import load
from fixtures_glm5_next import glm5, rewrite_gguf  # noqa: F401  (fixture)
from tests.hostile import cli
from test_logits_glm import rel_err
from test_memory import native_log  # noqa: F401  (fixture)
from test_qtypes import llama_quantize

TOL = 1e-4


@pytest.fixture(scope="module")
def engine(glm5):
    with load(glm5.gguf, n_ctx=512, kv_type="f32", n_threads=2) as m:
        yield m.engine


def test_metadata_and_tensors_follow_llama_cpp_layout(glm5):
    reader = gguf.GGUFReader(glm5.gguf)
    kv = {name: f.contents() for name, f in reader.fields.items()}
    names = {t.name for t in reader.tensors}
    assert kv["general.architecture"] == "glm5-next"
    assert kv["glm5-next.block_count"] == 5 and kv["glm5-next.nextn_predict_layers"] == 1
    assert kv["glm5-next.attention.head_count_kv"] == [0, 1, 1, 0, 1]  # 0: linear attention; NextN is latent
    assert kv["glm5-next.attention.indexer.types"] == [True, True, False, True]
    assert kv["glm5-next.rope.dimension_count"] == 0 and kv["glm5-next.attention.key_length"] == 32
    assert kv["glm5-next.kda.gate_lower_bound"] == -5.0 and kv["glm5-next.hyper_connection.count"] == 4
    assert kv["glm5-next.swiglu_clamp_exp"] == [3.0] * 5
    assert {"blk.4.nextn.eh_proj.weight", "blk.4.nextn.shared_head_norm.weight", "blk.1.indexer.attn_k.weight",
            "blk.0.ssm_conv1d_q.weight", "blk.3.ssm_a"} <= names
    assert not any(n.startswith("blk.2.indexer") or n.startswith("blk.4.hc_") or "visual" in n for n in names)
    a_log = glm5.model.model.language_model.layers[0].self_attn.forget_gate.A_log.detach().numpy()
    ssm_a = next(t for t in reader.tensors if t.name == "blk.0.ssm_a").data
    np.testing.assert_array_equal(ssm_a, -np.exp(a_log))


def test_logits_match_transformers_at_every_position(glm5, engine):
    got = engine.all_logits(glm5.ids)
    assert got.shape == glm5.ref.shape
    assert rel_err(got, glm5.ref) < TOL


@pytest.mark.parametrize("change", [{"attention.indexer.top_k": 256},  # every token selected: not sparse
                                    {"swiglu_clamp_exp": None, "swiglu_clamp_shexp": None}])  # no SwiGLU clamps
def test_the_sparse_selection_and_the_clamps_are_exercised(glm5, tmp_path, change):
    """The logits test would pass vacuously if the sequence were too short to select, or no activation clamped."""
    path = rewrite_gguf(glm5.gguf, tmp_path / "changed.gguf", {f"glm5-next.{k}": v for k, v in change.items()})
    with load(path, n_ctx=256, kv_type="f32", n_threads=2) as m:
        assert rel_err(m.engine.all_logits(glm5.ids), glm5.ref) > 0.05


def test_info_says_the_nextn_layer_is_kept(glm5):
    outcome = cli(["info", glm5.gguf])
    assert outcome.code == 0 and "MTP layers     1 (NextN blocks usable for speculative decoding" in outcome.out


def test_greedy_ids_match_transformers_generate(glm5, engine):
    prompt = glm5.ids[:20]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        theirs = glm5.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                     min_new_tokens=32, eos_token_id=None, pad_token_id=None)[0, len(prompt):].tolist()
    engine.reset()
    engine.prefill(prompt)
    mine = []
    for _ in range(32):
        mine.append(int(np.argmax(engine.logits())))
        engine.step(mine[-1])
    assert mine == theirs


def test_incremental_decoding_equals_a_full_pass(glm5, engine):
    full = engine.all_logits(glm5.ids)
    split = 30
    engine.reset()
    assert engine.prefill(glm5.ids[:split]) == split
    rows = [engine.logits().copy()]
    for tok in glm5.ids[split:-1]:
        engine.step(tok)
        rows.append(engine.logits().copy())
    assert rel_err(np.stack(rows), full[split - 1:-1]) < TOL
    assert rel_err(np.stack(rows), glm5.ref[split - 1:-1]) < TOL


def test_second_turn_reuses_the_cache_and_equals_a_fresh_prefill(glm5, engine):
    """Turn 1, a greedy reply, then turn 2 on top: only the new tokens are evaluated, and the logits (KV cache and
    recurrent state carried over) equal a prefill of the whole conversation from nothing."""
    turn1, turn2 = glm5.ids[:25], glm5.ids[25:45]
    engine.reset()
    engine.prefill(turn1)
    reply = []
    for _ in range(8):
        reply.append(int(np.argmax(engine.logits())))
        engine.step(reply[-1])
    conversation = turn1 + reply + turn2
    assert engine.prefill(conversation) == len(turn2)
    reused = engine.logits().copy()
    fresh = engine.all_logits(conversation)[-1]
    assert rel_err(reused[None], fresh[None]) < 1e-5


def test_a_shorter_prompt_starts_the_recurrent_state_over(glm5, engine):
    """llama.cpp cannot roll a linear-attention state back: a prompt that drops cached tokens is evaluated again."""
    engine.reset()
    engine.prefill(glm5.ids[:60])
    assert engine.prefill(glm5.ids[:40]) == 40
    assert rel_err(engine.logits()[None], glm5.ref[39:40]) < TOL


@pytest.mark.parametrize("qtype", ["q4_k_m", "q8_0"])
def test_quantized_types_and_bytes_equal_llama_quantize(glm5, workdir, qtype):
    """Our one-step conversion equals llama-quantize run on our f32 GGUF, tensor by tensor; the file loads and
    generates."""
    ftype = {"q4_k_m": gguf.LlamaFileType.MOSTLY_Q4_K_M, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    mine = convert(glm5.ckpt, workdir / f"glm5-next-{qtype}.gguf", qtype).path
    theirs = workdir / f"glm5-next-{qtype}-llama.gguf"
    llama_quantize(glm5.gguf, theirs, int(ftype))
    ours = {t.name: t for t in gguf.GGUFReader(mine).tensors}
    ref = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert sorted(ours) == sorted(ref)
    wrong = {n: (ref[n].tensor_type.name, t.tensor_type.name) for n, t in ours.items()
             if t.tensor_type != ref[n].tensor_type}
    assert not wrong, f"(llama-quantize, ours): {wrong}"
    assert [n for n, t in ours.items() if t.data.tobytes() != ref[n].data.tobytes()] == []
    assert ours["blk.1.attn_q_a.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # glm5-next's Q8_0 floor
    assert ours["blk.0.ssm_f_a.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # kept as it is
    with load(mine, n_ctx=256, n_threads=2) as m:
        m.engine.prefill(glm5.ids[:20])
        for _ in range(4):
            m.engine.step(int(np.argmax(m.engine.logits())))
        assert np.isfinite(m.engine.logits()).all()


@pytest.fixture(scope="module")
def wide(workdir):
    """A 256-wide variant (no reference logits needed) whose rows fit k-quant blocks, so the recipes' rules, not
    their shape fallbacks, decide."""
    from chatglm.devtools import glm5_next
    from chatglm.devtools.glm4 import GLM4_SPECIALS, GLM45_EXTRA_SPECIALS, train_glm4_bpe

    tok = train_glm4_bpe(vocab_size=400, specials=GLM4_SPECIALS + GLM45_EXTRA_SPECIALS)
    model = glm5_next.tiny_model(tok.get_vocab_size() + 7, seed=4, hidden_size=256, q_lora_rank=256,
                                 kv_lora_rank=256, index_head_dim=32, linear_head_dim=64, qk_nope_head_dim=64,
                                 v_head_dim=64, moe_intermediate_size=256, intermediate_size=512,
                                 vision={"out_hidden_size": 256})  # the tower feeds the 256-wide model
    ckpt = glm5_next.save_checkpoint(model, workdir / "glm5-next-wide", tok, shard_size="2MB")
    return ckpt, convert(ckpt, workdir / "glm5-next-wide-f32.gguf", "f32", mmproj=False).path


@pytest.mark.parametrize("qtype", ["q4_k_m", "q3_k_m", "mxfp4_moe"])
def test_types_equal_llama_quantize_when_rows_fit_the_blocks(wide, workdir, qtype):
    ckpt, f32 = wide
    mine = convert(ckpt, workdir / f"wide-{qtype}.gguf", qtype, mmproj=False).path
    theirs = workdir / f"wide-{qtype}-llama.gguf"
    llama_quantize(f32, theirs, int(qtypes.get_recipe(qtype).ftype))
    ref = {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs).tensors}
    ours = {t.name: t.tensor_type.name for t in gguf.GGUFReader(mine).tensors}
    assert ours == ref
    assert len(set(ours.values())) >= 3  # kept f32, the Q8_0 floor and the recipe's own types all occur


def test_softplus_gate_and_a_tied_flag_with_its_own_head(glm5, workdir):
    """Without ``linear_lower_bound`` the decay is -exp(A_log) * softplus(g) (llama.cpp: no gate_lower_bound key);
    a text_config saying tie_word_embeddings beside a saved lm_head (transformers ties by the outer config)
    keeps that head."""
    from chatglm.devtools import glm5_next
    from chatglm.devtools.glm4 import GLM4_SPECIALS, GLM45_EXTRA_SPECIALS, train_glm4_bpe

    tok = train_glm4_bpe(vocab_size=400, specials=GLM4_SPECIALS + GLM45_EXTRA_SPECIALS)
    model = glm5_next.tiny_model(tok.get_vocab_size() + 7, seed=3, linear_lower_bound=None, tie_word_embeddings=True)
    ckpt = glm5_next.save_checkpoint(model, workdir / "glm5-next-softplus", tok, nextn=False)
    path = convert(ckpt, workdir / "glm5-next-softplus.gguf", "f32", mmproj=False).path  # no image tokens
    assert "glm5-next.kda.gate_lower_bound" not in gguf.GGUFReader(path).fields
    ids = glm5.ids[:24]
    with load(path, n_ctx=256, kv_type="f32", n_threads=2) as m:
        assert rel_err(m.engine.all_logits(ids), glm5_next.reference_logits(model, ids)) < TOL



@pytest.mark.parametrize("n_ctx,kv_type,flash", [(512, "f16", True), (8192, "f16", True), (8192, "f32", False)])
def test_memory_estimate_matches_llama_cpp_buffers(glm5, native_log, n_ctx, kv_type, flash):
    """Latent and indexer caches per token, the linear-attention states once, and the compute buffer."""
    est = estimate(read_header(glm5.gguf), n_ctx, kv_type, flash_attn=flash)
    with load(glm5.gguf, n_ctx=n_ctx, kv_type=kv_type, flash_attn=flash, n_threads=1):
        caches = [float(m.group(1)) for line in native_log.lines
                  if (m := re.search(r"(?:KV|RS) buffer size = +([\d.]+) MiB", line))]
        compute = native_log.mib("compute buffer") + native_log.mib("output buffer")
    assert len(caches) == 3  # latent cache, recurrent states, indexer cache
    assert est.kv_cache / 2**20 == pytest.approx(sum(caches), rel=0.02, abs=0.01)
    assert est.compute / 2**20 == pytest.approx(compute, rel=0.10)

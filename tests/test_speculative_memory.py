"""Speculative decoding in the memory estimate: the draft model (its tensors, its KV cache at the model's context)
and the MTP context (the NextN layer's cache), against the GGUF's own bytes, the KV formula and llama.cpp's buffers."""

from __future__ import annotations

import json

import gguf
import pytest

from chatglm.gguf_file import read_header
from chatglm.runtime.memory import estimate, padded_context, speculation_estimate
from chatglm.runtime.model import load
from chatglm.runtime.speculative import SpeculativeConfig, memory_estimate

from hostile import cli
from test_memory import native_log  # noqa: F401  (fixture)
from test_speculative import glm4_ggufs, glm45, glm45_gguf  # noqa: F401  (fixtures)

SETTINGS = dict(n_threads=1, kv_type="f16", flash_attn=True)


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def kv_formula(path, n_ctx: int, layers: str = "trunk") -> int:
    """K and V in f16 of every cached layer, from the GGUF's own metadata (read with gguf-py, not our reader)."""
    r = gguf.GGUFReader(path)
    arch = field(r, "general.architecture")
    n_block = field(r, f"{arch}.block_count")
    nextn = field(r, f"{arch}.nextn_predict_layers") if f"{arch}.nextn_predict_layers" in r.fields else 0
    n_layer = n_block - nextn if layers == "trunk" else nextn
    n_head = field(r, f"{arch}.attention.head_count")
    n_kv = field(r, f"{arch}.attention.head_count_kv")
    n_embd = field(r, f"{arch}.embedding_length")
    head_k = field(r, f"{arch}.attention.key_length") if f"{arch}.attention.key_length" in r.fields \
        else n_embd // n_head
    head_v = field(r, f"{arch}.attention.value_length") if f"{arch}.attention.value_length" in r.fields else head_k
    return padded_context(n_ctx) * n_layer * n_kv * (head_k + head_v) * 2


@pytest.mark.parametrize("n_ctx", [256, 1000])
def test_draft_model_counted(glm4_ggufs, n_ctx):
    target, draft = glm4_ggufs["glm4-0414"], glm4_ggufs["other"]
    spec = SpeculativeConfig(draft=draft, draft_max=4)
    est = memory_estimate(read_header(target), spec, n_ctx)
    tensor_bytes = sum(int(t.n_bytes) for t in gguf.GGUFReader(draft).tensors)
    assert est.draft.weights == tensor_bytes
    assert est.draft.kv_cache == kv_formula(draft, n_ctx) > 0
    assert est.draft == estimate(read_header(draft), n_ctx)  # the same context and KV type as the model's
    vocab = len(read_header(target).get("tokenizer.ggml.tokens"))
    assert est.outputs == 4 * vocab * 4  # a verification's logits beyond the model's own row
    assert est.total == est.draft.total + est.outputs and est.resident == est.total - tensor_bytes


def test_mtp_context_counted(glm45_gguf):
    header = read_header(glm45_gguf)
    est = speculation_estimate(header, 1000, mtp=True, n_max=1, n_batch=512)
    assert est.draft is None
    assert est.mtp_kv == kv_formula(glm45_gguf, 1000, layers="nextn") > 0
    n_embd, vocab = header.arch_get("embedding_length"), len(header.get("tokenizer.ggml.tokens"))
    assert est.mtp_states == 1000 * n_embd * 4
    assert est.outputs == 511 * vocab * 4 + 512 * n_embd * 4  # logits and hidden state of a whole batch


def test_draft_and_mtp_kv_match_llama_cpp(glm4_ggufs, glm45_gguf, native_log):
    """llama.cpp logs each context's KV buffer as it makes it: the draft model's and the MTP context's come last."""
    target, draft = glm4_ggufs["glm4-0414"], glm4_ggufs["other"]
    with load(target, n_ctx=1024, draft=draft, draft_max=4, **SETTINGS):
        logged = native_log.mib("KV buffer")
    est = memory_estimate(read_header(target), SpeculativeConfig(draft=draft, draft_max=4), 1024)
    assert est.draft.kv_cache / 2**20 == pytest.approx(logged, rel=0.01)
    native_log.lines.clear()
    with load(glm45_gguf, n_ctx=4096, mtp=True, **SETTINGS):
        logged = native_log.mib("KV buffer")  # printed with two decimals
    est = memory_estimate(read_header(glm45_gguf), SpeculativeConfig(mtp=True), 4096)
    assert est.mtp_kv / 2**20 == pytest.approx(logged, abs=0.006)


def test_info_draft_json_and_text(glm4_ggufs):
    target, draft = glm4_ggufs["glm4-0414"], glm4_ggufs["other"]
    plain = json.loads(cli(["info", str(target), "-c", "512", "--json"]).out)
    r = cli(["info", str(target), "-c", "512", "--json", "--draft", str(draft)])
    assert r.code == 0, r.err
    d = json.loads(r.out)
    spec = d["speculation"]
    assert spec["draft"]["weights"] == sum(int(t.n_bytes) for t in gguf.GGUFReader(draft).tensors)
    assert spec["draft"]["kv_cache"] == kv_formula(draft, 512)
    assert d["memory"]["total"] == plain["memory"]["total"] + spec["total"]
    text = cli(["info", str(target), "-c", "512", "--draft", str(draft)]).out
    assert "draft model" in text and str(draft) in text


def test_info_draft_of_another_vocabulary_refused(glm4_ggufs, glm3_gguf):
    r = cli(["info", str(glm4_ggufs["glm4"]), "--draft", str(glm3_gguf)])
    assert r.code == 2 and "cannot draft for" in r.err and len(r.err.strip().splitlines()) == 1


def test_run_verbose_estimate_counts_the_draft(glm4_ggufs):
    target, draft = glm4_ggufs["glm4-0414"], glm4_ggufs["other"]
    r = cli(["run", str(target), "--draft", str(draft), "-c", "256", "-p", "hi", "-n", "2", "--verbose"])
    assert r.code == 0, r.err
    line = next(x for x in r.err.splitlines() if x.startswith("[memory:"))
    assert "speculation" in line and "draft model" in line


def test_fit_check_before_loading_counts_the_draft(glm4_ggufs, monkeypatch):
    """Memory for the model alone but not for its draft model beside it: refused before anything loads."""
    from chatglm.errors import InputError
    from chatglm.runtime import memory

    target, draft = glm4_ggufs["glm4-0414"], glm4_ggufs["other"]
    alone = estimate(read_header(target), 1024, "f16", flash_attn=True)
    extra = memory_estimate(read_header(target), SpeculativeConfig(draft=draft, draft_max=4), 1024).resident
    monkeypatch.setattr(memory, "available_memory", lambda: alone.kv_cache + alone.buffers + extra // 2)
    with load(target, n_ctx=1024, **SETTINGS):
        pass
    with pytest.raises(InputError, match="a context of 1024 tokens needs about"):
        load(target, n_ctx=1024, draft=draft, draft_max=4, **SETTINGS)

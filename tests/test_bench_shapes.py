"""The benchmarks' weightless checkpoints: every shape of the tables converts, and is detected as its family.

Real shapes are planned by their family's converter (detection, the declared-count and shape checks, the tensor
plan) and written as a GGUF header; the tiny cuts are converted in full and loaded. A row whose family is not
registered yet must say so (NotMerged), and runs for real once it is.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_models  # noqa: E402
from shapes import (NEW, NEW_SMALL, REAL, REFERENCE_CONFIGS, SMALL, NotMerged, family_for,  # noqa: E402
                    weightless_checkpoint)

from chatglm import families  # noqa: E402
from chatglm.convert.checkpoint import Checkpoint  # noqa: E402
from chatglm.devtools.weightless import WeightlessCheckpoint, save_safetensors  # noqa: E402

REAL_ROWS = {**REAL, **NEW}
SMALL_ROWS = {**SMALL, **NEW_SMALL}


@pytest.fixture(scope="module")
def stubs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stubs")


@pytest.fixture(autouse=True)
def _stub_root(monkeypatch, stubs):
    monkeypatch.setattr(bench_models, "CACHE", stubs)  # build_gguf keeps its stubs here, not in benchmarks/.cache


def _merged(shape) -> bool:
    if shape.name == "GLM-5.3" and not (REFERENCE_CONFIGS / "GLM-5.3" / "config.json").is_file():
        pytest.skip(f"GLM-5.3's config.json not found under {REFERENCE_CONFIGS} (set CHATGLM_REFERENCE)")
    return shape.registry in families.REGISTRY


@pytest.mark.parametrize("name", list(REAL_ROWS))
def test_real_shape_plans_and_writes_a_header(name, stubs):
    shape = REAL_ROWS[name]
    if not _merged(shape):
        with pytest.raises(NotMerged, match="not merged yet"):
            family_for(shape, stubs)
        return
    family = family_for(shape, stubs)
    assert isinstance(family, families.part(shape.registry, "convert").CONVERTER)
    header = bench_models.build_gguf(shape, "q4_k_m", stubs / "out", header_only=True)
    assert header.read_bytes()[:4] == b"GGUF"
    names = {t.name for t in family.tensors()}
    assert f"blk.{family.hp.n_layer - 1}.attn_norm.weight" in names and "token_embd.weight" in names


@pytest.mark.parametrize("name", list(NEW))
def test_real_shape_keeps_published_widths_and_an_mtp_layer(name, stubs):
    shape = NEW[name]
    if not _merged(shape):
        with pytest.raises(NotMerged):
            weightless_checkpoint(shape, stubs)
        return
    ckpt = weightless_checkpoint(shape, stubs)
    published = shape.published()
    text = published.get("text_config", published)
    n_layer = ckpt.config.get("text_config", ckpt.config)["num_hidden_layers"]
    assert n_layer == shape.cut["num_hidden_layers"] < text.get("num_hidden_layers", 10 ** 6)
    names = ckpt.names()
    assert any(n.endswith(f"layers.{n_layer}.eh_proj.weight") for n in names)  # the MTP layer, published layout
    embed = next(n for n in names if n.endswith("embed_tokens.weight"))
    assert ckpt.info(embed).shape[1] == ckpt.config.get("text_config", ckpt.config)["hidden_size"]


@pytest.mark.parametrize("name", list(SMALL_ROWS))
def test_tiny_cut_converts_and_loads(name, stubs):
    shape = SMALL_ROWS[name]
    if not _merged(shape):
        with pytest.raises(NotMerged):
            bench_models.build_gguf(shape, "q8_0", stubs / "small")
        return
    path = bench_models.build_gguf(shape, "q8_0", stubs / "small")
    from chatglm.runtime.loader import open_engine

    engine = open_engine(path, n_ctx=64, n_threads=1)
    try:
        engine.prefill([5, 6, 7, 8])
        logits = np.array(engine.logits())
        assert logits.shape == (engine.info.n_vocab,) and np.isfinite(logits).all()
    finally:
        engine.close()


def test_weightless_reads_stream_and_repeat(stubs):
    ckpt = weightless_checkpoint(SMALL["chatglm3-6b"], stubs)
    name = "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight"
    whole = ckpt.load(name)
    assert whole.shape == tuple(ckpt.info(name).shape) and ckpt.info(name).dtype == "BF16"
    assert np.array_equal(ckpt.load_rows(name, 300, 700), whole[300:700])  # a streamed block is the same rows
    assert np.array_equal(weightless_checkpoint(SMALL["chatglm3-6b"], stubs).load(name), whole)  # deterministic
    assert 0.5 < float(np.std(whole) * np.sqrt(whole.shape[1])) < 2.0  # N(0, 1/cols)
    norm = ckpt.load("transformer.encoder.layers.1.input_layernorm.weight")
    assert abs(float(norm.mean()) - 1.0) < 0.05


def test_saved_safetensors_hold_the_same_values_and_convert(stubs, tmp_path):
    from chatglm.convert.pipeline import convert

    stub = weightless_checkpoint(SMALL["chatglm3-6b"], stubs)
    folder = save_safetensors(stub.dir, tmp_path / "ckpt", shards=3)
    assert len(list(folder.glob("*.safetensors"))) == 3
    real = Checkpoint(folder)
    assert not isinstance(real, WeightlessCheckpoint) and sorted(real.names()) == sorted(stub.names())
    for name in ("transformer.embedding.word_embeddings.weight", "transformer.encoder.final_layernorm.weight"):
        assert np.array_equal(real.load(name), stub.load(name))
    result = convert(folder, tmp_path / "tiny.gguf", "f16")
    assert result.family == "chatglm3" and result.n_tensors == 2 * 7 + 3

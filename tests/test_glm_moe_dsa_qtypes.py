"""GLM-5.x quantization: every tensor of a converted glm-dsa file gets the type and bytes ``llama-quantize`` gives
the f32 conversion (MLA's attn_kv_a_mqa / attn_k_b / attn_v_b, the indexer's tensors, experts, the MTP block)."""

from __future__ import annotations

import gguf
import pytest

from chatglm.convert.pipeline import convert
from chatglm.convert.qtypes import get_recipe
from chatglm.devtools.glm4 import train_glm4_bpe
from chatglm.devtools.glm_moe_dsa import build_dsa_checkpoint

from test_qtypes import llama_quantize


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("dsa-q")
    _, folder = build_dsa_checkpoint(root / "ck", train_glm4_bpe(), seed=11)
    return folder, convert(folder, root / "f32.gguf", "f32").path


@pytest.mark.parametrize("recipe", ["q8_0", "q4_k_m", "q3_k_m", "q5_k_s", "q6_k", "mxfp4_moe", "iq4_nl"])
def test_types_and_bytes_match_llama_quantize(converted, tmp_path, recipe):
    folder, f32 = converted
    theirs_path = tmp_path / "theirs.gguf"
    llama_quantize(f32, theirs_path, get_recipe(recipe).ftype)
    mine = {t.name: t for t in gguf.GGUFReader(convert(folder, tmp_path / "ours.gguf", recipe).path).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
    assert sorted(mine) == sorted(theirs)
    wrong = {n: (t.tensor_type.name, mine[n].tensor_type.name) for n, t in theirs.items()
             if t.tensor_type != mine[n].tensor_type}
    assert not wrong, f"tensor: (llama-quantize, ours) {wrong}"
    assert [n for n, t in theirs.items() if t.data.tobytes() != mine[n].data.tobytes()] == []
    if recipe == "q4_k_m":  # MLA and indexer tensors are quantized (rows of 64: q4_K falls back to q5_0)
        assert mine["blk.1.attn_kv_a_mqa.weight"].tensor_type == gguf.GGMLQuantizationType.Q5_0
        assert mine["blk.0.indexer.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # attn_k rule

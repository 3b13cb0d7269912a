"""GLM-5.x quantization: every tensor of a converted glm-dsa file gets the type and bytes ``llama-quantize`` gives
the f32 conversion (MLA's attn_kv_a_mqa / attn_k_b / attn_v_b, the indexer's tensors, experts, the MTP block)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from chatglm.convert.pipeline import convert
from chatglm.convert.qtypes import ModelInfo, get_recipe, plan_types
from chatglm.devtools.glm4 import train_glm4_bpe
from chatglm.devtools.glm_moe_dsa import build_dsa_checkpoint
from chatglm.runtime.validate import HParams, MlaHParams
from chatglm.runtime.validate_tensors import expected_tensors

from test_hostile_vocab import REFERENCE
from test_qtypes import llama_dry_run_types, llama_quantize


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


GLM_53 = REFERENCE / "configs" / "GLM-5.3" / "config.json"
N_TRUNK, N_EXPERT = 6, 16  # GLM-5.3's widths; 6 of its 78 layers (3 dense) + its MTP layer; 16 experts, not 8


def glm_5_3_table() -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(metadata, tensor name -> ggml shape with rows capped at 16) of GLM-5.3 cut to N_TRUNK layers, from the
    validator's table of what llama.cpp's glm-dsa loader creates."""
    c = json.loads(GLM_53.read_text())
    a = "glm-dsa"
    full = [t == "full" for t in c["indexer_types"][:N_TRUNK]]
    kv = {f"{a}.block_count": N_TRUNK + 1, f"{a}.nextn_predict_layers": 1, f"{a}.context_length": 4096,
          f"{a}.embedding_length": c["hidden_size"], f"{a}.feed_forward_length": c["intermediate_size"],
          f"{a}.attention.head_count": c["num_attention_heads"], f"{a}.attention.head_count_kv": 1,
          f"{a}.attention.key_length": c["kv_lora_rank"] + c["qk_rope_head_dim"],
          f"{a}.attention.value_length": c["kv_lora_rank"],
          f"{a}.attention.key_length_mla": c["qk_nope_head_dim"] + c["qk_rope_head_dim"],
          f"{a}.attention.value_length_mla": c["v_head_dim"], f"{a}.attention.q_lora_rank": c["q_lora_rank"],
          f"{a}.attention.kv_lora_rank": c["kv_lora_rank"], f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
          f"{a}.rope.dimension_count": c["qk_rope_head_dim"], f"{a}.expert_count": N_EXPERT,
          f"{a}.expert_used_count": c["num_experts_per_tok"], f"{a}.expert_shared_count": c["n_shared_experts"],
          f"{a}.expert_feed_forward_length": c["moe_intermediate_size"],
          f"{a}.leading_dense_block_count": c["first_k_dense_replace"],
          f"{a}.attention.indexer.head_count": c["index_n_heads"],
          f"{a}.attention.indexer.key_length": c["index_head_dim"], f"{a}.attention.indexer.top_k": c["index_topk"],
          f"{a}.attention.indexer.types": full}
    hp = HParams(a, N_TRUNK + 1, 1, c["hidden_size"], c["num_attention_heads"], 1,
                 kv[f"{a}.attention.key_length"], c["kv_lora_rank"], c["intermediate_size"], c["vocab_size"],
                 N_EXPERT, c["num_experts_per_tok"], c["n_shared_experts"], c["moe_intermediate_size"],
                 c["first_k_dense_replace"],
                 mla=MlaHParams(c["q_lora_rank"], c["kv_lora_rank"], kv[f"{a}.attention.key_length_mla"],
                                c["v_head_dim"], c["qk_rope_head_dim"], c["index_n_heads"], c["index_head_dim"],
                                tuple(full)))
    probe = {"blk.0.attn_norm.weight", f"blk.{N_TRUNK}.nextn.eh_proj.weight"}
    spec = expected_tensors(hp, probe)
    keep = [n for n, (_, required) in spec.items() if required or n == "output.weight"
            or (n.split(".")[2:3] == ["indexer"] and (int(n.split(".")[1]) >= N_TRUNK or full[int(n.split(".")[1])]))]
    return kv, {n: spec[n][0][:1] + tuple(min(d, 16) for d in spec[n][0][1:2]) + spec[n][0][2:] for n in keep}


@pytest.mark.skipif(not GLM_53.is_file(), reason=f"{GLM_53} not found (set CHATGLM_REFERENCE)")
def test_types_match_llama_quantize_at_glm_5_3_sizes(tmp_path):
    kv, shapes = glm_5_3_table()
    w = gguf.GGUFWriter(tmp_path / "glm53.gguf", "glm-dsa")
    for key, value in kv.items():
        if isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, gguf.GGUFValueType.UINT32 if type(value) is int else gguf.GGUFValueType.FLOAT32)
    for name, shape in shapes.items():
        w.add_tensor_info(name, shape[::-1], np.dtype(np.float32), 4 * int(np.prod(shape)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    fout.truncate(w.ggml_pad(fout.tell(), w.data_alignment)
                  + sum(w.ggml_pad(4 * int(np.prod(s)), w.data_alignment) for s in shapes.values()))
    w.close()
    tensors = [(n, s[::-1]) for n, s in shapes.items()]  # numpy order
    info = ModelInfo("glm-dsa", N_TRUNK + 1, kv["glm-dsa.attention.head_count"], 1, N_EXPERT)
    mismatches = {}
    for name in ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_m", "q6_k", "iq4_xs", "q8_0", "mxfp4_moe"):
        recipe = get_recipe(name)
        theirs = llama_dry_run_types(tmp_path / "glm53.gguf", recipe.ftype, False)
        assert len(theirs) == len(tensors), "could not read llama.cpp's dry-run log"
        mine = plan_types(recipe, tensors, info)
        mismatches.update({(name, n): (theirs[n], t.name.lower()) for n, t in mine.items()
                           if theirs[n] != t.name.lower()})
    assert not mismatches, f"(recipe, tensor): (llama.cpp, ours) {mismatches}"

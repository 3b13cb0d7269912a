"""P-Tuning v2 on GLM-4-9B in THUDM's remote-code layout (issue 22): ``transformer.prefix_encoder.embedding.weight``
sized num_layers x 2 x multi_query_group_num x kv_channels (2 kv heads for 4 query heads here). The GGUF runs on
llama.cpp with the prefix in its KV cache; the reference is transformers' GLM (float64) fed the prefix as past keys and
values, never rotated, positions from 0, as the published get_prompt and forward feed it."""

from __future__ import annotations

import numpy as np
import pytest
from test_ptuning import _layout, _prefix_dir, _rel, reference

from chatglm.convert.pipeline import convert
from chatglm.devtools.glm4 import build_checkpoint, special_ids, train_glm4_bpe
from chatglm.gguf_file import read_header
from chatglm.runtime import ptuning as rt_ptuning
from chatglm.schema import keys

P = 7
REL = 1e-5


@pytest.fixture(scope="module")
def glm4_pt(tmp_path_factory):
    """(transformers model, tokenizer, base folder, prefix folder, prefix (n_layer, 2, P, kv width), f32 GGUF)."""
    root = tmp_path_factory.mktemp("ptuning-glm4")
    tok = train_glm4_bpe()
    model, base = build_checkpoint("glm4", root / "base", tok, seed=4, rope_theta=50000.0)
    n_layer, n_kv, head_dim = _layout(model)
    assert n_kv < model.config.num_attention_heads  # multi-query: the prefix is kv-heads wide
    emb = np.random.default_rng(5).normal(0, 1, (P, n_layer * 2 * n_kv * head_dim)).astype(np.float32)
    folder = _prefix_dir(base, root / "pt", emb, pre_seq_len=P, prefix_projection=False)
    gguf = convert(base, root / "pt.gguf", "f32", ptuning=folder).path
    prefix = emb.reshape(P, n_layer, 2, n_kv * head_dim).transpose(1, 2, 0, 3)
    return model, tok, base, folder, prefix, gguf


@pytest.mark.parametrize("layout", ["glm4-hf", "glm4-0414"])
def test_a_peft_adapter_on_the_transformers_layout_runs_as_peft_runs_it(glm4_pt, tmp_path, layout):
    """GlmForCausalLM (glm-4-9b-chat-hf) and Glm4ForCausalLM (GLM-4-0414, llama.cpp's glm4): PEFT sizes the prefix
    by num_key_value_heads, and transformers' forward numbers the tokens after the cached prefix from P (PEFT's
    generate moves cache_position by P too), so the GGUF records first position P and the keys stay as trained.
    A THUDM P-Tuning folder is refused in one line."""
    from test_ptuning_peft import write_peft_prefix

    from chatglm.errors import UnsupportedModelError
    from chatglm.runtime.loader import open_engine

    model, tok, _, folder, prefix, _ = glm4_pt
    hf_model, hf = build_checkpoint(layout, tmp_path / "hf", tok, seed=6)
    n_layer, n_kv, head_dim = _layout(hf_model)
    rows = np.ascontiguousarray(prefix.transpose(2, 0, 1, 3).reshape(P, -1))
    peft = write_peft_prefix(tmp_path / "peft", rows, n_layer=n_layer, n_heads=n_kv, token_dim=n_kv * head_dim)
    gguf = convert(hf, tmp_path / "peft.gguf", "f32", ptuning=peft).path
    assert read_header(gguf).get(keys.PTUNING_FIRST_POSITION) == P
    ids = prompt(tok, "def f(x): return x * 2")
    ref = reference(hf_model, prefix, ids, cache_positions=True)
    assert _rel(reference(hf_model, prefix, ids), ref) > 1e-3  # THUDM's numbering gives other logits
    with open_engine(gguf, n_ctx=64, n_threads=1, kv_type="f32", flash_attn=False) as engine:
        err = _rel(engine.all_logits(ids), ref)
        assert err < REL, err
        engine.reset()
        engine.prefill(ids[:-2])
        for token in ids[-2:]:  # decode on the cache
            engine.step(token)
        err = _rel(engine.logits()[None], ref[-1:])
        assert err < REL, err
    with pytest.raises(UnsupportedModelError, match="belongs to THUDM's remote-code layout") as err:
        convert(hf, tmp_path / "x.gguf", "f32", ptuning=folder)
    assert "\n" not in str(err.value) and not (tmp_path / "x.gguf").exists()


def prompt(tok, text: str) -> list[int]:
    ids = special_ids(tok)
    return [ids["[gMASK]"], ids["<sop>"], ids["<|user|>"], *tok.encode(text, add_special_tokens=False).ids,
            ids["<|assistant|>"]]


def test_glm4_prefix_logits_and_decode_match_the_published_forward(glm4_pt):
    from chatglm.runtime.loader import open_engine

    model, tok, _, _, prefix, gguf = glm4_pt
    np.testing.assert_array_equal(rt_ptuning.read_prefix(read_header(gguf)), prefix)
    ids = prompt(tok, "你好, world! 今天天气很好。")
    ref = reference(model, prefix, ids)
    assert _rel(reference(model, prefix[:, :, :0], ids), ref) > 1e-2  # the prefix matters
    with open_engine(gguf, n_ctx=128, n_threads=1, kv_type="f32", flash_attn=False) as engine:
        assert engine.info.pre_seq_len == P and engine.info.chat_format == "glm4"
        err = _rel(engine.all_logits(ids), ref)
        assert err < REL, err
        engine.reset()
        engine.prefill(ids[:-4])
        for i, token in enumerate(ids[-4:]):  # decode on the cache
            engine.step(token)
            err = _rel(engine.logits()[None], ref[len(ids) - 4 + i][None])
            assert err < REL, err


def test_glm4_convert_cli_with_ptuning(glm4_pt, tmp_path):
    from typer.testing import CliRunner

    from chatglm.cli.app import app

    _, _, base, folder, prefix, _ = glm4_pt
    out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(app, ["convert", str(base), "--ptuning", str(folder), "-t", "q8_0", "-o", str(out)])
    assert r.exit_code == 0 and out.is_file(), r.output
    h = read_header(out)
    assert h.get(keys.PTUNING_PRE_SEQ_LEN) == P and h.get("general.architecture") == "chatglm"
    np.testing.assert_array_equal(rt_ptuning.read_prefix(h), prefix)
    r = CliRunner().invoke(app, ["info", str(out)])
    assert r.exit_code == 0 and f"prefix of {P} entries" in r.output, r.output

"""PEFT prefix-tuning adapters (issue 22) through `--ptuning`: adapter_config.json (peft_type PREFIX_TUNING and the
sizes peft's _prepare_prompt_learning_config writes) and adapter_model.safetensors holding ``prompt_embeddings``
(num_virtual_tokens, num_layers * 2 * token_dim), built here by hand in that published layout (peft is not a
dependency). The rows are THUDM's prefix layout, so the GGUF carries the same prefix and runs as THUDM's does."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures_glm1 import glm1, glm1_dir, ice_model  # noqa: F401  (fixtures)
from test_ptuning import _layout, _rel, reference

from chatglm.convert.pipeline import convert
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.gguf_file import read_header
from chatglm.runtime import ptuning as rt_ptuning

P = 4


def write_peft_prefix(out, rows: np.ndarray, *, n_layer: int, n_heads: int, token_dim: int, **config) -> object:
    """A PEFT prefix-tuning adapter folder as ``PeftModel.save_pretrained`` writes it."""
    from safetensors.numpy import save_file

    out.mkdir()
    cfg = {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "inference_mode": True,
           "num_virtual_tokens": rows.shape[0], "num_layers": n_layer, "token_dim": token_dim,
           "num_attention_heads": n_heads, "num_transformer_submodules": 1, "encoder_hidden_size": token_dim,
           "prefix_projection": False, "base_model_name_or_path": "THUDM/chatglm3-6b", "revision": None}
    cfg.update(config)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({"prompt_embeddings": np.ascontiguousarray(rows, dtype=np.float32)},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out


def _rows(model, seed: int = 2) -> np.ndarray:
    n_layer, n_kv, head_dim = _layout(model)
    return np.random.default_rng(seed).normal(0, 1, (P, n_layer * 2 * n_kv * head_dim)).astype(np.float32)


def test_a_peft_prefix_adapter_runs_as_the_published_forward(glm3, tmp_path):
    from chatglm.runtime.model import load

    n_layer, n_kv, head_dim = _layout(glm3.model)
    rows = _rows(glm3.model)
    folder = write_peft_prefix(tmp_path / "peft", rows, n_layer=n_layer, n_heads=n_kv, token_dim=n_kv * head_dim)
    gguf = convert(glm3.ckpt, tmp_path / "peft.gguf", "f32", ptuning=folder).path
    prefix = rows.reshape(P, n_layer, 2, n_kv * head_dim).transpose(1, 2, 0, 3)  # get_prompt's view and split
    np.testing.assert_array_equal(rt_ptuning.read_prefix(read_header(gguf)), prefix)
    ids = [glm3.special["[gMASK]"], glm3.special["sop"]] + list(range(120, 140))
    ref = reference(glm3.model, prefix, ids)
    with load(gguf, n_ctx=64, n_threads=1, kv_type="f32", flash_attn=False) as m:
        assert m.info.pre_seq_len == P
        err = _rel(m.engine.all_logits(ids), ref)
    assert err < 1e-5, err
    assert _rel(reference(glm3.model, prefix[:, :, :0], ids), ref) > 1e-2


def _bad(glm3, tmp_path, **change):
    n_layer, n_kv, head_dim = _layout(glm3.model)
    rows = change.pop("rows", _rows(glm3.model))
    sizes = {"n_layer": n_layer, "n_heads": n_kv, "token_dim": n_kv * head_dim}
    sizes.update({k: change.pop(k) for k in list(change) if k in sizes})
    return write_peft_prefix(tmp_path / "bad", rows, **sizes, **change)


@pytest.mark.parametrize("change, message", [
    # PEFT's own sizing for a THUDM config (no num_key_value_heads): hidden_size wide, every attention head
    ({"n_heads": 4, "token_dim": 64, "rows": np.ones((P, 2 * 2 * 64), np.float32)},
     r"is 2 layers x 4 heads \(token_dim 64\), this model keeps 2 layers x 2 kv heads x 16: .* token_dim=32"),
    ({"peft_type": "PROMPT_TUNING"}, "prompt tuning adds trained input embeddings"),
    ({"peft_type": "LORA"}, "a LoRA adapter: merge it with --lora"),
    ({"num_virtual_tokens": P + 1}, r"prompt_embeddings has shape \[4, 128\], adapter_config.json makes it \[5, 128\]"),
    ({"num_virtual_tokens": "4"}, "num_virtual_tokens must be a positive integer"),
    ({"num_transformer_submodules": 2}, "encoder-decoder"),
])
def test_bad_peft_adapters_are_one_line_errors_and_nothing_is_written(glm3, tmp_path, change, message):
    folder = _bad(glm3, tmp_path, **change)
    with pytest.raises(InputError, match=message) as err:
        convert(glm3.ckpt, tmp_path / "x.gguf", "f32", ptuning=folder)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


def test_a_peft_adapter_with_other_tensors_is_refused(glm3, tmp_path):
    from safetensors.numpy import save_file

    folder = _bad(glm3, tmp_path)
    save_file({"prompt_embeddings": _rows(glm3.model), "prompt_encoder.transform.0.weight": np.ones((2, 2))},
              str(folder / "adapter_model.safetensors"))
    with pytest.raises(InputError, match="holds one tensor, prompt_embeddings .also prompt_encoder.transform"):
        convert(glm3.ckpt, tmp_path / "x.gguf", "f32", ptuning=folder)


def test_peft_prefixes_are_refused_for_chatglm_6b(glm1, tmp_path):
    """ChatGLM-6B's published forward drops its 2D positions and mask when handed past_key_values."""
    c = glm1.config
    rows = np.ones((P, c["num_layers"] * 2 * c["hidden_size"]), np.float32)
    folder = write_peft_prefix(tmp_path / "peft1", rows, n_layer=c["num_layers"], n_heads=c["num_attention_heads"],
                               token_dim=c["hidden_size"])
    with pytest.raises(UnsupportedModelError, match="adapters run on the models llama.cpp runs, not on a chatglm1 model"):
        convert(glm1.ckpt, tmp_path / "x.gguf", "f32", ptuning=folder)
    assert not (tmp_path / "x.gguf").exists()


def test_the_first_position_is_zero_or_the_prefix_length(tmp_path):
    """glm.ptuning.first_position: absent or 0 (THUDM) and P (PEFT on transformers' layout) only; anything else,
    a hand-edited GGUF, is one line before llama.cpp or our graph sees it."""
    from chatglm.schema import keys

    class Header:
        path = tmp_path / "x.gguf"

        def __init__(self, value):
            self.kv = {} if value is None else {keys.PTUNING_FIRST_POSITION: value}

        def get(self, key, default=None):
            return self.kv.get(key, default)

    assert [rt_ptuning.first_position(Header(v), 6) for v in (None, 0, 6)] == [0, 0, 6]
    for bad in (3, 7, "6", True):
        with pytest.raises(InputError, match="first_position must be 0 or the prefix's 6 entries"):
            rt_ptuning.first_position(Header(bad), 6)

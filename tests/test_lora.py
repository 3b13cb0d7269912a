"""PEFT LoRA adapters merged during conversion (W + scale · alpha/r · B @ A), and P-Tuning v2 refused."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from chatglm.cli.app import app
from chatglm.convert.checkpoint import Checkpoint
from chatglm.convert.lora import lora_scales, merged
from chatglm.convert.pipeline import convert
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.runtime.model import load

LAYER = "transformer.encoder.layers.{i}."
PREFIX = "base_model.model."


def module_shapes(model) -> dict[str, tuple[int, int]]:
    """ChatGLM2/3 linear modules of the tiny model -> (out, in)."""
    c = model.config
    qkv = (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim
    shapes = {}
    for i in range(c.num_hidden_layers):
        shapes[LAYER.format(i=i) + "self_attention.query_key_value"] = (qkv, c.hidden_size)
        shapes[LAYER.format(i=i) + "self_attention.dense"] = (c.hidden_size, c.num_attention_heads * c.head_dim)
        shapes[LAYER.format(i=i) + "mlp.dense_h_to_4h"] = (2 * c.intermediate_size, c.hidden_size)
        shapes[LAYER.format(i=i) + "mlp.dense_4h_to_h"] = (c.hidden_size, c.intermediate_size)
    return shapes


def write_adapter(folder: Path, shapes: dict[str, tuple[int, int]], *, r: int = 4, alpha: float = 8, seed: int = 0,
                  fmt: str = "safetensors", **config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT adapter folder with random (trained-looking) A and B for each module; returns module -> (A, B)."""
    gen = torch.Generator().manual_seed(seed)
    pairs = {m: (0.2 * torch.randn(r, n_in, generator=gen), 0.2 * torch.randn(n_out, r, generator=gen))
             for m, (n_out, n_in) in shapes.items()}
    tensors = {}
    for m, (a, b) in pairs.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"], tensors[f"{PREFIX}{m}.lora_B.weight"] = a, b
    folder.mkdir(parents=True)
    if fmt == "safetensors":
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    else:
        torch.save(tensors, folder / "adapter_model.bin")
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "bias": "none",
           "target_modules": sorted({m.rsplit(".", 1)[1] for m in shapes}), "fan_in_fan_out": False,
           "base_model_name_or_path": "THUDM/chatglm3-6b", **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return pairs


def pick(shapes: dict, *suffixes: str, layers: tuple[int, ...] = (0, 1)) -> dict:
    return {m: s for m, s in shapes.items() if m.endswith(suffixes) and int(m.split(".")[3]) in layers}


@pytest.fixture(scope="module")
def adapters(glm3, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    shapes = module_shapes(glm3.model)
    one = write_adapter(root / "one", pick(shapes, "query_key_value", "dense_4h_to_h"), r=4, alpha=8)
    two = write_adapter(root / "two", pick(shapes, "dense_h_to_4h", "self_attention.dense", layers=(1,)), r=2,
                        alpha=6, seed=1, fmt="bin", use_rslora=True,
                        alpha_pattern={"encoder.layers.1.mlp.dense_h_to_4h": 3})
    return root, one, two


def test_merged_weights_follow_the_peft_formula(glm3, adapters):
    root, one, two = adapters
    scale_one, scale_two = 0.5, 2.0
    scaling_one = 8 / 4  # lora_alpha / r
    scaling_two = {"mlp.dense_h_to_4h": 3 / math.sqrt(2), "self_attention.dense": 6 / math.sqrt(2)}  # rslora, pattern
    with Checkpoint(glm3.ckpt) as base, merged(Checkpoint(glm3.ckpt), [root / "one", root / "two"],
                                               [scale_one, scale_two]) as ck:
        assert ck.names() == base.names()
        for name in base.names():
            module = name.removesuffix(".weight")
            want = base.load(name).astype(np.float64)
            if module in one:
                a, b = (t.double().numpy() for t in one[module])
                want = want + scale_one * scaling_one * (b @ a)
            if module in two:
                a, b = (t.double().numpy() for t in two[module])
                want = want + scale_two * scaling_two[module.split(".", 4)[4]] * (b @ a)
            got = ck.load(name)
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.abs(want).max(), err_msg=name)
            if module not in one and module not in two:
                np.testing.assert_array_equal(got, base.load(name))


def merged_reference(model, pairs: dict, scaling: float):
    """The transformers twin with W + scaling · B @ A written into its (split q/k/v) weights."""
    ref = copy.deepcopy(model)
    c = ref.config
    split = [c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.num_key_value_heads * c.head_dim]
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for module, (a, b) in pairs.items():
            i = int(module.split(".")[3])
            delta = scaling * (b @ a)  # (out, in)
            layer = f"model.layers.{i}."
            if module.endswith("query_key_value"):
                for part, d in zip("qkv", delta.split(split, dim=0)):
                    params[f"{layer}self_attn.{part}_proj.weight"] += d
            else:
                target = {"dense_4h_to_h": "mlp.down_proj", "dense_h_to_4h": "mlp.gate_up_proj",
                          "dense": "self_attn.o_proj"}[module.rsplit(".", 1)[1]]
                params[f"{layer}{target}.weight"] += delta
    return ref


def test_merged_gguf_logits_equal_the_merged_reference(glm3, adapters, tmp_path):
    from chatglm.devtools.checkpoints import reference_logits

    root, one, _ = adapters
    out = convert(glm3.ckpt, tmp_path / "merged.gguf", "f32", lora=[root / "one"], lora_scale=0.75).path
    ref_model = merged_reference(glm3.model, one, 0.75 * 8 / 4)
    ids = [glm3.special["[gMASK]"], glm3.special["sop"], glm3.special["<|user|>"]] + list(range(40, 80))
    ref = reference_logits(ref_model, ids)
    base = reference_logits(glm3.model, ids)
    with load(out, n_ctx=256, n_threads=2, kv_type="f32", flash_attn=False) as m:
        got = m.engine.all_logits(ids)
    err = np.max(np.abs(got - ref).max(axis=-1) / np.abs(ref).max(axis=-1))
    moved = np.max(np.abs(base - ref).max(axis=-1) / np.abs(ref).max(axis=-1))
    assert moved > 0.05  # the adapter changes the model a lot...
    assert err < 1e-5  # ...and llama.cpp runs exactly the merged model


def test_runtime_lora_gguf_gives_the_merged_logits(glm3, glm3_gguf, adapters, tmp_path):
    import llama_cpp

    from chatglm.convert.lora_gguf import write_lora_gguf
    from chatglm.gguf_file import read_header

    root, _, two = adapters
    path = write_lora_gguf(glm3.ckpt, root / "two", tmp_path / "two.gguf", "f32")
    h = read_header(path)
    assert h.arch == "chatglm" and h.get("general.type") == "adapter" and h.get("adapter.type") == "lora"
    assert sorted(h.tensors) == ["blk.1.attn_output.weight.lora_a", "blk.1.attn_output.weight.lora_b",
                                 "blk.1.ffn_up.weight.lora_a", "blk.1.ffn_up.weight.lora_b"]
    ids = [glm3.special["[gMASK]"], glm3.special["sop"]] + list(range(100, 130))
    llm = llama_cpp.Llama(model_path=str(glm3_gguf), lora_path=str(path), lora_scale=0.5, n_ctx=128, n_threads=2,
                          logits_all=True, type_k=0, type_v=0, flash_attn=False, verbose=False)  # f32 KV cache
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    llm.close()
    # Each module of adapter two has its own PEFT scaling (rsLoRA, alpha_pattern): rebuild the reference per module.
    ref_model = glm3.model
    for module, pair in two.items():
        scaling = (3 if module.endswith("dense_h_to_4h") else 6) / math.sqrt(2)
        ref_model = merged_reference(ref_model, {module: pair}, 0.5 * scaling)
    from chatglm.devtools.checkpoints import reference_logits

    ref, base = reference_logits(ref_model, ids), reference_logits(glm3.model, ids)
    assert np.max(np.abs(base - ref).max(axis=-1) / np.abs(ref).max(axis=-1)) > 0.01
    assert np.max(np.abs(got - ref).max(axis=-1) / np.abs(ref).max(axis=-1)) < 1e-5  # measured 6e-7


def test_runtime_lora_gguf_refuses_what_it_cannot_express(glm3, tmp_path):
    from chatglm.convert.lora_gguf import write_lora_gguf

    write_adapter(tmp_path / "fifo", pick(module_shapes(glm3.model), "query_key_value"), fan_in_fan_out=True)
    with pytest.raises(UnsupportedModelError, match="uses fan_in_fan_out.*chatglm convert --lora"):
        write_lora_gguf(glm3.ckpt, tmp_path / "fifo", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_lora_options_match_the_library(glm3, adapters, tmp_path):
    root, _, _ = adapters
    r = CliRunner().invoke(app, ["convert", str(glm3.ckpt), "-o", str(tmp_path / "cli.gguf"), "-t", "q8_0",
                                 "--lora", str(root / "one"), "--lora", str(root / "two"), "--lora-scale", "0.5"])
    assert r.exit_code == 0, r.output
    lib = convert(glm3.ckpt, tmp_path / "lib.gguf", "q8_0", lora=[root / "one", root / "two"], lora_scale=0.5)
    plain = convert(glm3.ckpt, tmp_path / "plain.gguf", "q8_0")
    assert (tmp_path / "cli.gguf").read_bytes() == lib.path.read_bytes() != plain.path.read_bytes()
    r = CliRunner().invoke(app, ["convert", str(glm3.ckpt), "-o", str(tmp_path / "x.gguf"), "--lora",
                                 str(root / "one"), "--lora-scale", "1", "--lora-scale", "2"])
    assert r.exit_code == 2 and "one --lora-scale for all adapters or one per adapter (1), not 2" in r.output


# ----------------------------------------------------------------------------------------------- bad adapters


def test_adapter_for_the_wrong_base_shape_is_refused(glm3, tmp_path):
    module = LAYER.format(i=0) + "mlp.dense_4h_to_h"
    write_adapter(tmp_path / "wide", {module: (64, 128)})  # a model with ffn 128, not 96
    with pytest.raises(InputError, match=r"makes a \[64, 128\] update but the model's weight is \[64, 96\]"):
        convert(glm3.ckpt, tmp_path / "x.gguf", "f32", lora=[tmp_path / "wide"])
    write_adapter(tmp_path / "glm1", {"transformer.layers.0.attention.query_key_value": (384, 64)})
    with pytest.raises(InputError, match="which the model does not have"):
        convert(glm3.ckpt, tmp_path / "x.gguf", "f32", lora=[tmp_path / "glm1"])
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("change, message", [
    ({"r": 8}, "adapter_config.json says rank 8, the tensors have 4"),
    ({"use_dora": True}, "DoRA adapters"),
    ({"peft_type": "IA3"}, "peft_type IA3 is not supported"),
    ({"peft_type": "PREFIX_TUNING"}, "P-Tuning v2 / prefix tuning is not a LoRA adapter"),
    ({"target_modules": ["dense"]}, "is not among target_modules"),
    ({"lora_alpha": "big"}, "lora_alpha must be a positive number"),
])
def test_inconsistent_adapter_configs_are_refused(glm3, tmp_path, change, message):
    write_adapter(tmp_path / "a", pick(module_shapes(glm3.model), "query_key_value"), r=4)
    cfg_path = tmp_path / "a" / "adapter_config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), **change}))
    with Checkpoint(glm3.ckpt) as ck, pytest.raises(InputError, match=message):
        merged(ck, [tmp_path / "a"])


def test_broken_adapter_files_are_refused(glm3, tmp_path):
    shapes = pick(module_shapes(glm3.model), "query_key_value", layers=(0,))
    write_adapter(tmp_path / "half", shapes)
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "half" / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "lora_A" in k}, str(tmp_path / "half" / "adapter_model.safetensors"))
    write_adapter(tmp_path / "emb", shapes)
    save_file({**tensors, PREFIX + "transformer.embedding.word_embeddings.lora_embedding_A": torch.ones(2, 3)},
              str(tmp_path / "emb" / "adapter_model.safetensors"))
    (tmp_path / "empty").mkdir()
    cases = [("half", "has no lora_B tensor"), ("emb", "LoRA on embedding layers is not supported"),
             ("empty", "adapter_config.json: file not found"), ("missing", "LoRA adapter: not found")]
    with Checkpoint(glm3.ckpt) as ck:
        for name, message in cases:
            with pytest.raises(InputError, match=message):
                merged(ck, [tmp_path / name])


def test_lora_scales():
    assert lora_scales(3, 0.5) == [0.5, 0.5, 0.5]
    assert lora_scales(2, [1, 2]) == [1.0, 2.0]
    with pytest.raises(InputError, match="finite"):
        lora_scales(1, float("nan"))


# ----------------------------------------------------------------------------------------------- P-Tuning v2


def clone(ckpt: Path, dest: Path, **config) -> Path:
    dest.mkdir(parents=True)
    for p in ckpt.iterdir():
        if p.name == "config.json":
            cfg = {**json.loads(p.read_text()), **config}
            (dest / p.name).write_text(json.dumps(cfg))
        else:
            (dest / p.name).symlink_to(p)
    return dest


def test_ptuning_checkpoints_are_no_lora_base_and_need_their_prefix(glm3, adapters, tmp_path):
    """P-Tuning v2 converts with --ptuning (tests/test_ptuning.py); a pre_seq_len without the prefix tensor is an
    error, and `chatglm lora` refuses a P-Tuning base with the way to convert it."""
    from chatglm.convert.lora_gguf import write_lora_gguf

    pt = clone(glm3.ckpt, tmp_path / "pt", pre_seq_len=128)
    with pytest.raises(InputError, match="no prefix_encoder.embedding.weight tensor"):
        convert(pt, tmp_path / "x.gguf", "f16")
    with pytest.raises(UnsupportedModelError, match=r"--ptuning DIR.*pre_seq_len=128"):
        write_lora_gguf(pt, adapters[0] / "two", tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_run_lora_through_our_engine_gives_the_merged_logits(glm3, glm3_gguf, adapters, tmp_path):
    """`chatglm lora` writes the adapter; `chatglm.load(..., lora=...)` runs it: the merged model's logits."""
    from typer.testing import CliRunner

    from chatglm.cli.app import app
    from chatglm.devtools.checkpoints import reference_logits
    from chatglm.runtime.model import load

    root, _, two = adapters
    out = tmp_path / "two.gguf"
    r = CliRunner().invoke(app, ["lora", str(glm3.ckpt), str(root / "two"), "-o", str(out), "-t", "f32"])
    assert r.exit_code == 0 and out.is_file(), r.output
    ids = [glm3.special["[gMASK]"], glm3.special["sop"]] + list(range(100, 130))
    with load(glm3_gguf, n_ctx=128, n_threads=1, kv_type="f32", flash_attn=False, lora=[(out, 0.5)]) as m:
        got = m.engine.all_logits(ids)
    ref_model = glm3.model
    for module, pair in two.items():
        scaling = (3 if module.endswith("dense_h_to_4h") else 6) / math.sqrt(2)
        ref_model = merged_reference(ref_model, {module: pair}, 0.5 * scaling)
    ref = reference_logits(ref_model, ids)
    assert np.max(np.abs(got - ref).max(axis=-1) / np.abs(ref).max(axis=-1)) < 1e-5
    r = CliRunner().invoke(app, ["run", str(glm3_gguf), "--lora", str(out), "-p", "hi", "-n", "3", "--temp", "0"])
    assert r.exit_code == 0, r.output
    bad = CliRunner().invoke(app, ["run", str(glm3_gguf), "--lora", str(glm3_gguf), "-p", "hi", "-n", "1"])
    assert bad.exit_code == 2 and "not a LoRA adapter GGUF" in bad.output

"""THUDM int4/int8 checkpoints: the published packing, dequantized exactly, converted like any float checkpoint.

The quantizer below is written from the published quantization.py's description: per output row,
``scale = max|W| / (2**(bits-1) - 1)`` in the weight's float type, ``q = round(W / scale)`` as int8, and for 4 bits
``byte = (q[2j] << 4) | (q[2j+1] & 0xF)`` (compress_int4_weight).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from chatglm.convert.checkpoint import Checkpoint
from chatglm.convert.pipeline import convert
from chatglm.convert.thudm_quant import dequantized, unpack_int4
from chatglm.devtools.checkpoints import read_published_state
from chatglm.errors import InputError
from fixtures_glm1 import glm1_dir, ice_model  # noqa: F401  (fixtures)

QUANTIZED = re.compile(r".*\.(query_key_value|dense|dense_h_to_4h|dense_4h_to_h)\.weight")


def quantize(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed int8 weight, half scale) as the published QuantizedLinear builds them."""
    w = w.half()
    scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)
    if bits == 4:
        hi, lo = q[:, 0::2].to(torch.int16), q[:, 1::2].to(torch.int16)
        q = (((hi & 0xF) << 4) | (lo & 0xF)).to(torch.uint8).view(torch.int8)  # unsigned-char arithmetic
    return q, scale


def expected(w: torch.Tensor, bits: int) -> np.ndarray:
    """The dequantized matrix, computed without any packing: int8(round(W / scale)) * scale in float32."""
    w = w.half()
    scale = (w.abs().max(dim=-1).values / (2 ** (bits - 1) - 1)).half()
    q = torch.round(w / scale[:, None]).to(torch.int8)  # an integer: no negative zeros
    return (q.float() * scale.float()[:, None]).numpy()


def write_folder(folder: Path, state: dict, config: dict) -> Path:
    folder.mkdir(parents=True)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_nibble_order_and_sign_by_hand():
    packed = np.array([[0x79, 0x40, 0xFF, 0x08]], dtype=np.uint8).view(np.int8)
    np.testing.assert_array_equal(unpack_int4(packed), [[7, -7, 4, 0, -1, -1, 0, -8]])
    w = torch.tensor([[7.0, -7.0, 3.5, 0.0]])
    q, scale = quantize(w, 4)
    assert q.view(torch.uint8).tolist() == [[0x79, 0x40]] and scale.item() == 1.0


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantized_view_of_a_glm1_style_checkpoint(tmp_path, bits):
    gen = torch.Generator().manual_seed(bits)
    layer = "transformer.layers.0.attention.query_key_value"  # ChatGLM-6B names; the view is name-agnostic
    w = torch.randn(12, 16, generator=gen)
    emb = torch.randn(10, 16, generator=gen)  # chatglm-6b-int4-qe also quantizes the embeddings
    state = {"transformer.word_embeddings.weight": quantize(emb, bits)[0],
             "transformer.word_embeddings.weight_scale": quantize(emb, bits)[1],
             f"{layer}.weight": quantize(w, bits)[0], f"{layer}.weight_scale": quantize(w, bits)[1],
             f"{layer}.bias": torch.randn(12, generator=gen).half(),
             "transformer.final_layernorm.weight": torch.ones(16).half()}
    folder = write_folder(tmp_path / "m", state, {"quantization_bit": bits})
    with Checkpoint(folder) as raw:
        ck = dequantized(raw)
        assert sorted(ck.names()) == sorted(n for n in state if not n.endswith("_scale"))
        assert ck.info(f"{layer}.weight").shape == (12, 16) and ck.info(f"{layer}.weight").dtype == "F32"
        np.testing.assert_array_equal(ck.load(f"{layer}.weight"), expected(w, bits))
        np.testing.assert_array_equal(ck.load("transformer.word_embeddings.weight"), expected(emb, bits))
        np.testing.assert_array_equal(ck.load(f"{layer}.bias"), state[f"{layer}.bias"].float().numpy())


def test_int8_dequantization_rounds_to_the_published_half_product(tmp_path):
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(5))
    q, scale = quantize(w, 8)
    folder = write_folder(tmp_path / "m", {"x.weight": q, "x.weight_scale": scale}, {"quantization_bit": 8})
    with Checkpoint(folder) as raw:
        ours = dequantized(raw).load("x.weight")
    published = (q.to(torch.half) * scale[:, None]).numpy()  # extract_weight_to_half for 8 bits, on GPU
    np.testing.assert_array_equal(ours.astype(np.float16), published)


def quantized_twin(state: dict[str, torch.Tensor], bits: int) -> tuple[dict, dict]:
    """(THUDM-quantized state, the float32 state it dequantizes to)."""
    packed, floats = {}, {}
    for name, t in state.items():
        if QUANTIZED.fullmatch(name):
            packed[name], packed[name + "_scale"] = quantize(t, bits)
            floats[name] = torch.from_numpy(expected(t, bits))
        else:
            packed[name], floats[name] = t, t.float()
    return packed, floats


@pytest.mark.parametrize("bits, qtype", [(4, "f16"), (8, "q8_0")])
def test_quantized_chatglm_converts_like_its_dequantized_floats(workdir, sp_model, tmp_path, bits, qtype):
    from conftest import make_tiny

    tiny = make_tiny(workdir, sp_model, "chatglm3", seed=4, dtype="float16")
    packed, floats = quantized_twin(read_published_state(tiny.ckpt), bits)
    config = json.loads((tiny.ckpt / "config.json").read_text())
    quant_dir, float_dir = tmp_path / "q" / "m", tmp_path / "f" / "m"  # same name: same general.name
    write_folder(quant_dir, packed, {**config, "quantization_bit": bits, "torch_dtype": "float16"})
    float_dir.mkdir(parents=True)
    save_file(floats, str(float_dir / "model.safetensors"))
    (float_dir / "config.json").write_text(json.dumps(config))
    for folder in (quant_dir, float_dir):
        for extra in ("tokenizer.model", "tokenizer_config.json"):
            (folder / extra).write_bytes((tiny.ckpt / extra).read_bytes())
    a = convert(quant_dir, tmp_path / "from-int.gguf", qtype)
    b = convert(float_dir, tmp_path / "from-float.gguf", qtype)
    assert a.n_tensors == b.n_tensors and a.path.read_bytes() == b.path.read_bytes()


# ----------------------------------------------------------------------------------------------- bad inputs


def test_bad_quantized_checkpoints_are_refused(tmp_path):
    q, scale = quantize(torch.randn(4, 8), 4)
    cases = [
        ({"x.weight": q, "x.weight_scale": scale}, {}, "quantized .* but config.json has no quantization_bit"),
        ({"x.weight_scale": scale, "y.weight": q}, {"quantization_bit": 4}, "has no quantized 'x.weight' beside it"),
        ({"x.weight": q, "x.weight_scale": scale[:3]}, {"quantization_bit": 4}, "one float scale per row"),
        ({"x.weight": q.float(), "x.weight_scale": scale}, {"quantization_bit": 4}, "must be a 2-D int8 matrix"),
        ({"x.weight": q, "x.weight_scale": scale}, {"quantization_bit": 3}, "quantization_bit must be 0, 4 or 8"),
    ]
    for k, (state, config, message) in enumerate(cases):
        with Checkpoint(write_folder(tmp_path / str(k), state, config)) as raw, pytest.raises(InputError,
                                                                                              match=message):
            dequantized(raw)


def test_float_checkpoint_passes_through_unchanged(tmp_path):
    folder = write_folder(tmp_path / "f", {"x.weight": torch.ones(2, 2)}, {"quantization_bit": 4})
    with Checkpoint(folder) as raw:
        assert dequantized(raw) is raw


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_chatglm_6b_converts_like_its_dequantized_floats(glm1_dir, ice_model, tmp_path, bits):
    """chatglm-6b-int4 / -int8: the ChatGLM-6B family converts THUDM's packed weights through the dequantized view."""
    from chatglm.devtools.glm1 import save_glm1_checkpoint, tiny_glm1_checkpoint

    _, config, weights = tiny_glm1_checkpoint(glm1_dir / f"int{bits}-src", ice_model, seed=2)
    state = {k: torch.from_numpy(v.astype(np.float16)) for k, v in weights.items()}
    packed, floats = quantized_twin(state, bits)
    quant_dir = save_glm1_checkpoint(tmp_path / "q" / "m", ice_model, {**config, "quantization_bit": bits}, weights)
    (quant_dir / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in packed.items()}, str(quant_dir / "model.safetensors"))
    float_dir = save_glm1_checkpoint(tmp_path / "f" / "m", ice_model, config,
                                     {k: v.numpy() for k, v in floats.items()})
    a = convert(quant_dir, tmp_path / "from-int.gguf", "f16")
    b = convert(float_dir, tmp_path / "from-float.gguf", "f16")
    assert a.family == "chatglm1" and a.path.read_bytes() == b.path.read_bytes()

"""GLM-4.5V (``Glm4vMoeForConditionalGeneration`` → llama.cpp ``glm4moe`` with M-RoPE + libmtmd ``glm4v``) proven
against transformers.

A tiny random checkpoint built with transformers' own class (2 ViT blocks, 1 dense + 1 expert text layer, M-RoPE
sections [2, 3, 3]), saved sharded as users get it, converted to an f32 GGUF and an f32 projector; fixture PNGs drawn
by code at sizes the processor does not resize (112x112: 16 image tokens, 168x112: 24, the learned positions then
resampled by both sides). Image embeddings from libmtmd within 1e-3 relative of ``get_image_features``, the prompt
ids (placeholders expanded) equal to the processor's, the logits after the image within 1e-3 relative, and the
language model alone on text within 1e-4.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from chatglm.convert.pipeline import convert
from chatglm.devtools.glm4v import (build_glm45v_checkpoint, checkpoint_processor, fixture_png, image_features,
                                    image_inputs, vision_tokenizer)
from chatglm.errors import InputError
from chatglm.gguf_file import read_header
from chatglm.runtime.media import load_media
from chatglm.runtime.messages import Message
from chatglm.runtime.model import load

F32 = {"n_ctx": 256, "n_threads": 1, "kv_type": "f32", "flash_attn": False}
QUESTION = "What is written here? 你好"


@pytest.fixture(scope="module")
def glm45v(tmp_path_factory):
    """(transformers model, checkpoint folder, f32 GGUF, its projector)."""
    root = tmp_path_factory.mktemp("glm45v")
    model, folder = build_glm45v_checkpoint(root / "ck", vision_tokenizer(), seed=1)
    result = convert(folder, root / "glm45v.gguf", "f32", mmproj_type="f32")
    return model, folder, result.path, result.mmproj


@pytest.fixture(scope="module")
def engine(glm45v):
    with load(glm45v[2], **F32) as model:
        yield model


@pytest.fixture(scope="module")
def processor(glm45v):
    return checkpoint_processor(glm45v[1])


def relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def test_metadata_and_projector(glm45v):
    model, folder, path, mmproj = glm45v
    assert mmproj.name == "mmproj-glm45v.gguf"
    header = read_header(path)
    assert header.arch == "glm4moe" and header.get("glm.family") == "glm4.5v"
    assert list(header.arch_get("rope.dimension_sections")) == [2, 3, 3, 0]
    assert header.arch_get("rope.dimension_count") == 16
    assert not any(name.startswith(("v.", "mm.")) for name in header.tensors)
    proj = read_header(mmproj)
    assert proj.arch == "clip" and proj.get("clip.projector_type") == "glm4v"
    assert proj.get("clip.has_vision_encoder") is True and proj.get("clip.use_silu") is True
    assert (proj.get("clip.vision.projection_dim"), proj.get("clip.vision.embedding_length")) == (64, 32)
    assert proj.get("clip.vision.feed_forward_length") == 64  # the tower's MLP is out_hidden_size wide
    assert (proj.get("clip.vision.image_size"), proj.get("clip.vision.patch_size")) == (112, 14)
    assert proj.get("clip.vision.spatial_merge_size") == 2
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert list(proj.get("clip.vision.image_std")) == pytest.approx(pre["image_std"])
    t = proj.tensors
    assert t["v.patch_embd.weight"].shape == t["v.patch_embd.weight.1"].shape == (14, 14, 3, 32)
    assert t["mm.patch_merger.weight"].shape == (2, 2, 32, 64)
    assert {"v.blk.1.attn_qkv.weight", "v.position_embd.weight", "v.norm_embd.weight", "v.post_ln.weight",
            "mm.model.fc.weight", "mm.post_norm.bias", "mm.gate.weight"} <= set(t)


@pytest.mark.parametrize("width,height,tokens", [(112, 112, 16), (168, 112, 24)])
def test_image_embeddings_match_transformers(glm45v, engine, processor, width, height, tokens):
    png = fixture_png(width, height, seed=width)
    ref = image_features(glm45v[0], image_inputs(processor, png))
    got = engine.media.embeddings(load_media(png, "image"))
    assert got.shape == ref.shape == (tokens, 64)
    assert relative(got, ref) < 1e-3


def test_prompt_ids_and_logits_after_the_image(glm45v, engine, processor):
    import torch

    png = fixture_png(112, 112, seed=9)
    media = load_media(png, "image")
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                         {"type": "text", "text": QUESTION}]}],
                                         add_generation_prompt=True, tokenize=False)
    inputs = image_inputs(processor, png, text)
    ids = engine.prompt_ids([Message("user", QUESTION, media=(media,))])
    assert engine.media.expanded_ids(ids, [media]) == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = glm45v[0](**inputs).logits[0, -1].numpy()
    engine.media.prefill(ids, [media])
    assert relative(engine.engine.logits(), ref) < 1e-3


def test_the_language_model_alone_takes_text(glm45v):
    import torch

    with load(glm45v[2], **F32, mmproj=None) as model:
        ids = model.prompt_ids([Message("user", QUESTION)])
        with torch.no_grad():
            ref = glm45v[0](input_ids=torch.tensor([ids])).logits[0].numpy()
        assert relative(model.engine.all_logits(ids), ref) < 1e-4


def edited(glm45v, tmp_path, edit):
    folder = tmp_path / "ck"
    shutil.copytree(glm45v[1], folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("edit,problem", [
    (lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 3, 4]), "'mrope_section' must be"),
    (lambda c: c.pop("vision_config"), "no 'vision_config' object"),
    (lambda c: c["vision_config"].update(out_hidden_size=48), "out_hidden_size (48) differs"),
    (lambda c: c["vision_config"].update(temporal_patch_size=1), "temporal_patch_size=2"),
])
def test_bad_configs_are_refused(glm45v, tmp_path, edit, problem):
    folder = edited(glm45v, tmp_path, edit)
    dest = tmp_path / "out.gguf"
    with pytest.raises(InputError) as err:
        convert(folder, dest, "f32")
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert not dest.exists() and not (tmp_path / "mmproj-out.gguf").exists()

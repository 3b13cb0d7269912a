"""GLM-4.5V (``Glm4vMoeForConditionalGeneration`` → llama.cpp ``glm4moe`` with M-RoPE + libmtmd ``glm4v``) and
GLM-OCR (``GlmOcrForConditionalGeneration`` → ``glm4`` with M-RoPE, Q/K rows in NeoX order + ``glm4v`` with q/k
norms) proven against transformers.

Tiny random checkpoints built with transformers' own classes (2 ViT blocks; GLM-4.5V: 1 dense + 1 expert text layer;
M-RoPE sections [2, 3, 3]), saved sharded as users get them, converted to f32 GGUFs and f32 projectors; fixture PNGs drawn
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
from chatglm.devtools import glm5_next
from chatglm.devtools.glm_vision import (build_glm45v_checkpoint, build_glm_ocr_checkpoint, checkpoint_processor,
                                    fixture_png, ggml_conv_precision, image_features, image_inputs,
                                    save_vision_checkpoint, tiny_glm45v, vision_tokenizer)
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.gguf_file import read_header
from chatglm.runtime.media import load_media
from chatglm.runtime.messages import Message
from chatglm.runtime.model import load
from fixtures_vision import check_text_alone, relative

F32 = {"n_ctx": 256, "n_threads": 1, "kv_type": "f32", "flash_attn": False}
QUESTION = "What is written here? 你好"


# family -> (builder, the processor class its published processor_config.json names)
FAMILIES = {"glm4.5v": (build_glm45v_checkpoint, "Glm4vProcessor"),
            "glm-ocr": (build_glm_ocr_checkpoint, "Glm46VProcessor"),
            "glm5.3-flash": (glm5_next.build_vision_checkpoint, "Glm5NextProcessor")}
GLM4V = ("glm4.5v", "glm-ocr")


@pytest.fixture(scope="module")
def tok():
    return vision_tokenizer()


@pytest.fixture(scope="module", params=list(FAMILIES))
def vision(request, tok, tmp_path_factory):
    """(family, transformers model, checkpoint folder, f32 GGUF, its projector, processor)."""
    build, processor_class = FAMILIES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    model, folder = build(root / "ck", tok, seed=1)
    result = convert(folder, root / "vision.gguf", "f32", mmproj_type="f32")
    return (request.param, model, folder, result.path, result.mmproj,
            checkpoint_processor(folder, processor_class))


@pytest.fixture(scope="module")
def engine(vision):
    with load(vision[3], **F32) as model:
        yield model


def test_metadata_and_projector(vision):
    family, model, folder, path, mmproj, _ = vision
    if family not in GLM4V:
        return glm5v_metadata(vision)
    assert mmproj.name == "mmproj-vision.gguf"
    header = read_header(path)
    assert (header.arch, header.get("glm.family")) == {"glm4.5v": ("glm4moe", "glm4.5v"),
                                                        "glm-ocr": ("glm4", "glm-ocr")}[family]
    assert list(header.arch_get("rope.dimension_sections")) == [2, 3, 3, 0]
    assert header.arch_get("rope.dimension_count") == 16
    assert not any(name.startswith(("v.", "mm.")) for name in header.tensors)
    proj = read_header(mmproj)
    assert proj.arch == "clip" and proj.get("clip.projector_type") == "glm4v"
    assert proj.get("clip.has_vision_encoder") is True and proj.get("clip.use_silu") is True
    assert (proj.get("clip.vision.projection_dim"), proj.get("clip.vision.embedding_length")) == (64, 32)
    # the tower's MLP: out_hidden_size wide in GLM-4.5V, intermediate_size in GLM-OCR
    assert proj.get("clip.vision.feed_forward_length") == {"glm4.5v": 64, "glm-ocr": 48}[family]
    assert (proj.get("clip.vision.image_size"), proj.get("clip.vision.patch_size")) == (112, 14)
    assert proj.get("clip.vision.spatial_merge_size") == 2
    pre = json.loads((folder / "preprocessor_config.json").read_text())
    assert list(proj.get("clip.vision.image_std")) == pytest.approx(pre["image_std"])
    t = proj.tensors
    assert t["v.patch_embd.weight"].shape == t["v.patch_embd.weight.1"].shape == (14, 14, 3, 32)
    assert t["mm.patch_merger.weight"].shape == (2, 2, 32, 64)
    assert {"v.blk.1.attn_qkv.weight", "v.post_ln.weight", "mm.model.fc.weight", "mm.post_norm.bias",
            "mm.gate.weight"} <= set(t)
    ocr = {"v.blk.0.attn_q_norm.weight", "v.blk.0.attn_k_norm.weight", "v.blk.0.ffn_up.bias", "v.blk.0.attn_qkv.bias"}
    learned = {"v.position_embd.weight", "v.norm_embd.weight"}
    assert (ocr <= set(t), learned <= set(t)) == {"glm4.5v": (False, True), "glm-ocr": (True, False)}[family]
    assert not (ocr | learned) & set(t) - {"glm4.5v": learned, "glm-ocr": ocr}[family]


def glm5v_metadata(vision):
    _, model, folder, path, mmproj, _ = vision
    assert read_header(path).arch == "glm5-next"
    proj = read_header(mmproj)
    assert proj.get("clip.projector_type") == "glm5v" and proj.get("clip.vision.swiglu_clamp") == 2.0
    assert (proj.get("clip.vision.image_min_pixels"), proj.get("clip.vision.image_max_pixels")) == (16 * 784,
                                                                                                    1024 * 784)
    assert proj.get("clip.vision.feed_forward_length") == 48 and proj.tensors["mm.gate.weight"].shape == (64, 48)
    assert {"v.blk.0.attn_q_norm.weight", "v.blk.0.ffn_gate.bias"} <= set(proj.tensors)
    assert "v.position_embd.weight" not in proj.tensors


@pytest.mark.parametrize("width,height,tokens", [(112, 112, 16), (168, 112, 24)])
def test_image_embeddings_match_transformers(vision, engine, width, height, tokens):
    png = fixture_png(width, height, seed=width)
    ref = image_features(vision[1], image_inputs(vision[5], png))
    got = engine.media.embeddings(load_media(png, "image"))
    assert got.shape == ref.shape == (tokens, 64)
    assert relative(got, ref) < 1e-3
    if vision[0] not in GLM4V:  # the clamps bite: without them transformers' embeddings are other
        clamped = [mod for mod in vision[1].model.visual.modules() if hasattr(mod, "swiglu_limit")]
        for mod in clamped:
            mod.swiglu_limit = float("inf")
        try:
            assert relative(got, image_features(vision[1], image_inputs(vision[5], png))) > 1e-2
        finally:
            for mod in clamped:
                mod.swiglu_limit = 2.0


@pytest.mark.parametrize("n_images", [1, 2])
def test_prompt_ids_and_logits_after_the_images(vision, engine, n_images):
    """One image, or two of different sizes (the second's M-RoPE positions start after the first's)."""
    import torch

    processor = vision[5]
    pngs = [fixture_png(112, 112, seed=9), fixture_png(168, 112, seed=11)][:n_images]
    media = tuple(load_media(png, "image") for png in pngs)
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = image_inputs(processor, pngs, text)
    ids = engine.prompt_ids([Message("user", QUESTION, media=media)])
    assert engine.media.expanded_ids(ids, media) == inputs["input_ids"][0].tolist()
    with torch.no_grad():
        ref = vision[1](**inputs).logits[0, -1].numpy()
    engine.media.prefill(ids, media)
    got = engine.engine.logits().copy()
    if vision[0] in GLM4V:
        assert relative(got, ref) < 1e-3
        return
    # GLM-5.3-Flash: its tiny random language model amplifies the embeddings' 6e-4 difference to 1.4e-3 (one
    # image) and 1.8e-3 (two) in the logits; run on libmtmd's own embeddings transformers' language model agrees
    # within 1e-4 (no rope: the positions play no part), and so does transformers with its two convolutions
    # rounded as ggml_conv_2d rounds them (the whole gap: docs/vision_precision.md)
    assert relative(got, ref) < 3e-3
    with ggml_conv_precision(vision[1]), torch.no_grad():
        assert relative(got, vision[1](**inputs).logits[0, -1].numpy()) < 2e-4
    mask = inputs["input_ids"][0] == vision[1].config.image_token_id
    with torch.no_grad():
        embeds = vision[1].get_input_embeddings()(inputs["input_ids"])
        embeds[0, mask] = torch.from_numpy(np.concatenate([engine.media.embeddings(x) for x in media]))
        hidden = vision[1].model.language_model(inputs_embeds=embeds).last_hidden_state
        same_input = vision[1].lm_head(hidden)[0, -1].numpy()
    assert relative(got, same_input) < 1e-4


def test_the_embedding_gap_is_ggml_conv_2d_rounding_to_f16(vision, engine):
    """libmtmd's glm4v graph (GLM-4.5V, GLM-OCR, GLM-5.3-Flash) convolves through ggml_conv_2d, whose im2col is F16
    even for f32 kernels: transformers with its two convolutions rounded the same way is 3-10x closer to libmtmd
    than plain transformers (GLM-4.5V's rest: the bicubic resampling of its learned positions)."""
    png = fixture_png(168, 112, seed=168)
    inputs = image_inputs(vision[5], png)
    got = engine.media.embeddings(load_media(png, "image"))
    plain = relative(got, image_features(vision[1], inputs))
    with ggml_conv_precision(vision[1]):
        rounded = relative(got, image_features(vision[1], inputs))
    assert plain > 4e-4 and rounded < 2e-4 and rounded < plain / 3, (plain, rounded)
    assert relative(got, image_features(vision[1], inputs)) == plain  # the weights are back as they were


def test_the_language_model_alone_takes_text(vision, tmp_path):
    check_text_alone(vision[3], vision[1], QUESTION, tmp_path, **F32)


def edited(vision, tmp_path, edit):
    folder = tmp_path / "ck"
    shutil.copytree(vision[2], folder)
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def family_edit(c):
    """GLM-4.5V/OCR: M-RoPE sections that do not cover the rotated dimensions; GLM-5.3-Flash: a negative clamp."""
    if c["model_type"] == "glm5_next":
        c["vision_config"]["swiglu_limit"] = -1.0
    else:
        c["text_config"]["rope_parameters"]["mrope_section"] = [2, 3, 4]


@pytest.mark.parametrize("edit,problem", [
    (family_edit, " must be"),
    (lambda c: c.pop("vision_config"), "no 'vision_config' object"),
    (lambda c: c["vision_config"].update(out_hidden_size=48), "out_hidden_size (48) differs"),
    (lambda c: c["vision_config"].update(temporal_patch_size=1), "temporal_patch_size=2"),
])
def test_bad_configs_are_refused(vision, tmp_path, edit, problem):
    folder = edited(vision, tmp_path, edit)
    dest = tmp_path / "out.gguf"
    with pytest.raises(InputError) as err:
        convert(folder, dest, "f32")
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert not dest.exists() and not (tmp_path / "mmproj-out.gguf").exists()


def test_a_vocabulary_without_image_tokens_converts_only_the_text_model(vision, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(vision[2], folder)
    path = folder / "tokenizer.json"
    path.write_text(path.read_text().replace('"<|image|>"', '"<|picture|>"'))
    with pytest.raises(InputError, match=r"the vocabulary lacks <\|image\|>, which image prompts need"):
        convert(folder, tmp_path / "out.gguf", "f32")
    assert not list(tmp_path.glob("*.gguf"))
    result = convert(folder, tmp_path / "out.gguf", "f32", mmproj=False)
    assert result.mmproj is None and result.path.is_file() and not (tmp_path / "mmproj-out.gguf").exists()


@pytest.mark.parametrize("layout,problem", [
    ("glm4", "glm-4v-9b (ChatGLMModel with a vision tower) is not supported: its EVA2-CLIP tower"),
    ("cogvlm2", "CogVLM2 is not supported: its vision tower puts a 2x2 convolution"),
])
def test_vision_checkpoints_no_projector_computes_are_refused_in_one_line(tok, tmp_path, layout, problem):
    from chatglm.devtools.glm4 import build_checkpoint

    folder = build_checkpoint("glm4" if layout == "cogvlm2" else layout, tmp_path / "ck", tok)[1]
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vision_config"] = {"hidden_size": 32, "num_hidden_layers": 2}  # the towers' settings, as published
    if layout == "cogvlm2":
        cfg.update(architectures=["CogVLMForCausalLM"], model_type="cogvlm2")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError) as err:
        convert(folder, tmp_path / "out.gguf", "f32")
    assert problem in str(err.value) and "\n" not in str(err.value) and "config.json" in str(err.value)
    assert not list(tmp_path.glob("*.gguf"))


@pytest.mark.parametrize("mmproj_type,tolerance", [("f16", 3e-3), ("q8_0", 3e-2)])
def test_stored_projector_types_encode_close_to_f32(vision, tmp_path, mmproj_type, tolerance):
    """The default f16 projector (and q8_0) beside a quantized model: norms, biases and position tables stay f32,
    convolution kernels f16; the embeddings stay near transformers' float32."""
    import gguf

    result = convert(vision[2], tmp_path / "q.gguf", "q8_0", **({} if mmproj_type == "f16" else
                                                                {"mmproj_type": mmproj_type}))
    t = read_header(result.mmproj).tensors
    QT = gguf.GGMLQuantizationType
    assert t["v.patch_embd.weight"].ggml_type == QT.F16 and t["v.post_ln.weight"].ggml_type == QT.F32
    assert t["mm.model.fc.weight"].ggml_type == {"f16": QT.F16, "q8_0": QT.Q8_0}[mmproj_type]
    whole_blocks = t["mm.down.weight"].shape[0] % 32 == 0  # else f16 (GLM-4.5V's and GLM-5.3-Flash's 48)
    assert t["mm.down.weight"].ggml_type == (QT.Q8_0 if whole_blocks and mmproj_type == "q8_0" else QT.F16)
    png = fixture_png(112, 112, seed=4)
    ref = image_features(vision[1], image_inputs(vision[5], png))
    with load(result.path, n_ctx=256, n_threads=1) as model:
        assert relative(model.media.embeddings(load_media(png, "image")), ref) < tolerance


def test_a_bfloat16_checkpoint_encodes_as_transformers_reads_it(vision, tmp_path):
    import torch
    import transformers

    from chatglm.devtools.glm_vision import bf16_copy

    folder = bf16_copy(vision[2], tmp_path / "bf16")
    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    model = getattr(transformers, arch).from_pretrained(folder, dtype=torch.float32).eval()
    result = convert(folder, tmp_path / "bf16.gguf", "f32", mmproj_type="f32")
    png = fixture_png(112, 112, seed=5)
    with load(result.path, **F32) as engine:
        got = engine.media.embeddings(load_media(png, "image"))
    assert relative(got, image_features(model, image_inputs(vision[5], png))) < 1e-3


def test_glm45v_attention_bias_is_on_qkv_only(tok, tmp_path):
    """GLM-4.5V's vision ``attention_bias`` biases qkv, not the output projection (GLM-OCR's biases both)."""
    model = tiny_glm45v(tok, seed=2, attention_bias=True)
    folder = save_vision_checkpoint(model, tmp_path / "ck", tok)
    result = convert(folder, tmp_path / "v.gguf", "f32", mmproj_type="f32")
    names = set(read_header(result.mmproj).tensors)
    assert "v.blk.0.attn_qkv.bias" in names and "v.blk.0.attn_out.bias" not in names
    png = fixture_png(112, 112, seed=3)
    ref = image_features(model, image_inputs(checkpoint_processor(folder, "Glm4vProcessor"), png))
    with load(result.path, **F32) as m:
        assert relative(m.media.embeddings(load_media(png, "image")), ref) < 1e-3


# content-part lists in two orders (the images first is test_prompt_ids_and_logits_after_the_images's)
ORDERS = {"text-image-text": ["Compare ", "image", " with 你好."],
          "image-text-image": ["image", QUESTION, "image"]}


def parts_of(order, pngs):
    """(transformers' parts, ours with the pictures in them, the pictures used)."""
    images = iter(pngs)
    ours = [{"type": "image", "image": next(images)} if p == "image" else {"type": "text", "text": p} for p in order]
    used = [p["image"] for p in ours if p["type"] == "image"]
    return [{"type": p["type"]} if p["type"] == "image" else p for p in ours], ours, used


@pytest.mark.parametrize("order", list(ORDERS))
def test_images_stand_where_their_parts_are(vision, engine, order):
    """Each image where its part is: the ids with the images expanded equal the processor's for the same part list
    (text-image-text: the logits after it too, the text on both sides of the image evaluated around its chunk)."""
    import torch

    processor = vision[5]
    hf_parts, ours, used = parts_of(ORDERS[order], [fixture_png(112, 112, seed=9), fixture_png(168, 112, seed=11)])
    text = processor.apply_chat_template([{"role": "user", "content": hf_parts}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = image_inputs(processor, used, text)
    message = Message.from_dict({"role": "user", "content": ours})
    ids = engine.prompt_ids([message])
    assert engine.media.expanded_ids(ids, message.media) == inputs["input_ids"][0].tolist()
    if order != "text-image-text":
        return
    image_at = ids.index(engine.media.placeholder_id)
    assert engine.detokenize(ids[image_at + 2:]).startswith(" with 你好.")  # text after the image
    engine.media.prefill(ids, message.media)
    with torch.no_grad():
        ref = vision[1](**inputs).logits[0, -1].numpy()
    assert relative(engine.engine.logits().copy(), ref) < (1e-3 if vision[0] in GLM4V else 3e-3)


@pytest.fixture(scope="module")
def glm53flash_official(tok, tmp_path_factory):
    """The tiny GLM-5.3-Flash with its official chat template (so the GGUF takes the ``glm53flash`` builder)."""
    from test_media_placement import template_of

    official = template_of("GLM-5.3-Flash.jinja")
    root = tmp_path_factory.mktemp("glm53-official")
    model, folder = glm5_next.build_vision_checkpoint(root / "ck", tok, seed=1)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": official}))
    result = convert(folder, root / "flash.gguf", "f32", mmproj_type="f32")
    return result.path, checkpoint_processor(folder, "Glm5NextProcessor")


def test_glm53flash_places_images_with_its_official_template(glm53flash_official):
    """The token-exact builder places images itself (no template fallback): its ids with the placeholders
    expanded equal the processor's for the official template, in the full order (text, image, text, image)."""
    path, processor = glm53flash_official
    hf_parts, ours, used = parts_of(["Compare ", "image", " with ", "image", " please."],
                                    [fixture_png(112, 112, seed=9), fixture_png(168, 112, seed=10)])
    text = processor.apply_chat_template([{"role": "user", "content": hf_parts}], add_generation_prompt=True,
                                         tokenize=False, reasoning_effort="high")
    inputs = image_inputs(processor, used, text)
    message = Message.from_dict({"role": "user", "content": ours})
    with load(path, **F32) as model:
        assert model.format.name == "glm53flash" and model.format.places_media
        assert model.format_for([message]) is model.format is model.media_format
        ids = model.prompt_ids([message], reasoning_effort="high")
        assert model.media.expanded_ids(ids, message.media) == inputs["input_ids"][0].tolist()
        session = model.session(reasoning_effort="high")
        reply = session.chat([message], max_tokens=2, temperature=0)
        assert reply.role == "assistant" and session.messages[0].media == message.media

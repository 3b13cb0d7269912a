"""GLM-Edge-V (``GlmForCausalLM`` with a SigLIP tower and the GLM_EDGE adapter → llama.cpp ``chatglm`` + libmtmd's
``adapter`` projector) proven against transformers and a torch adapter written from the published architecture.

The tiny checkpoint (``chatglm/devtools/glm_edge_v.py``): transformers' ``GlmForCausalLM`` (2 layers, 64 wide) and
``SiglipVisionModel`` (2 blocks, 32 wide, 112 px in 14 px patches: an 8x8 grid), the adapter as published (no
transformers class exists for it), in the published names. A 112x112 image gives 16 + 2 embeddings (boi, eoi).
libmtmd's embeddings within 1e-3 relative of the torch reference; the prompt ids (each image's run of
``<|begin_of_image|>``) equal to the template's as transformers renders it; the logits after the image within 1e-3
of ``GlmForCausalLM`` fed the same embeddings; bad inputs refused in one line before libmtmd.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from chatglm.convert.pipeline import convert
from chatglm.devtools.glm4 import train_glm4_bpe
from chatglm.devtools.glm_edge_v import build_edge_v_checkpoint, ggml_precision
from chatglm.devtools.glm_vision import fixture_png
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.gguf_file import read_header
from chatglm.runtime.media import load_media
from chatglm.runtime.messages import Message
from chatglm.runtime.model import load
from fixtures_vision import check_text_alone, relative
from tests.fixtures_glm5_next import rewrite_gguf

F32 = {"n_ctx": 256, "n_threads": 1, "kv_type": "f32", "flash_attn": False}
QUESTION = "What is in the picture? 你好"
N_IMAGE = 18  # (112 / 14 / 2)^2 + boi + eoi


@pytest.fixture(scope="module")
def tok():
    return train_glm4_bpe()


@pytest.fixture(scope="module")
def edge(tok, tmp_path_factory):
    """(reference model, checkpoint folder, f32 GGUF, its f32 projector)."""
    root = tmp_path_factory.mktemp("edge_v")
    model, folder = build_edge_v_checkpoint(root / "ck", tok, seed=1)
    result = convert(folder, root / "edge.gguf", "f32", mmproj_type="f32")
    return model, folder, result.path, result.mmproj


@pytest.fixture(scope="module")
def engine(edge):
    with load(edge[2], **F32) as model:
        yield model


def template_ids(folder, n_images: int) -> list[int]:
    """transformers' rendering of the checkpoint's template for images then QUESTION."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": QUESTION}]
    out = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_metadata_and_projector(edge):
    _, folder, path, mmproj = edge
    header = read_header(path)
    assert (header.arch, header.get("glm.family"), header.get("glm.chat_format")) == ("chatglm", "glm-edge-v",
                                                                                       "glm-edge-v")
    assert not any(name.startswith(("v.", "adapter.")) for name in header.tensors)
    proj = read_header(mmproj)
    assert proj.arch == "clip" and proj.get("clip.projector_type") == "adapter"
    assert proj.get("clip.has_vision_encoder") is True and proj.get("clip.use_gelu") is True
    sizes = {k: proj.get(f"clip.vision.{k}") for k in ("image_size", "patch_size", "embedding_length",
                                                       "feed_forward_length", "block_count", "projection_dim",
                                                       "attention.head_count")}
    assert sizes == {"image_size": 112, "patch_size": 14, "embedding_length": 32, "feed_forward_length": 48,
                     "block_count": 2, "projection_dim": 64, "attention.head_count": 2}
    assert proj.get("clip.vision.attention.layer_norm_epsilon") == pytest.approx(1e-6)
    assert list(proj.get("clip.vision.image_mean")) == [0.5, 0.5, 0.5]
    t = proj.tensors
    assert t["v.patch_embd.weight"].shape == (14, 14, 3, 32) and t["v.position_embd.weight"].shape == (32, 64)
    assert t["v.blk.1.ffn_up.weight"].shape == (32, 48) and t["v.blk.1.ffn_down.weight"].shape == (48, 32)
    assert t["adapter.conv.weight"].shape == (2, 2, 32, 64) and t["adapter.linear.gate.weight"].shape == (64, 96)
    assert t["adapter.boi"].shape == t["adapter.eoi"].shape == (64, 1)
    assert not any("head" in name for name in t)  # SigLIP's pooling head is left out


def test_default_projector_is_f16_with_boi_eoi_and_positions_f32(edge, tmp_path):
    result = convert(edge[1], tmp_path / "half.gguf", "f16")
    t = read_header(result.mmproj).tensors
    f32, f16 = 0, 1
    assert t["adapter.linear.linear.weight"].ggml_type == f16 and t["v.blk.0.attn_q.weight"].ggml_type == f16
    assert t["adapter.conv.weight"].ggml_type == f16
    assert {t[n].ggml_type for n in ("adapter.boi", "adapter.eoi", "v.position_embd.weight", "v.post_ln.bias")} == {
        f32}
    with load(result.path, n_threads=1, n_ctx=256) as model:
        png = fixture_png(112, 112, seed=5)
        assert relative(model.media.embeddings(load_media(png, "image")), edge[0].image_embeddings(png)) < 3e-3


@pytest.mark.parametrize("seed", [5, 112])
def test_image_embeddings_match_the_torch_reference(edge, engine, seed):
    """SigLIP (transformers) + the adapter written from the published architecture + boi/eoi. The gap (5e-4 to
    1e-3 over the images measured) is ggml's f16 rounding: the im2col of both convolutions and the f16 GELU table."""
    model = edge[0]
    png = fixture_png(112, 112, seed=seed)
    ref = model.image_embeddings(png)
    got = engine.media.embeddings(load_media(png, "image"))
    assert got.shape == ref.shape == (N_IMAGE, 64)
    assert relative(got, ref) < 1e-3
    assert np.array_equal(got[0], ref[0]) and np.array_equal(got[-1], ref[-1])  # boi/eoi copied exactly
    # computed at libmtmd's precision (f16 im2col, the f16 GELU table in its tanh form where the published adapter
    # has the exact GELU) the reference moves by 7e-4 / 9e-4 and comes closer to libmtmd (5.6e-4 / 3.1e-4)
    with ggml_precision(model):
        emulated = model.image_embeddings(png)
    assert relative(emulated, ref) > 1e-4
    assert relative(got, emulated) < relative(got, ref)


@pytest.mark.parametrize("n_images", [1, 2])
def test_prompt_ids_and_logits_after_the_images(edge, engine, n_images):
    """One image, or two side by side (their runs of <|begin_of_image|> touch)."""
    model, folder = edge[0], edge[1]
    pngs = [fixture_png(112, 112, seed=9), fixture_png(112, 112, seed=11)][:n_images]
    media = tuple(load_media(png, "image") for png in pngs)
    ids = engine.prompt_ids([Message("user", QUESTION, media=media)])
    assert sum(1 for t in ids if t == engine.media.placeholder_id) == n_images
    expanded = engine.media.expanded_ids(ids, media)
    assert expanded == template_ids(folder, n_images)
    engine.media.prefill(ids, media)
    got = engine.engine.logits().copy()
    ours = [engine.media.embeddings(x) for x in media]
    assert relative(got, model.logits_with_images(expanded, ours)) < 1e-4  # the same embeddings
    assert relative(got, model.logits_with_images(expanded, [model.image_embeddings(p) for p in pngs])) < 1e-3


def test_the_language_model_alone_takes_text(edge, tmp_path):
    check_text_alone(edge[2], edge[0].lm, QUESTION, tmp_path, **F32)


def test_mmproj_of_another_model_is_refused_before_libmtmd(edge, tok, tmp_path):
    narrow = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    _, other = build_edge_v_checkpoint(tmp_path / "other", tok, seed=2, text=narrow)
    result = convert(other, tmp_path / "other.gguf", "f32")
    with pytest.raises(InputError, match="another model") as err:
        load(edge[2], mmproj=result.mmproj, n_threads=1)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("edit,problem", [
    ({"drop": ("adapter.linear.gate.weight",)}, "lacks tensor adapter.linear.gate.weight"),
    ({"drop": ("adapter.eoi",)}, "lacks tensor adapter.eoi"),
    ({"drop": ("v.blk.1.ffn_down.bias",)}, "lacks tensor v.blk.1.ffn_down.bias"),
    ({"kv": {"clip.vision.image_size": 224}}, "tensor v.position_embd.weight has shape [32, 64], expected [32, 256]"),
    ({"kv": {"clip.vision.image_size": 126}}, "do not fit libmtmd's GLM-Edge graph"),
    ({"kv": {"clip.vision.feed_forward_length": 32}}, "do not fit libmtmd's GLM-Edge graph"),
])
def test_bad_projector_files_are_refused_before_libmtmd(edge, tmp_path, edit, problem):
    bad = rewrite_gguf(edge[3], tmp_path / "mmproj-bad.gguf", dict(edit.get("kv", {})), edit.get("drop", ()))
    with pytest.raises(InputError) as err:
        load(edge[2], mmproj=bad, n_threads=1)
    assert problem in str(err.value) and "\n" not in str(err.value) and "mmproj-bad.gguf" in str(err.value)


def edited_checkpoint(edge, tmp_path, *, config=None, tensors=None):
    """A copy of the checkpoint with config.json edited and its tensors edited (a name -> array or None dict)."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / "ck"
    shutil.copytree(edge[1], folder)
    if config:
        cfg = json.loads((folder / "config.json").read_text())
        config(cfg)
        (folder / "config.json").write_text(json.dumps(cfg))
    if tensors:
        state = load_file(folder / "model.safetensors")
        for name, value in tensors.items():
            state.pop(name) if value is None else state.__setitem__(name, value)
        save_file(state, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("edit,error,problem", [
    ({"tensors": {"model.vision.adapter.linear_proj.gate_proj.weight": None}}, InputError,
     "checkpoint lacks projector tensors: model.vision.adapter.linear_proj.gate_proj.weight"),
    ({"tensors": {"model.vision.adapter.boi": np.zeros((1, 2, 64), np.float32)}}, InputError,
     "tensor 'model.vision.adapter.boi' has shape [1, 2, 64], expected [1, 1, 64]"),
    ({"tensors": {"model.vision.adapter.conv.weight": np.zeros((64, 32, 3, 3), np.float32)}}, InputError,
     "tensor 'model.vision.adapter.conv.weight' has shape [64, 32, 3, 3], expected [64, 32, 2, 2]"),
    ({"tensors": {"model.vision.adapter.extra.weight": np.zeros((2,), np.float32)}}, InputError,
     "does not know: model.vision.adapter.extra.weight"),
    ({"config": lambda c: c["vision_config"].update(hidden_act="gelu")}, UnsupportedModelError,
     "vision_config.hidden_act='gelu' is not supported"),
    ({"config": lambda c: c["vision_config"].update(image_size=98)}, InputError,
     "must be an even number of patches of 14"),
    ({"config": lambda c: c["vision_config"].update(intermediate_size=32)}, UnsupportedModelError,
     "intermediate_size equal to hidden_size (32) is not supported"),
    ({"config": lambda c: c["vision_config"].update(num_hidden_layers=3)}, InputError,
     "'vision_config.num_hidden_layers' is 3 but the checkpoint holds 2 layers"),
])
def test_bad_checkpoints_are_refused_in_one_line(edge, tmp_path, edit, error, problem):
    folder = edited_checkpoint(edge, tmp_path, **edit)
    with pytest.raises(error) as err:
        convert(folder, tmp_path / "out.gguf", "f32")
    assert problem in str(err.value) and "\n" not in str(err.value)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_cli_convert_q4_k_m_and_run_with_an_image(edge, tmp_path):
    from tests.hostile import assert_refused, cli

    out = tmp_path / "m.gguf"
    done = cli(["convert", edge[1], "-t", "q4_k_m", "-o", out])
    assert done.code == 0, done.text
    assert (tmp_path / "mmproj-m.gguf").is_file()
    assert read_header(tmp_path / "mmproj-m.gguf").tensors["adapter.linear.linear.weight"].ggml_type == 1  # f16
    png = tmp_path / "x.png"
    png.write_bytes(fixture_png(112, 112, seed=3))
    run = cli(["run", out, "--image", png, "-p", QUESTION, "--max-tokens", "3", "--json"])
    assert run.code == 0, run.text
    usage = json.loads(run.out.strip().splitlines()[-1])["usage"]
    assert usage["prompt_tokens"] == len(template_ids(edge[1], 1)) - N_IMAGE + 1  # the image's run as one id
    assert 0 < usage["completion_tokens"] <= 3
    bad = rewrite_gguf(tmp_path / "mmproj-m.gguf", tmp_path / "mmproj-bad.gguf", {}, ("adapter.boi",))
    refused = cli(["run", out, "--mmproj", bad, "--image", png, "-p", QUESTION, "--max-tokens", "3"])
    assert_refused(refused, "mmproj-bad.gguf", code=None, problem="lacks tensor adapter.boi")


def test_runs_of_the_image_token_become_one_placeholder_each():
    from chatglm.families.glm4_hf.chat import collapse_runs

    assert collapse_runs([1, 7, 7, 7, 2, 7, 7, 7, 3], 7, 2) == [1, 7, 2, 7, 3]
    assert collapse_runs([1, 7, 7, 7, 7, 3], 7, 2) == [1, 7, 7, 3]  # two images side by side
    assert collapse_runs([1, 7, 3], 7, 0) == [1, 7, 3]  # no media: the ids as the template wrote them
    with pytest.raises(InputError, match="wrote 5 <\\|begin_of_image\\|> tokens for 2 images"):
        collapse_runs([1, 7, 7, 7, 2, 7, 7, 3], 7, 2)


def test_siglip_position_ids_buffer_is_left_out(edge, tmp_path):
    """Files saved by older transformers hold SigLIP's position-id buffer; the pooling head is always there."""
    ids = np.arange(64, dtype=np.int64)[None]
    folder = edited_checkpoint(edge, tmp_path, tensors={
        "model.vision.vit.model.vision_model.embeddings.position_ids": ids})
    result = convert(folder, tmp_path / "out.gguf", "f32")
    assert "v.position_ids" not in read_header(result.mmproj).tensors and result.path.is_file()


@pytest.mark.parametrize("size", [(112, 112), (640, 480)])
def test_memory_estimate_counts_the_tokens_libmtmd_gives(edge, engine, size):
    """libmtmd resizes every image to the projector's image_size: the estimate is the embeddings it really gives."""
    from chatglm.runtime.mtmd import projector_estimate

    est = projector_estimate(edge[2], images=[size])
    assert est.projector_type == "adapter" and est.image_tokens == N_IMAGE
    got = engine.media.embeddings(load_media(fixture_png(*size, seed=3), "image"))
    assert got.shape[0] == est.image_tokens

"""GLM-4.1V (``Glm4vForConditionalGeneration``): convert (model + mmproj), libmtmd against transformers, prompts
against the checkpoint's processor, text-only use, and the refusals before any native call."""

from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest

from chatglm.errors import InputError

torch = pytest.importorskip("torch")

TOL = 1e-3  # relative to the largest reference value


def rel(a, b) -> float:
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from chatglm.devtools.glm4v import save_glm4v_checkpoint, tiny_glm4v, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_glm4v(tok, seed=3)
    folder = save_glm4v_checkpoint(model, tok, tmp_path_factory.mktemp("glm4v") / "GLM-4.1V-tiny")
    return model, folder


@pytest.fixture(scope="module")
def files(built, tmp_path_factory):
    from chatglm.convert.pipeline import convert

    out = tmp_path_factory.mktemp("glm4v-gguf") / "glm4v.gguf"
    result = convert(built[1], out, "f32", mmproj_type="f32")
    return result


@pytest.fixture(scope="module")
def processor(built):
    """The checkpoint's processor (its tokenizer, image processor and template; no torchvision here, so the video
    processor the class names is left out)."""
    from transformers import AutoTokenizer, processing_utils
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    folder = built[1]
    check = processing_utils.ProcessorMixin.check_argument_for_proper_class
    processing_utils.ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
    try:
        return Glm4vProcessor(image_processor=Glm4vImageProcessorPil.from_pretrained(folder),
                              tokenizer=AutoTokenizer.from_pretrained(folder), video_processor=None,
                              chat_template=(folder / "chat_template.jinja").read_text())
    finally:
        processing_utils.ProcessorMixin.check_argument_for_proper_class = check


@pytest.fixture(scope="module")
def loaded(files):
    import chatglm

    with chatglm.load(files.path, n_threads=2) as m:
        yield m


def image(width: int, height: int, seed: int = 0):
    from chatglm.devtools.glm4v import png_bytes, test_image
    from chatglm.runtime.media import load_media

    rgb = test_image(width, height, seed)
    return rgb, load_media(png_bytes(rgb), "image")


def reference(model, processor, rgb_images, question: str):
    parts = [{"type": "image"} for _ in rgb_images] + [{"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": parts}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = processor(text=[text], images=list(rgb_images), return_tensors="pt")
    with torch.no_grad():
        feats = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output
        logits = model(**inputs).logits[0, -1].numpy()
    return inputs["input_ids"][0].tolist(), torch.cat(list(feats)).numpy(), logits


# -------------------------------------------------------------------------------------------------- convert


def test_convert_writes_the_model_and_its_projector(files, built):
    from chatglm.gguf_file import read_header

    assert files.mmproj == files.path.with_name("mmproj-glm4v.gguf") and files.mmproj.is_file()
    text, proj = read_header(files.path), read_header(files.mmproj)
    assert text.arch == "glm4" and text.get("glm.family") == "glm4v"
    assert list(text.arch_get("rope.dimension_sections")) == [1, 1, 2, 0]
    assert not any(n.startswith("v.") or n.startswith("mm.") for n in text.tensors)
    assert proj.arch == "clip" and proj.get("clip.projector_type") == "glm4v"
    assert proj.get("clip.has_vision_encoder") is True and proj.get("clip.use_silu") is True
    vision = json.loads((built[1] / "config.json").read_text())["vision_config"]
    assert proj.get("clip.vision.block_count") == vision["depth"]
    assert proj.get("clip.vision.projection_dim") == text.arch_get("embedding_length")
    assert proj.tensors["v.patch_embd.weight"].shape == proj.tensors["v.patch_embd.weight.1"].shape == (14, 14, 3, 32)
    assert len(list(built[1].glob("model-*.safetensors"))) > 1  # read as published: sharded with an index


def test_mmproj_types_and_skipping(built, tmp_path):
    from chatglm.cli.app import app
    from chatglm.gguf_file import read_header
    from typer.testing import CliRunner

    out = tmp_path / "m.gguf"
    run = CliRunner().invoke(app, ["convert", str(built[1]), "-t", "q8_0", "-o", str(out), "--mmproj-type", "q8_0"])
    assert run.exit_code == 0, run.output
    assert "mmproj-m.gguf" in run.output and "m.gguf" in run.output
    proj = read_header(tmp_path / "mmproj-m.gguf")
    types = {n: t.ggml_type for n, t in proj.tensors.items()}
    assert types["mm.model.fc.weight"] == 8 and types["v.patch_embd.weight"] == 1  # q8_0; kernels f16
    assert types["v.position_embd.weight"] == 0 and types["v.blk.0.ln1.weight"] == 0
    bare = tmp_path / "bare.gguf"
    run = CliRunner().invoke(app, ["convert", str(built[1]), "-o", str(bare), "--no-mmproj"])
    assert run.exit_code == 0 and not (tmp_path / "mmproj-bare.gguf").exists()
    run = CliRunner().invoke(app, ["convert", str(built[1]), "-o", str(tmp_path / "x.gguf"), "--mmproj-type", "q4"])
    assert run.exit_code == 2 and not (tmp_path / "x.gguf").exists() and "q4" in run.output


# ---------------------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("size", [(112, 112), (168, 112)])
def test_image_embeddings_and_logits_match_transformers(loaded, built, processor, size):
    from chatglm.runtime.messages import Message

    rgb, media = image(*size)
    ids_ref, feats, logits = reference(built[0], processor, [rgb], "What is in the picture?")
    emb = loaded.media.embeddings(media)
    assert emb.shape == feats.shape and rel(emb, feats) < TOL
    ids = loaded.prompt_ids([Message("user", "What is in the picture?", media=(media,))])
    assert loaded.media.expanded_ids(ids, [media]) == ids_ref
    loaded.media.prefill(ids, [media])
    assert rel(loaded.engine.logits(), logits) < TOL


def test_two_images_in_one_message(loaded, built, processor):
    from chatglm.runtime.messages import Message

    (rgb1, m1), (rgb2, m2) = image(112, 112, 1), image(112, 168, 2)
    ids_ref, _, logits = reference(built[0], processor, [rgb1, rgb2], "Compare them.")
    ids = loaded.prompt_ids([Message("user", "Compare them.", media=(m1, m2))])
    assert loaded.media.expanded_ids(ids, [m1, m2]) == ids_ref
    loaded.media.prefill(ids, [m1, m2])
    assert rel(loaded.engine.logits(), logits) < TOL


def test_the_whole_order_in_a_conversation_matches_transformers(files, built, processor):
    """Text, image, text, image, text in the last turn (each image at its ``Media.offset``), after a system turn,
    an image-first turn and a reply; three images of three sizes: the ids with the images expanded equal the
    processor's for the same messages and images, and the logits after them are within 1e-3 (f32 weights and cache)."""
    import chatglm
    from chatglm.devtools.glm4v import png_bytes
    from chatglm.runtime.messages import Message

    rgbs = [image(*size, seed)[0] for size, seed in (((112, 112), 7), ((168, 112), 8), ((112, 168), 9))]
    first = [("image", rgbs[0]), ("text", "Describe it.")]
    last = [("text", "Compare "), ("image", rgbs[1]), ("text", " with "), ("image", rgbs[2]),
            ("text", ", then say which is brighter.")]

    def parts(items, hf: bool):
        return [{"type": "text", "text": x} if kind == "text" else {"type": "image"} if hf else
                {"type": "image", "image": png_bytes(x)} for kind, x in items]

    hf = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts(first, True)},
          {"role": "assistant", "content": "A gradient."}, {"role": "user", "content": parts(last, True)}]
    ours = [Message("system", "Be brief."), Message.from_dict({"role": "user", "content": parts(first, False)}),
            Message("assistant", "A gradient."), Message.from_dict({"role": "user", "content": parts(last, False)})]
    assert [x.offset for x in ours[1].media] == [0] and [x.offset for x in ours[3].media] == [8, 14]
    text = processor.apply_chat_template(hf, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=rgbs, return_tensors="pt")
    media = [x for m in ours for x in m.media]
    with chatglm.load(files.path, n_threads=2, kv_type="f32", flash_attn=False) as m:
        ids = m.prompt_ids(ours)
        assert ids.count(m.media.placeholder_id) == 3
        assert m.media.expanded_ids(ids, media) == inputs["input_ids"][0].tolist()
        m.media.prefill(ids, media)
        with torch.no_grad():
            ref = built[0](**inputs).logits[0, -1].numpy()
        assert rel(m.engine.logits(), ref) < TOL


def test_text_alone_with_the_same_gguf(loaded, built, processor):
    ids = processor.tokenizer("[gMASK]<sop><|user|>\nhello there, how are you?<|assistant|>\n")["input_ids"]
    with torch.no_grad():
        ref = built[0](input_ids=torch.tensor([ids])).logits[0].numpy()
    assert rel(loaded.engine.all_logits(ids), ref) < TOL


# -------------------------------------------------------------------------------------------------- API and CLI


def test_session_send_streams_and_cancels(loaded):
    _, media = image(112, 112)
    session = loaded.session(max_tokens=6, temperature=0)
    reply = session.send("Describe it.", images=[media.data])
    assert loaded.last_stats.prompt_tokens > 0 and reply.role == "assistant"
    assert session.messages[-2].media == (media,)
    pieces = list(session.send("And now?", images=[media.data], stream=True))
    assert "".join(pieces) == session.last_reply.content
    cancel = threading.Event()
    cancel.set()
    session.send("Stop.", images=[media.data], cancel=cancel)
    assert loaded.last_stats.finish_reason == "cancelled"


def test_a_saved_conversation_keeps_its_images(loaded, tmp_path):
    """/save and /load (ChatSession.save/load) of a conversation with an image from a file and one given as bytes:
    the loaded session writes the same prompt, images in place; a changed file is refused in one line."""
    from chatglm.devtools.glm4v import png_bytes, test_image
    from chatglm.errors import InputError
    from chatglm.runtime.messages import Message

    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes(test_image(112, 112, 5)))
    session = loaded.session(max_tokens=3, temperature=0)
    session.chat([Message.from_dict({"role": "user", "content": [
        {"type": "text", "text": "Compare"}, {"type": "image", "image": str(photo)}, {"type": "text", "text": "with"},
        {"type": "image", "image": image(112, 112, 6)[1].data}]})])
    session.save(tmp_path / "conv.json")
    restored = loaded.session()
    restored.load(tmp_path / "conv.json")
    nxt = [Message("user", "And now?")]
    def media(s):  # (a medium's name says where it came from: a saved one's is its part)
        return [[(x.kind, x.data, x.offset, x.path) for x in m.media] for m in s.messages]

    assert media(restored) == media(session) and media(session)[0][0][1:] == (photo.read_bytes(), 7, str(photo))
    assert loaded.prompt_ids(restored.messages + nxt) == loaded.prompt_ids(session.messages + nxt)
    photo.write_bytes(png_bytes(test_image(112, 112, 7)))
    with pytest.raises(InputError, match=r"conv\.json: messages\[0\]\.content\[1\]: the saved image .*photo\.png "
                                         r"has changed since the conversation was saved"):
        restored.load(tmp_path / "conv.json")
    assert len(restored.messages) == 2  # the conversation stays as it was


def test_a_later_turn_keeps_the_image_in_the_cache(loaded, built, processor):
    from chatglm.runtime.messages import Message

    rgb, media = image(112, 112, 4)
    session = loaded.session(max_tokens=3, temperature=0)
    session.send("Describe it.", images=[media.data])
    first = loaded.last_stats
    assert first.evaluated_tokens >= 16
    session.send("Shorter, please.")
    again = loaded.last_stats
    assert again.evaluated_tokens < again.prompt_tokens - 4  # a fresh prompt: its text, and 16 image entries
    # the cached image and the new turn give the logits a fresh evaluation of the whole prompt gives
    ids = loaded.prompt_ids(session.messages[:-1] + [Message("user", "x")])
    loaded.media.prefill(ids, [media])
    kept = loaded.engine.logits().copy()
    loaded.engine.reset()
    loaded.media.prefill(ids, [media])
    assert rel(kept, loaded.engine.logits()) < 1e-5


def test_text_only_model_refuses_an_image(files, tmp_path):
    import chatglm

    lone = tmp_path / "lone.gguf"
    shutil.copy(files.path, lone)
    _, media = image(112, 112)
    with chatglm.load(lone, n_threads=1) as m:
        assert m.media is None
        assert m.chat("hello", max_tokens=2) is not None  # text chat works
        with pytest.raises(InputError, match="takes text only"):
            m.session().send("what is this?", images=[media.data])


def test_cli_run_with_image_and_refusals(files, tmp_path):
    from typer.testing import CliRunner

    from chatglm.cli.app import app
    from chatglm.devtools.glm4v import png_bytes, test_image

    png = tmp_path / "photo.png"
    png.write_bytes(png_bytes(test_image(112, 112)))
    runner = CliRunner()
    run = runner.invoke(app, ["run", str(files.path), "--image", str(png), "--image", str(png), "-p", "What?",
                              "--max-tokens", "3", "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout.strip().splitlines()[-1])["usage"]["prompt_tokens"] > 0
    lone = tmp_path / "lone.gguf"
    shutil.copy(files.path, lone)
    run = runner.invoke(app, ["run", str(lone), "--image", str(png), "-p", "What?"])
    assert run.exit_code == 2 and "takes text only" in run.output and "Traceback" not in run.output
    assert len(run.output.strip().splitlines()) == 1
    info = runner.invoke(app, ["info", str(files.path), "--json"])
    d = json.loads(info.stdout)
    assert d["projector"]["projector_type"] == "glm4v" and d["projector"]["image_tokens"] == 16
    assert d["memory"]["total"] > d["memory"]["weights"] + d["memory"]["kv_cache"] + d["projector"]["weights"]


def test_mmproj_of_another_model_is_refused_before_libmtmd(files, tmp_path):
    """A projector whose embeddings are another width: refused from its header (libmtmd would abort)."""
    import chatglm
    from chatglm.convert.pipeline import convert
    from chatglm.devtools.glm4v import save_glm4v_checkpoint, tiny_glm4v, tiny_tokenizer

    tok = tiny_tokenizer()
    narrow = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1}
    other = save_glm4v_checkpoint(tiny_glm4v(tok, text=narrow), tok, tmp_path / "other")
    result = convert(other, tmp_path / "other.gguf", "f16")
    with pytest.raises(InputError, match="another model"):
        chatglm.load(files.path, mmproj=result.mmproj)
    with pytest.raises(InputError, match="not a multimodal projector"):
        chatglm.load(files.path, mmproj=result.path)


def test_glm46v_config_converts_as_the_same_layout(built, tmp_path):
    from chatglm.convert.checkpoint import Checkpoint
    from chatglm.convert.family import detect

    folder = tmp_path / "glm46v"
    shutil.copytree(built[1], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="glm46v", architectures=["Glm46VForConditionalGeneration"])
    (folder / "config.json").write_text(json.dumps(cfg))
    with Checkpoint(folder) as ckpt:
        family = detect(ckpt)
        assert family.name == "glm4v" and family.projector().projector_type == "glm4v"


def test_bad_vision_configs_are_one_line_refusals(built, tmp_path):
    from chatglm.convert.pipeline import convert

    for key, value, words in (("out_hidden_size", 48, "differs"), ("temporal_patch_size", 1, "temporal_patch_size"),
                              ("hidden_act", "gelu", "hidden_act")):
        folder = tmp_path / key
        shutil.copytree(built[1], folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["vision_config"][key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(InputError, match=words):
            convert(folder, tmp_path / f"{key}.gguf", "f16")
        assert not (tmp_path / f"{key}.gguf").exists() and not (tmp_path / f"mmproj-{key}.gguf").exists()


@pytest.mark.parametrize("kv, drop, words", [
    ({"clip.vision.spatial_merge_size": 3}, (), "spatial_merge_size must be 2"),
    ({}, ("v.patch_embd.bias",), "lacks tensor v.patch_embd.bias"),
    ({"clip.vision.block_count": 3}, (), "lacks tensor v.blk.2"),
    ({"clip.vision.attention.head_count": 3}, (), "heads"),
    ({"clip.projector_type": "glm9z"}, (), "not supported"),
    ({"clip.has_vision_encoder": None}, (), "no vision encoder"),
])
def test_crafted_projectors_are_refused_from_their_header(files, tmp_path, kv, drop, words):
    """What libmtmd's glm4v loader or graph would abort on (GGML_ASSERT) is refused first, in one line."""
    from fixtures_glm5_next import rewrite_gguf

    from chatglm.runtime.mtmd import check_projector

    bad = rewrite_gguf(files.mmproj, tmp_path / "mmproj-bad.gguf", dict(kv), drop)
    with pytest.raises(InputError, match=words):
        check_projector(bad)


def test_the_written_projector_passes_the_shared_table_and_one_shape_off_is_named(files):
    """The file the writer wrote passes the runtime's check (the same table, ``glm4v/tower.py``); the same header
    with one tensor's shape changed is refused in one line naming it and both shapes."""
    from dataclasses import replace

    from chatglm.families.glm4v.chat import check_projector as check_tower
    from chatglm.gguf_file import read_header
    from chatglm.runtime.mtmd import check_projector

    assert check_projector(files.mmproj).projector_type == "glm4v"
    header = read_header(files.mmproj)
    check_tower(header, InputError)
    t = header.tensors["v.blk.1.ffn_down.weight"]
    header.tensors[t.name] = replace(t, shape=(t.shape[0] + 1, t.shape[1]))
    with pytest.raises(InputError) as err:
        check_tower(header, InputError)
    assert str(err.value) == (f"tensor v.blk.1.ffn_down.weight has shape [{t.shape[0] + 1}, {t.shape[1]}], "
                              f"expected [{t.shape[0]}, {t.shape[1]}]")


def test_repl_image_attaches_to_the_next_message(loaded, tmp_path, capsys):
    from test_repl import ScriptedEditor

    from chatglm.cli.repl import Repl
    from chatglm.devtools.glm4v import png_bytes, test_image

    png = tmp_path / "p.png"
    png.write_bytes(png_bytes(test_image(112, 112, 5)))
    (tmp_path / "empty.png").write_bytes(b"")
    session = loaded.session(max_tokens=2, temperature=0)
    Repl(session, editor=ScriptedEditor([f"/image {png}", f"/image {tmp_path / 'empty.png'}", "what is it?",
                                         "and now?"])).run()
    err = capsys.readouterr().err
    assert "attached" in err and "0 bytes" in err
    users = [m for m in session.messages if m.role == "user"]
    assert len(users) == 2 and len(users[0].media) == 1 and users[1].media == ()


def test_model_chat_takes_content_parts(loaded, tmp_path):
    from chatglm.devtools.glm4v import png_bytes, test_image

    png = tmp_path / "c.png"
    png.write_bytes(png_bytes(test_image(112, 112, 6)))
    msgs = [{"role": "user", "content": [{"type": "image", "image": str(png)}, {"type": "text", "text": "What?"}]}]
    reply = loaded.chat(msgs, max_tokens=2, temperature=0)
    assert reply.role == "assistant" and loaded.last_stats.evaluated_tokens > 16
    with pytest.raises(InputError, match="content part"):
        loaded.chat([{"role": "user", "content": [{"type": "video", "video": "x"}]}])
    with pytest.raises(InputError, match="not an image"):
        loaded.chat([{"role": "user", "content": [{"type": "image", "image": b"GIF8 nope"}]}])


def test_media_that_do_not_fit_or_have_no_place_are_refused(files):
    import chatglm
    from chatglm.errors import ContextOverflowError
    from chatglm.runtime.messages import Message

    _, small = image(112, 112)
    _, large = image(448, 448)  # 256 embeddings
    with chatglm.load(files.path, n_threads=1, n_ctx=256) as m:
        with pytest.raises(ContextOverflowError, match="needs"):
            m.chat([Message("user", "What is in this picture?", media=(large,))])
        # a reply runs until the context is full, counting each image's 16 entries (not its 4 positions)
        m.chat([Message("user", "What?", media=(small, small, small))], temperature=0, max_tokens=None)
        assert m.last_stats.finish_reason in ("length", "stop")
        assert len(m.engine.tokens) + m.engine.extra_cells <= m.info.n_ctx
    with chatglm.load(files.path, n_threads=1, chat_format="glm4-0414") as m:  # a builder without image parts
        with pytest.raises(InputError, match="0 <|image|> placeholders for 1 image"):
            m.chat([Message("user", "What?", media=(small,))])


def test_the_pre_4_52_layout_converts_the_same(built, files, tmp_path):
    """transformers before 4.52 saved ``model.layers.*`` / ``visual.*``: the same files come out."""
    from safetensors.numpy import load_file, save_file

    from chatglm.convert.pipeline import convert
    from chatglm.gguf_file import read_header

    folder = tmp_path / "legacy"
    shutil.copytree(built[1], folder, ignore=shutil.ignore_patterns("model*.safetensors*"))
    state = {}
    for shard in built[1].glob("model-*.safetensors"):
        for name, value in load_file(shard).items():
            state[name.replace("model.language_model.", "model.").replace("model.visual.", "visual.")] = value
    save_file(state, folder / "model.safetensors")
    result = convert(folder, tmp_path / "glm4v.gguf", "f32", mmproj_type="f32")
    for a, b in ((result.path, files.path), (result.mmproj, files.mmproj)):
        ha, hb = read_header(a), read_header(b)
        assert {n: t.shape for n, t in ha.tensors.items()} == {n: t.shape for n, t in hb.tensors.items()}
        assert a.read_bytes()[ha.data_offset:] == b.read_bytes()[hb.data_offset:]


def test_a_thinking_template_keeps_the_think_handling(built, tmp_path):
    """GLM-4.1V-Thinking's prompt opens the reply inside <think>: the reply's thinking is kept apart."""
    import chatglm
    from chatglm.convert.pipeline import convert
    from chatglm.devtools.glm4v import GLM4V_TEMPLATE
    from chatglm.runtime.messages import Message

    folder = tmp_path / "thinking"
    shutil.copytree(built[1], folder)
    (folder / "chat_template.jinja").write_text(GLM4V_TEMPLATE.replace("<|assistant|>\n{% endif %}",
                                                                       "<|assistant|>\n<think>{% endif %}"))
    result = convert(folder, tmp_path / "t.gguf", "f16")
    _, media = image(112, 112)
    with chatglm.load(result.path, n_threads=1) as m:
        ids = m.prompt_ids([Message("user", "Why?", media=(media,))])
        assert ids[-1] == m.info.special["<think>"] and m.format.thinks
        reply = m.format.parse_reply("the sky scatters blue</think>Rayleigh scattering.")
        assert reply.thinking.strip() == "the sky scatters blue" and reply.content == "Rayleigh scattering."

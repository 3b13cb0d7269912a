"""Saved conversations keep their images and audio (issue #19): a medium read from a file by its path and sha256,
one given as bytes inline (base64), each back at its place on loading; a saved file that is missing or changed is
refused in one line; files without media load as before. No model: the file format alone (the REPL's /save and
/load over it are in test_repl.py, a real vision model's session in test_glm4v.py)."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest

from chatglm.devtools import media_files as mf
from chatglm.errors import InputError
from chatglm.runtime import chatfiles
from chatglm.runtime.chatfiles import conversation_bytes, read_conversation
from chatglm.runtime.media import load_media
from chatglm.runtime.messages import Message

PNG = mf.png(np.random.default_rng(3).integers(0, 256, (6, 10, 3), dtype=np.uint8))
WAV = mf.wav(np.zeros(1600), rate=16000)
JPEG = mf.jpeg(8, 4)


def essence(messages):
    """What a conversation is, media included (a medium's name is where it came from: not compared)."""
    return [(m.role, m.content, [(x.kind, x.format, x.data, x.offset, x.path) for x in m.media]) for m in messages]


@pytest.fixture
def files(tmp_path):
    (tmp_path / "photo.png").write_bytes(PNG)
    (tmp_path / "clip.wav").write_bytes(WAV)
    return tmp_path


def conversation(folder):
    photo = replace(load_media(folder / "photo.png", "image"), offset=8)
    clip = load_media(folder / "clip.wav", "audio")
    inline = load_media(JPEG, "image")  # bytes, as the API and the server give them
    return [Message("system", "Be brief."),
            Message("user", "Compare  with this one.", media=(photo, replace(inline, offset=len("Compare  with")))),
            Message("assistant", "The second is smaller."), Message("user", "Transcribe.", media=(clip,))]


def save(messages, path):
    path.write_bytes(conversation_bytes(messages, "test", path))
    return json.loads(path.read_text(encoding="utf-8"))


def test_media_are_saved_in_place_by_path_and_hash_or_inline_and_load_back(files):
    messages = conversation(files)
    data = save(messages, files / "conv.json")
    parts = data["messages"][1]["content"]
    assert [p["type"] for p in parts] == ["text", "image", "text", "image", "text"]
    assert parts[0]["text"] == "Compare " and parts[2]["text"] == " with" and parts[4]["text"] == " this one."
    assert parts[1] == {"type": "image", "image": str(files / "photo.png"), "sha256": hashlib.sha256(PNG).hexdigest()}
    assert parts[3]["image"] == "data:image/jpeg;base64," + base64.b64encode(JPEG).decode() and "sha256" not in parts[3]
    assert data["messages"][3]["content"][0]["audio"] == str(files / "clip.wav")
    assert data["messages"][0]["content"] == "Be brief."  # a message without media is as before
    assert essence(read_conversation(files / "conv.json")) == essence(messages)


def test_a_relative_path_is_taken_from_the_conversation_files_folder(files, monkeypatch, tmp_path_factory):
    (files / "conv.json").write_text(json.dumps({"kind": "chatglm-conversation", "version": 1, "messages": [
        {"role": "user", "content": [{"type": "image", "image": "photo.png"}, {"type": "text", "text": "hi"}]}]}))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    (m,) = read_conversation(files / "conv.json")
    assert m.content == "hi" and m.media[0].data == PNG and m.media[0].offset == 0


@pytest.mark.parametrize("harm,words", [
    (lambda f: (f / "photo.png").unlink(), "messages[1].content[1]: the saved image {f}/photo.png is missing"),
    (lambda f: (f / "photo.png").write_bytes(mf.png(np.zeros((6, 10, 3), dtype=np.uint8))),
     "messages[1].content[1]: the saved image {f}/photo.png has changed since the conversation was saved "
     "(its sha256 differs)"),
    (lambda f: (f / "clip.wav").write_bytes(b"RIFF...."),
     "messages[3].content[0]: the saved audio {f}/clip.wav has changed since the conversation was saved"),
])
def test_a_saved_medium_missing_or_changed_is_refused_in_one_line(files, harm, words):
    save(conversation(files), files / "conv.json")
    harm(files)
    with pytest.raises(InputError) as err:
        read_conversation(files / "conv.json")
    assert str(err.value).startswith(f"{files / 'conv.json'}: " + words.format(f=files)), str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("part,words", [
    ({"type": "image", "image": "photo.png", "sha256": "ABC"}, "messages[0].content[0].sha256: expected 64 lowercase"),
    ({"type": "image", "image": "data:image/png,xyz"}, "messages[0].content[0].image: a data: URL must be base64"),
    ({"type": "image", "image": "data:image/png;base64,@@"}, "messages[0].content[0].image: not valid base64"),
    ({"type": "image", "image": "data:image/png;base64," + base64.b64encode(WAV).decode()},
     "messages[0].content[0]: is audio (WAV), not an image"),
    ({"type": "video", "video": "x.mp4"}, "messages[0].content[0].type: unknown content part 'video'"),
    ({"type": "image"}, "messages[0].content[0]: missing field 'image'"),
    ({"type": "text", "text": 3}, "messages[0].content[0].text: expected a string, got a number"),
    ("just text", "messages[0].content[0]: expected an object, got a string"),
])
def test_bad_media_parts_are_one_line_naming_the_field(files, part, words):
    path = files / "conv.json"
    path.write_text(json.dumps([{"role": "user", "content": [part]}]))
    with pytest.raises(InputError) as err:
        read_conversation(path)
    assert str(err.value).startswith(f"{path}: {words}"), str(err.value)


def test_an_old_file_without_media_still_loads(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"kind": "chatglm-conversation", "version": 1, "model": "x", "messages": [
        {"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                                             "thinking": "t"}]}))
    assert read_conversation(path) == [Message("system", "s"), Message("user", "q"),
                                       Message("assistant", "a", thinking="t")]


def test_a_conversation_too_big_to_read_back_is_not_saved(files, monkeypatch):
    monkeypatch.setattr(chatfiles, "MAX_JSON_BYTES", 600)
    messages = [Message("user", "x", media=(load_media(PNG, "image"),) * 4)]
    with pytest.raises(InputError, match="more than the 600 a conversation file may hold") as err:
        conversation_bytes(messages, "test", files / "big.json")
    assert "\n" not in str(err.value) and not (files / "big.json").exists()

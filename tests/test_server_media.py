"""Images and audio through the OpenAI API: content parts parsed into Message.media, and every bad part a 400.

The multimodal engine is another branch's; here a scripted model that says it sees (``media_kinds``) records the
messages the server hands it, the scripted text-only model and the real tiny llama.cpp GLM refuse media with a 400,
and the server keeps serving after each bad request. The official ``openai`` client talks to a real server on
127.0.0.1.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import openai
import pytest
from fixtures_server import (LLAMA_KEY, ScriptedModel, answer, http, llama_server, openai_client,  # noqa: F401
                             raw_request, serve)

from chatglm.devtools import media_files as mf
from chatglm.limits import MAX_MEDIA_PER_REQUEST
from chatglm.server.body import MAX_BODY_BYTES, parse_request

PIXELS = np.random.default_rng(7).integers(0, 256, (14, 28, 3), dtype=np.uint8)
PNG = mf.png(PIXELS)
WAV = mf.wav(np.zeros(8000), rate=16000)


class SeeingModel(ScriptedModel):
    media_kinds = frozenset({"image", "audio"})


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_part(data: bytes = PNG, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


def audio_part(data: bytes = WAV, fmt: str = "wav") -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(data).decode(), "format": fmt}}


def user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


TEXT = {"type": "text", "text": "What is in the picture?"}


@pytest.fixture(scope="module")
def seeing():
    model = SeeingModel(default=answer("A picture."))
    with serve([model]) as live:
        yield model, live, openai_client(live)


def test_an_image_and_audio_reach_the_model_as_media(seeing):
    model, _, client = seeing
    reply = client.chat.completions.create(model="tiny", messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [TEXT, image_part(), {"type": "text", "text": " And this?"}, audio_part()]}])
    assert reply.choices[0].message.content == "A picture."
    system, message = model.received[-1]
    assert system.media == () and message.content == "What is in the picture? And this?"
    image, audio = message.media
    assert (image.kind, image.format, image.width, image.height, image.data) == ("image", "png", 28, 14, PNG)
    assert image.name == "messages[1].content[1]" and (image.offset, audio.offset) == (23, 33)
    assert (audio.kind, audio.format, audio.sample_rate, audio.frames, audio.data) == ("audio", "wav", 16000, 8000,
                                                                                       WAV)


def test_several_images_keep_their_order_and_stream(seeing):
    model, _, client = seeing
    jpeg, gif = mf.jpeg(16, 8), mf.gif(3, 2)
    stream = client.chat.completions.create(model="tiny", stream=True, messages=user(
        image_part(jpeg, "image/jpeg"), image_part(gif, "image/gif"), TEXT))
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "A picture."
    assert [(m.format, m.width, m.height, m.offset) for m in model.received[-1][0].media] == [
        ("jpeg", 16, 8, 0), ("gif", 3, 2, 0)]


BAD_PARTS = {  # name: (messages, the words of the 400)
    "remote https URL": (user({"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}),
                         "remote image URLs are not fetched by this server"),
    "remote http URL": (user({"type": "image_url", "image_url": {"url": "HTTP://10.0.0.1/x.jpg"}}),
                        "send the image inline as a data: URL"),
    "file URL": (user({"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}), "must be a data: URL"),
    "not base64": (user({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@@"}}),
                   "not valid base64"),
    "non-ASCII base64": (user({"type": "image_url", "image_url": {"url": "data:image/png;base64,ïïïï"}}),
                         "not valid base64"),
    "not an image type": (user(image_part(PNG, "text/plain")), "holds 'text/plain', not an image/* type"),
    "truncated PNG": (user(image_part(PNG[:60])), "messages[0].content[0]: is truncated"),
    "truncated JPEG": (user(image_part(mf.jpeg(16, 16)[:-2], "image/jpeg")), "no end-of-image marker"),
    "30000x30000 header": (user(image_part(mf.PNG_SIGNATURE + mf.png_ihdr(30000, 30000))),
                           "is 30000x30000 pixels"),
    "empty image": (user(image_part(b"")), "is empty (0 bytes)"),
    "text as an image": (user(image_part(b"GIF? no, just text")), "is not an image in a format libmtmd decodes"),
    "audio of the wrong format": (user(audio_part(b"OggS" + bytes(60), "wav")), "is not audio in a format"),
    "audio format mismatch": (user(audio_part(WAV, "mp3")), "input_audio.format says 'mp3' but the data is WAV"),
    "audio format unknown": (user(audio_part(WAV, "ogg")), "must be one of wav, mp3, flac, not 'ogg'"),
    "image in a system message": ([{"role": "system", "content": [image_part()]}],
                                  "only user messages may carry images or audio"),
    "image_url without url": (user({"type": "image_url", "image_url": {}}), "must be a string (a data: URL)"),
    "too many images": (user(*[image_part()] * (MAX_MEDIA_PER_REQUEST + 1)),
                        f"more than {MAX_MEDIA_PER_REQUEST} images and audio clips"),
}


@pytest.mark.parametrize("name", list(BAD_PARTS))
def test_bad_media_is_a_400_and_the_server_keeps_serving(seeing, name):
    _, live, client = seeing
    messages, words = BAD_PARTS[name]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=messages)
    error = info.value.body
    assert words in error["message"] and "\n" not in error["message"], error
    assert error["param"].startswith("messages[0]" if name != "too many images" else "messages"), error
    assert client.chat.completions.create(model="tiny", messages=user(TEXT)).choices[0].message.content
    assert http().get(live.url + "/health").json()["status"] == "ok"


def test_remote_urls_have_their_own_error_code(seeing):
    _, _, client = seeing
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=BAD_PARTS["remote https URL"][0])
    assert info.value.code == "remote_media_refused"


def test_a_text_only_model_given_an_image_says_so():
    model = ScriptedModel(default=answer("Text only."))
    with serve([model]) as live:
        client = openai_client(live)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny", stream=True, messages=user(TEXT, image_part()))
        assert info.value.code == "unsupported_media"
        assert "messages[0].content[1]: the model scripted.gguf takes text only; it cannot read image" in \
            info.value.body["message"]
        assert not model.received  # refused before the model saw a prompt
        reply = client.chat.completions.create(model="tiny", messages=user(TEXT))
        assert reply.choices[0].message.content == "Text only."


def test_the_real_text_only_glm_refuses_an_image_and_keeps_serving(llama_server):  # noqa: F811
    client = openai_client(llama_server, api_key=LLAMA_KEY)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=user(TEXT, audio_part()), max_tokens=2)
    assert "takes text only; it cannot read audio" in info.value.body["message"]
    reply = client.chat.completions.create(model="tiny", messages=user(TEXT), max_tokens=2)
    assert reply.usage.completion_tokens >= 1


def padded(body: bytes, size: int) -> bytes:
    """``body`` (a JSON object) grown to exactly ``size`` bytes with whitespace before its closing brace."""
    assert body.endswith(b"}") and len(body) <= size
    return body[:-1] + b" " * (size - len(body)) + b"}"


def test_the_default_body_limit_takes_32_mib_and_not_a_byte_more(seeing):
    """The default limit is sized for a few images (base64 in the body); one byte past it is a 413, the body read
    only up to the limit (the rest drained, not kept)."""
    model, live, _ = seeing
    assert MAX_BODY_BYTES == 32 << 20
    body = json.dumps({"messages": user(image_part(), TEXT), "max_tokens": 2}).encode()
    headers = {"Content-Type": "application/json"}
    under = raw_request(live.port, "POST", "/v1/chat/completions", padded(body, MAX_BODY_BYTES), headers, timeout=60)
    assert under.status == 200, under.body[:300]
    assert model.received[-1][0].media[0].data == PNG
    over = raw_request(live.port, "POST", "/v1/chat/completions", padded(body, MAX_BODY_BYTES + 1), headers,
                       timeout=60)
    assert over.status == 413 and over.json() == {"error": {
        "message": f"the request body is larger than the server's limit of {MAX_BODY_BYTES} bytes",
        "type": "invalid_request_error", "param": None, "code": "request_too_large"}}
    assert b"\n" not in over.body.strip()


def test_ollama_images_stand_before_the_text():
    """Ollama's ``images`` go before the message's text (as Ollama places them), each named by its part."""
    jpeg = mf.jpeg(16, 8)
    body = {"model": "m", "messages": [{"role": "user", "content": "What is this?",
                                        "images": [base64.b64encode(x).decode() for x in (PNG, jpeg)]}]}
    (message,) = parse_request(json.dumps(body).encode(), "application/json", "/api/chat").messages
    assert message.content == "What is this?"
    assert [(m.format, m.offset, m.name) for m in message.media] == [
        ("png", 0, "messages[0].content[0]"), ("jpeg", 0, "messages[0].content[1]")]
    generate = {"model": "m", "prompt": "Describe.", "images": [base64.b64encode(PNG).decode()]}
    (message,) = parse_request(json.dumps(generate).encode(), "application/json", "/api/generate").messages
    assert message.content == "Describe." and [m.offset for m in message.media] == [0]

"""OpenAI message content parts: text, images as ``data:`` URLs and ``input_audio``, checked into text and Media.

- ``{"type": "text", "text": ...}`` parts are joined into the message's text.
- ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (or the URL as a bare string): the
  base64 is bounded before it is decoded, decoded strictly, and the bytes go through
  :func:`chatglm.runtime.media.load_media` (format, size and structure checked before any native decoder).
- ``{"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav" | "mp3" | "flac"}}`` likewise; the
  declared format must be the one the bytes are.
- Each medium keeps its place among the text parts (``Media.offset``: the characters of text before it), so a chat
  format can render the parts in their order, as the checkpoint's own processor does.
- Remote ``http(s)`` image URLs are refused: this server never fetches anything (no server-side request forgery, no
  waiting on someone else's host); the client sends the picture inline.

Only user messages carry media, at most :data:`~chatglm.limits.MAX_MEDIA_PER_REQUEST` per request. Every refusal is a
400 naming the part (``messages[0].content[1]``).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import replace
from typing import Any

from chatglm.errors import InputError
from chatglm.limits import MAX_MEDIA_BYTES
from chatglm.runtime.media import AUDIO_FORMATS, Media, load_media
from chatglm.server.errors import invalid

MAX_BASE64 = (MAX_MEDIA_BYTES + 2) // 3 * 4  # the longest base64 text of an accepted file
PART_TYPES = ("text", "image_url", "input_audio")


def content_parts(content: Any, where: str, role: str) -> tuple[str, tuple[Media, ...]]:
    """The text and the media of a message's ``content`` (a string, null, or a list of parts)."""
    if content is None or isinstance(content, str):
        return content or "", ()
    if not isinstance(content, list):
        raise invalid(f"{where}.content must be a string or a list of content parts", where)
    texts, media = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind in ("image_url", "input_audio"):
            if role != "user":
                raise invalid(f"{at}: only user messages may carry images or audio, not {role} messages", at)
            item = _image(part.get("image_url"), at) if kind == "image_url" else _audio(part.get(kind), at)
            media.append(replace(item, offset=sum(map(len, texts))))
        else:
            shown = kind if isinstance(kind, str) else type(part).__name__
            raise invalid(f"{at}: unsupported content part {shown[:64]!r}; expected one of {', '.join(PART_TYPES)} "
                          "(a text part needs a string 'text')", at)
    return "".join(texts), tuple(media)


def media_parts(messages: list) -> int:
    """How many image and audio parts the raw messages hold."""
    return sum(isinstance(part, dict) and part.get("type") in PART_TYPES[1:]
               for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list) for part in m["content"])


def _image(value: Any, at: str) -> Media:
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise invalid(f"{at}.image_url.url must be a string (a data: URL)", at)
    scheme = url[:8].lower()
    if scheme.startswith(("http://", "https://")):
        raise invalid(f"{at}: remote image URLs are not fetched by this server; send the image inline as a data: URL "
                      "(data:image/png;base64,...)", at, code="remote_media_refused")
    if not scheme.startswith("data:"):
        raise invalid(f"{at}.image_url.url must be a data: URL (data:image/png;base64,...)", at)
    header, comma, payload = url[5:].partition(",")
    params = [p.strip().lower() for p in header.split(";")]
    if not comma or "base64" not in params[1:]:
        raise invalid(f"{at}: the data: URL must be base64 (data:image/...;base64,...)", at)
    if not params[0].startswith("image/"):
        raise invalid(f"{at}: the data: URL holds {params[0] or 'no type'!r}, not an image/* type", at)
    return _load(_decode(payload, at), "image", at)


def _audio(value: Any, at: str) -> Media:
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise invalid(f"{at}.input_audio needs 'data' (base64) and 'format' ({', '.join(AUDIO_FORMATS)})", at)
    declared = value.get("format")
    if declared not in AUDIO_FORMATS:
        raise invalid(f"{at}.input_audio.format must be one of {', '.join(AUDIO_FORMATS)}, not {str(declared)[:32]!r}",
                      at)
    media = _load(_decode(value["data"], at), "audio", at)
    if media.format != declared:
        raise invalid(f"{at}: input_audio.format says {declared!r} but the data is {media.format.upper()}", at)
    return media


def _decode(payload: str, at: str) -> bytes:
    if len(payload) > MAX_BASE64:
        raise invalid(f"{at}: the media is larger than the {MAX_MEDIA_BYTES} bytes accepted for one file", at)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{at}: the media data is not valid base64", at) from None


def _load(data: bytes, kind: str, at: str) -> Media:
    try:
        return load_media(data, kind, name=at)
    except InputError as exc:
        raise invalid(str(exc), at) from None


def check_media(model: Any, messages: list) -> None:
    """A 400 when a message carries a kind of media the model does not take (a text-only model given an image).

    A model says what it takes in ``media_kinds`` (``{"image"}``, ``{"audio"}``; none: text only)."""
    media_kinds = frozenset(getattr(model, "media_kinds", ()))
    model_name = model.info.path.name
    for m in messages:
        for item in m.media:
            if item.kind not in media_kinds:
                takes = f"takes only {', '.join(sorted(media_kinds))} and text" if media_kinds else "takes text only"
                raise invalid(f"{item.name}: the model {model_name} {takes}; it cannot read {item.kind} (serve a "
                              f"model converted with its projector, mmproj-*.gguf)", item.name,
                              code="unsupported_media")

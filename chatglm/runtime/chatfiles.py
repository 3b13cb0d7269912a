"""The user's chat files, conversations (``/save``, ``/load``) and tool lists (``run --tools``), checked by field.

Every problem is one :class:`InputError` naming the file and the field, as a path into the JSON value
(``messages[2].role: expected a string, got a list``), before any of it reaches a chat format.

A message with images or audio is saved with its content as parts in their order (``{"type": "text", "text": ...}``,
``{"type": "image", "image": ..., "sha256": ...}``, ``"audio"`` likewise): a medium read from a file as its absolute
path and the sha256 of the bytes the model saw, one given as bytes (the API, the server) inline as a base64
``data:`` URL, the whole file within the :data:`~chatglm.fsutil.MAX_JSON_BYTES` that reading takes. Loading reads
each file again and refuses one that is missing or whose sha256 differs; a relative path is taken from the
conversation file's folder. Files without media are as before.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

from chatglm.errors import InputError
from chatglm.fsutil import MAX_JSON_BYTES, read_bytes, read_json
from chatglm.limits import MAX_MEDIA_BYTES
from chatglm.runtime.media import KINDS, Media, load_media
from chatglm.runtime.messages import ROLE_ALIASES, ROLES, Message, in_order

FILE_KIND = "chatglm-conversation"
FILE_VERSION = 1

# How each JSON type is named in messages.
_JSON_TYPES = ((type(None), "null"), (bool, "true/false"), (int, "a number"), (float, "a number"),
               (str, "a string"), (list, "a list"), (dict, "an object"))
# Optional text fields of a message (null means absent).
_TEXT_FIELDS = ("metadata", "thinking", "reasoning_content")
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "bmp": "image/bmp", "gif": "image/gif", "wav": "audio/wav",
              "mp3": "audio/mpeg", "flac": "audio/flac"}  # a data: URL's type for each format load_media takes
MAX_BASE64 = (MAX_MEDIA_BYTES + 2) // 3 * 4  # the longest base64 text of an accepted medium
SHA256 = re.compile(r"[0-9a-f]{64}")


def read_json_file(path: os.PathLike | str) -> Any:
    """The JSON value of a user's file, through the bounded reader (depth and size limits); every problem is an
    InputError naming the file."""
    return read_json(path)


def json_type(value: Any) -> str:
    return next((name for kind, name in _JSON_TYPES if type(value) is kind), type(value).__name__)


class Shape:
    """Checks of one file's JSON value; ``fail`` raises the InputError for a field."""

    def __init__(self, path: os.PathLike | str):
        self.path = path

    def fail(self, where: str, problem: str) -> InputError:
        return InputError(f"{where}: {problem}" if where else problem, self.path)

    def expect(self, value: Any, kind: type, where: str) -> Any:
        if type(value) is not kind:
            name = dict((k, n) for k, n in _JSON_TYPES)[kind]
            raise self.fail(where, f"expected {name}, got {json_type(value)}")
        return value

    def text(self, obj: dict, key: str, where: str, *, required: bool = False) -> Optional[str]:
        if key not in obj or (obj[key] is None and not required):
            if required:
                raise self.fail(where, f"missing field {key!r}")
            return None
        return self.expect(obj[key], str, f"{where}.{key}")

    # -- tools ------------------------------------------------------------------------------------------------
    def tools(self, value: Any, where: str) -> list[dict]:
        for i, tool in enumerate(self.expect(value, list, where)):
            self.tool(tool, f"{where}[{i}]")
        return value

    def tool(self, tool: Any, where: str) -> None:
        """``{"type": "function", "function": {"name": ..., ...}}`` or the bare function object."""
        self.expect(tool, dict, where)
        kind = self.text(tool, "type", where)
        if kind is not None and kind != "function":
            raise self.fail(f"{where}.type", f"tool type {kind!r} is not supported: declare tools as functions")
        function, at = (tool["function"], f"{where}.function") if "function" in tool else (tool, where)
        self.expect(function, dict, at)
        if not self.text(function, "name", at, required=True):
            raise self.fail(f"{at}.name", "a tool needs a non-empty name")
        self.text(function, "description", at)
        if function.get("parameters") is not None:
            self.expect(function["parameters"], dict, f"{at}.parameters")

    # -- messages ---------------------------------------------------------------------------------------------
    def message(self, item: Any, where: str) -> Message:
        self.expect(item, dict, where)
        role = self.text(item, "role", where, required=True)
        if role not in ROLES and role not in ROLE_ALIASES:
            raise self.fail(f"{where}.role", f"unknown role {role!r}; expected one of "
                                             f"{', '.join((*ROLES, *ROLE_ALIASES))}")
        calls = item.get("tool_calls")
        if calls is not None:
            for i, call in enumerate(self.expect(calls, list, f"{where}.tool_calls")):
                self.tool_call(call, f"{where}.tool_calls[{i}]")
        media: tuple[Media, ...] = ()
        if type(item.get("content")) is list:
            text, media = self.parts(item["content"], f"{where}.content")
            item = {**item, "content": text}
        self.text(item, "content", where, required=not (role == "assistant" and calls))
        for key in _TEXT_FIELDS:
            self.text(item, key, where)
        if item.get("tools") is not None:
            self.tools(item["tools"], f"{where}.tools")
        return replace(Message.from_dict(item), media=media)

    def parts(self, parts: list, where: str) -> tuple[str, tuple[Media, ...]]:
        """A content list: the texts joined, each medium at its place among them."""
        texts, media = [], []
        for j, part in enumerate(parts):
            at = f"{where}[{j}]"
            self.expect(part, dict, at)
            kind = self.text(part, "type", at, required=True)
            if kind == "text":
                texts.append(self.text(part, "text", at, required=True))
            elif kind in KINDS:
                media.append(replace(self.medium(part, kind, at), offset=sum(map(len, texts))))
            else:
                raise self.fail(f"{at}.type", f"unknown content part {kind!r}; expected text, {' or '.join(KINDS)}")
        return "".join(texts), tuple(media)

    def medium(self, part: dict, kind: str, at: str) -> Media:
        """A saved image or audio part: a file (its sha256 checked when given) or a base64 ``data:`` URL."""
        source = self.text(part, kind, at, required=True)
        digest = self.text(part, "sha256", at)
        if digest is not None and not SHA256.fullmatch(digest):
            raise self.fail(f"{at}.sha256", "expected 64 lowercase hex digits")
        if source.startswith("data:"):
            data, shown = self.inline(source, kind, at), ""
        else:
            file = Path(self.path).parent / Path(source).expanduser()  # (an absolute path stays as it is)
            shown = str(file)
            if not os.path.lexists(file):
                raise self.fail(at, f"the saved {kind} {shown} is missing")
            try:
                data = read_bytes(file, max_bytes=MAX_MEDIA_BYTES, what=f"the {kind} file")
            except InputError as exc:
                raise self.fail(at, f"the saved {kind} {shown}: {exc.problem}") from None
        if digest is not None and hashlib.sha256(data).hexdigest() != digest:
            raise self.fail(at, f"the saved {kind} {shown or 'inline'} has changed since the conversation was saved "
                                "(its sha256 differs)")
        try:
            media = load_media(data, kind, name=shown or at)
        except InputError as exc:
            raise self.fail(at, f"the saved {kind} {shown}: {exc.problem}" if shown else exc.problem) from None
        return replace(media, path=os.path.abspath(shown)) if shown else media

    def inline(self, url: str, kind: str, at: str) -> bytes:
        """The bytes of a base64 ``data:`` URL, bounded before decoding."""
        head, comma, payload = url[5:].partition(",")
        if not comma or not head.endswith(";base64"):
            raise self.fail(f"{at}.{kind}", "a data: URL must be base64 (data:TYPE;base64,...)")
        if len(payload) > MAX_BASE64:
            raise self.fail(f"{at}.{kind}", f"the {kind} is larger than the {MAX_MEDIA_BYTES} bytes accepted")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise self.fail(f"{at}.{kind}", "not valid base64") from None

    def tool_call(self, call: Any, where: str) -> None:
        self.expect(call, dict, where)
        if not self.text(call, "name", where, required=True):
            raise self.fail(f"{where}.name", "a tool call needs a non-empty name")
        arguments = call.get("arguments")
        if arguments is not None and type(arguments) not in (dict, str):
            raise self.fail(f"{where}.arguments", f"expected an object or a string, got {json_type(arguments)}")

    def conversation(self, data: Any) -> list[Message]:
        """A ``{"kind": "chatglm-conversation", "version": 1, "messages": [...]}`` object, or a bare list (its
        items are named ``messages[i]`` all the same)."""
        if type(data) is dict:
            if data.get("kind") != FILE_KIND:
                raise self.fail("", f"not a conversation file: expected an object with \"kind\": \"{FILE_KIND}\" "
                                    "and \"messages\", or a list of messages")
            version = self.expect(data.get("version"), int, "version")
            if version != FILE_VERSION:
                raise self.fail("", f"conversation file version {version} is not supported (this version reads "
                                    f"{FILE_VERSION})")
            if "messages" not in data:
                raise self.fail("", "missing field 'messages'")
            data = data["messages"]
        elif type(data) is not list:
            raise self.fail("", f"not a conversation file: expected a list of messages or a conversation object, "
                                f"got {json_type(data)}")
        self.expect(data, list, "messages")
        return [self.message(item, f"messages[{i}]") for i, item in enumerate(data)]


def media_part(x: Media) -> dict:
    """How a saved conversation keeps one medium: its file and sha256, or (given as bytes) its bytes inline."""
    if x.path:
        return {"type": x.kind, x.kind: x.path, "sha256": hashlib.sha256(x.data).hexdigest()}
    return {"type": x.kind, x.kind: f"data:{MIME_TYPES[x.format]};base64,{base64.b64encode(x.data).decode()}"}


def message_record(m: Message) -> dict:
    """A message as a conversation file holds it (:meth:`Message.to_dict`, the content as parts when it has media)."""
    out = m.to_dict()
    if m.media:
        out["content"] = [{"type": "text", "text": x} if isinstance(x, str) else media_part(x) for x in in_order(m)]
    return out


def conversation_bytes(messages: Sequence[Message], model: str, path: os.PathLike | str) -> bytes:
    """The UTF-8 JSON of a conversation file; refused when reading it back would be (more than the JSON bound)."""
    data = {"kind": FILE_KIND, "version": FILE_VERSION, "model": model,
            "messages": [message_record(m) for m in messages]}
    out = (json.dumps(data, ensure_ascii=False, indent=2) + "\n").encode("utf-8")
    if len(out) > MAX_JSON_BYTES:
        raise InputError(f"the conversation would take {len(out)} bytes, more than the {MAX_JSON_BYTES} a conversation "
                         "file may hold (its media given as bytes are kept inline: attach big ones from files)", path)
    return out


def read_conversation(path: os.PathLike | str) -> list[Message]:
    """Messages from a conversation file (what :meth:`ChatSession.save` writes, or a JSON list of messages)."""
    return Shape(path).conversation(read_json_file(path))


def read_tools(path: os.PathLike | str) -> list[dict]:
    """A tools file: a JSON list of tool descriptions, or an object with a ``tools`` list."""
    data = read_json_file(path)
    shape = Shape(path)
    if type(data) is dict and "tools" in data:
        return shape.tools(data["tools"], "tools")
    if type(data) is not list:
        raise shape.fail("", f"expected a list of tools (or an object with a \"tools\" list), got {json_type(data)}")
    return shape.tools(data, "tools")  # a bare list's items are named tools[i] all the same

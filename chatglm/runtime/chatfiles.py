"""The user's chat files, conversations (``/save``, ``/load``) and tool lists (``run --tools``), checked by field.

Every problem is one :class:`InputError` naming the file and the field, as a path into the JSON value
(``messages[2].role: expected a string, got a list``), before any of it reaches a chat format.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from chatglm.errors import InputError
from chatglm.fsutil import read_json
from chatglm.runtime.messages import ROLE_ALIASES, ROLES, Message

FILE_KIND = "chatglm-conversation"
FILE_VERSION = 1

# How each JSON type is named in messages.
_JSON_TYPES = ((type(None), "null"), (bool, "true/false"), (int, "a number"), (float, "a number"),
               (str, "a string"), (list, "a list"), (dict, "an object"))
# Optional text fields of a message (null means absent).
_TEXT_FIELDS = ("metadata", "thinking", "reasoning_content")


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
        self.text(item, "content", where, required=not (role == "assistant" and calls))
        for key in _TEXT_FIELDS:
            self.text(item, key, where)
        if item.get("tools") is not None:
            self.tools(item["tools"], f"{where}.tools")
        return Message.from_dict(item)

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

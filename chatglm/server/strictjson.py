"""JSON from untrusted bytes with every cost bounded: strict UTF-8, nesting depth scanned before parsing (so the parser
never recurses deeply), number literals of bounded length (Python's ``int`` refuses past 4,300 digits with a
ValueError), no ``NaN``/``Infinity``, and no lone surrogate (``"\\ud800"``) in any string or key.

Every refusal is a 400 :class:`APIError` in OpenAI's shape; nothing else escapes :func:`loads`.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

import numpy as np

from chatglm.server.errors import invalid

MAX_DEPTH = 64  # a tool's JSON schema is the deepest thing a client sends; 64 levels is far beyond any real one
MAX_NUMBER_CHARS = 64  # enough for any float or int64 written out; refused before Python parses it

_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
_SURROGATE = re.compile("[\ud800-\udfff]")


def decode_text(data: bytes, what: str = "the request body") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"{what} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                      "is invalid") from None


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data``, brackets inside strings not counted (linear time)."""
    skeleton = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if not skeleton:
        return 0
    codes = np.frombuffer(skeleton, dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def _number(kind: Callable[[str], Any], what: str) -> Callable[[str], Any]:
    def parse(literal: str) -> Any:
        if len(literal) > MAX_NUMBER_CHARS:
            raise invalid(f"{what}: a number is {len(literal)} characters long; at most {MAX_NUMBER_CHARS} "
                          "are accepted")
        value = kind(literal)
        if isinstance(value, float) and not math.isfinite(value):
            raise invalid(f"{what}: the number {literal} is out of range")
        return value

    return parse


def _constant(what: str) -> Callable[[str], Any]:
    def refuse(name: str) -> Any:
        raise invalid(f"{what} holds {name}, which is not a JSON number")

    return refuse


def loads(data: bytes | str, what: str = "the request body") -> Any:
    """The JSON value of ``data`` with every bound checked; a 400 APIError naming ``what`` otherwise."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    text = data if isinstance(data, str) else decode_text(data, what)
    if not text.strip():
        raise invalid(f"{what} is empty; send a JSON object")
    depth = nesting_depth(raw)
    if depth > MAX_DEPTH:
        raise invalid(f"{what} nests {depth} levels deep; at most {MAX_DEPTH} are accepted")
    try:
        value = json.loads(text, parse_int=_number(int, what), parse_float=_number(float, what),
                           parse_constant=_constant(what))
    except json.JSONDecodeError as exc:
        raise invalid(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # not reachable within MAX_DEPTH; kept so a lower recursion limit cannot leak one
        raise invalid(f"{what} nests too deeply") from None
    check_strings(value)
    return value


def check_strings(value: Any, where: str = "") -> None:
    """400 naming the place of the first string (or key) holding a lone surrogate such as ``"\\ud800"``."""
    stack = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict):
            for key, sub in item.items():
                _check_text(key, path)
                stack.append((sub, f"{path}.{key}" if path else key))
        elif isinstance(item, list):
            stack.extend((sub, f"{path}[{i}]") for i, sub in enumerate(item))


def _check_text(text: str, where: str) -> None:
    found = _SURROGATE.search(text)
    if found:
        raise invalid(f"{where or 'the request body'}: the text holds a lone surrogate (\\u{ord(found.group()):04x}), "
                      "which is not valid Unicode", where or None)

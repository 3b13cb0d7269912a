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

_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def decode_text(data: bytes, what: str = "the request body") -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise invalid(f"{what} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                      "is invalid") from None


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in ``data``, brackets inside strings not counted.

    Vectorised and linear: a quote is a string's edge unless an odd run of backslashes precedes it, and a bracket is
    structural when an even number of edges precede it. UTF-8 never puts these ASCII bytes inside a multi-byte
    character, so bytes are enough. Past the first syntax error the count may be off, but the parser stops there."""
    codes = np.frombuffer(data, dtype=np.uint8)
    if codes.size == 0:
        return 0
    index = np.arange(codes.size, dtype=np.int32)
    last_other = np.maximum.accumulate(np.where(codes == ord("\\"), np.int32(-1), index))
    quotes = np.flatnonzero(codes == ord('"'))
    before = np.maximum(quotes - 1, 0)
    backslashes = np.where(quotes > 0, before - last_other[before], 0)
    edges = np.zeros(codes.size, dtype=np.int8)
    edges[quotes[backslashes % 2 == 0]] = 1
    outside = (np.cumsum(edges, dtype=np.int32) & 1) == 0
    opens = ((codes == ord("[")) | (codes == ord("{"))) & outside
    closes = ((codes == ord("]")) | (codes == ord("}"))) & outside
    return max(0, int(np.cumsum(opens.astype(np.int32) - closes, dtype=np.int32).max()))


def bracket_count(data: bytes) -> int:
    """An upper bound of :func:`nesting_depth`, found at C speed."""
    return data.count(b"[") + data.count(b"{")


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
    depth = nesting_depth(raw) if bracket_count(raw) > MAX_DEPTH else 0
    if depth > MAX_DEPTH:
        raise invalid(f"{what} nests {depth} levels deep; at most {MAX_DEPTH} are accepted")
    try:
        value = json.loads(text, parse_int=_number(int, what), parse_float=_number(float, what),
                           parse_constant=_constant(what))
    except json.JSONDecodeError as exc:
        raise invalid(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:  # not reachable within MAX_DEPTH; kept so a lower recursion limit cannot leak one
        raise invalid(f"{what} nests too deeply") from None
    if isinstance(data, str) or _SURROGATE_ESCAPE.search(raw):  # valid UTF-8 holds none: only escapes make them
        check_strings(value)
    return value


def check_strings(value: Any, where: str = "") -> None:
    """400 naming the place of the first string (or key) holding a lone surrogate such as ``"\\ud800"``."""
    stack: list[tuple[Any, tuple]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_text(item, where, path)
        elif isinstance(item, dict):
            for key, sub in item.items():
                _check_text(key, where, path)
                stack.append((sub, (path, key)))
        elif isinstance(item, list):
            stack.extend((sub, (path, i)) for i, sub in enumerate(item))


def _place(where: str, path: tuple) -> str:
    """``messages[0].content`` from the linked path ``((((), "messages"), 0), "content")``."""
    parts = []
    while path:
        path, key = path
        parts.append(f"[{key}]" if isinstance(key, int) else f".{key}")
    return (where + "".join(reversed(parts))).lstrip(".")


def _check_text(text: str, where: str, path: tuple) -> None:
    found = _SURROGATE.search(text)
    if found:
        place = _place(where, path)
        raise invalid(f"{place or 'the request body'}: the text holds a lone surrogate "
                      f"(\\u{ord(found.group()):04x}), which is not valid Unicode", place or None)

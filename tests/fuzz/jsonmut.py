"""A structure-aware mutation for JSON inputs: one value of the document replaced by a hostile one.

Byte-level mutation rarely keeps a JSON document valid, so it seldom reaches the code that reads the values; this
keeps the document valid and changes one value to what a hostile file would hold: a wrong type, null, a number as a
string, a number too large for its GGUF type, NaN, a lone surrogate, an object where a list belongs, nesting deeper
than any recursion limit. Used by run_atheris.py as a custom mutator of the JSON targets.
"""

from __future__ import annotations

import json
import random
from typing import Any, Iterator, Optional

DEEP = "\x00DEEP\x00"  # placeholder, expanded after json.dumps: nesting too deep to build as Python objects
CHOICES = (None, True, False, 0, -1, 1, 2 ** 31, 2 ** 32, 2 ** 40, 2 ** 64, -(2 ** 63) - 1, 10 ** 400, 1e40, -1e40,
           1e-320, float("nan"), float("inf"), "", "1", "12", "1e5", "null", "\ud800", "[gMASK]", "<|user|>",
           [], [1], [1, 2, 3], {}, {"a": 1}, {"type": "BPE"}, DEEP)


def paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from paths(value, prefix + (key,))


def replaced(doc: Any, path: tuple, value: Any) -> Any:
    """A copy of ``doc`` with the value at ``path`` (keys and list indices) replaced."""
    if not path:
        return value
    head, rest = path[0], path[1:]
    if isinstance(doc, dict):
        return {**doc, head: replaced(doc[head], rest, value)}
    return [replaced(v, rest, value) if i == head else v for i, v in enumerate(doc)]


def dumps(doc: Any, depth: int) -> bytes:
    """JSON text of ``doc`` with every :data:`DEEP` placeholder expanded to ``depth`` nested lists."""
    text = json.dumps(doc, allow_nan=True)
    return text.replace(json.dumps(DEEP), "[" * depth + "]" * depth).encode("utf-8")


def mutate(text: bytes, rng: random.Random, max_size: int = 1 << 20) -> Optional[bytes]:
    """``text`` with one value replaced, at most ``max_size`` bytes; None when it is not a JSON document."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return None
    found = list(paths(doc))
    value = rng.choice(CHOICES)
    if rng.random() < 0.2:  # sometimes a value from elsewhere in the same document (right type, wrong place)
        value = _at(doc, rng.choice(found))
    out = dumps(replaced(doc, rng.choice(found), value), rng.choice((64, 5000, 200_000)))
    return out if len(out) <= max_size else None


def _at(doc: Any, path: tuple) -> Any:
    for key in path:
        doc = doc[key]
    return doc

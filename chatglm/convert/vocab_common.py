"""Checks every GGUF vocabulary we write passes, whatever tokenizer it came from.

llama.cpp's vocab loader maps each token text to its id and then asserts that the map is as long as the token list
(``GGML_ASSERT(id_to_token.size() == token_to_id.size())`` in llama-vocab.cpp): one repeated text aborts the process.
It also renames an empty text to ``[EMPTY_{id}]``, which can collide in turn. So no list leaves the converter with an
empty or repeated text, and the rows we invent ourselves (``[PAD{id}]`` fillers, ``<image_N>`` placeholders) get names
no real token has.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from chatglm.errors import InputError

# Our bound on one token's text, in UTF-8 bytes. The longest piece of a published GLM vocabulary is far shorter
# (GLM-4's tiktoken ranks: 512 bytes; the SentencePiece models: under 100 characters); a
# longer one only makes merging and the loaders slow.
MAX_TOKEN_BYTES = 1024


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base`` with the first free ``.N`` suffix when a real token already has that text."""
    name, n = base, 0
    while name in taken:
        n += 1
        name = f"{base}.{n}"
    return name


def pad_tokens(tokens: list[str], n_vocab: int, pattern: str = "[PAD{id}]") -> list[int]:
    """Append filler names up to ``n_vocab`` ids, none equal to an existing text; returns the filler ids.

    The fillers are rows of the embedding that no tokenizer produces, so their names are ours to choose: renaming
    one that a real piece already spells changes no token id and no tokenization.
    """
    taken = set(tokens)
    start = len(tokens)
    for i in range(start, n_vocab):
        name = unique_name(pattern.format(id=i), taken)
        taken.add(name)
        tokens.append(name)
    return list(range(start, n_vocab))


def first_duplicate(texts: Iterable[str]) -> tuple[str, int, int] | None:
    """(text, first id, second id) of the first repeated text, or None."""
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        j = seen.setdefault(text, i)
        if j != i:
            return text, j, i
    return None


def check_token_texts(tokens: Sequence[str], path: Path) -> None:
    """Refuse a list llama.cpp's loader would abort on (a repeated text) or rewrite (an empty one)."""
    for i, text in enumerate(tokens):
        if not text:
            raise InputError(f"token {i} has an empty text", path)
    dup = first_duplicate(tokens)
    if dup is not None:
        text, a, b = dup
        raise InputError(f"token text {short(text)} appears twice (ids {a} and {b}); a GGUF vocabulary needs "
                         "distinct texts", path)


def byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"


def missing_byte_pieces(tokens: Iterable[str]) -> list[int]:
    """Bytes llama.cpp's SPM tokenizer cannot spell: it looks up ``<0xNN>``, then the one-byte text, and throws
    std::out_of_range (killing the process) when neither is a token."""
    have = set(tokens)
    return [b for b in range(256) if byte_piece(b) not in have and not (0 < b < 0x80 and chr(b) in have)]


def check_token_length(text: str | bytes, what: str, path: Path) -> None:
    size = len(text) if isinstance(text, bytes) else len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TOKEN_BYTES:
        raise InputError(f"{what} is {size} bytes long, more than the {MAX_TOKEN_BYTES} this converter accepts "
                         "for one token", path)


def short(text: str | bytes, limit: int = 40) -> str:
    """A token for an error message: repr, cut to ``limit`` characters."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit - 3] + "..."


# ------------------------------------------------------------------------------------------- JSON field types
REQUIRED = object()
_JSON_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "a list",
               dict: "an object", type(None): "null"}


def json_kind(value: object) -> str:
    """What a parsed JSON value is, in the words of an error message."""
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _is_kind(value: object, kinds: tuple[type, ...]) -> bool:
    if type(value) is bool:  # JSON true/false are not numbers here, although Python's bool is an int
        return bool in kinds
    if type(value) is int and float in kinds:
        return True
    return type(value) in kinds


def json_field(obj: dict, key: str, kinds: type | tuple[type, ...], path: Path, where: str = "",
          default: object = REQUIRED) -> object:
    """``obj[key]`` when it has one of ``kinds``; ``default`` when absent; else one InputError naming the field
    (``where`` is the dotted path of ``obj`` in the file, e.g. ``"model."``)."""
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if key not in obj:
        if default is REQUIRED:
            raise InputError(f"field '{where}{key}' is missing", path)
        return default
    value = obj[key]
    if not _is_kind(value, kinds):
        wanted = " or ".join(_JSON_NAMES[k] for k in kinds)
        raise InputError(f"field '{where}{key}' must be {wanted}, not {json_kind(value)}", path)
    return value


def json_object(value: object, what: str, path: Path) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"{what} must be a JSON object, not {json_kind(value)}", path)
    return value

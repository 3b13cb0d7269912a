"""What llama.cpp's vocabulary loader accepts, which the converter makes sure of when it writes a token list and the
runtime checks again in a GGUF it did not write.

llama.cpp's vocab loader maps each token text to its id and asserts that the map is as long as the token list
(``GGML_ASSERT(id_to_token.size() == token_to_id.size())`` in llama-vocab.cpp): one repeated text aborts the process.
An SPM (``llama``) vocabulary needs the 256 byte pieces, or tokenizing text outside it throws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from chatglm.errors import InputError


def first_duplicate(texts: Iterable[str]) -> tuple[str, int, int] | None:
    """(text, first id, second id) of the first repeated text, or None."""
    seen: dict[str, int] = {}
    for i, text in enumerate(texts):
        j = seen.setdefault(text, i)
        if j != i:
            return text, j, i
    return None


def byte_piece(b: int) -> str:
    return f"<0x{b:02X}>"


def missing_byte_pieces(tokens: Iterable[str]) -> list[int]:
    """Bytes llama.cpp's SPM tokenizer cannot spell: it looks up ``<0xNN>``, then the one-byte text, and throws
    std::out_of_range (killing the process) when neither is a token."""
    have = set(tokens)
    return [b for b in range(256) if byte_piece(b) not in have and not (0 < b < 0x80 and chr(b) in have)]


def check_loadable_vocab(tokens: Sequence[str], model: object, path: Path) -> None:
    """A GGUF's token list as llama.cpp's loader and tokenizer will see it (for files this converter did not write):
    empty texts become ``[EMPTY_{id}]``, a repeated text aborts the load, a ``llama`` (SPM) vocabulary without the
    byte pieces aborts the first tokenization of text outside the vocabulary."""
    texts = [text or f"[EMPTY_{i}]" for i, text in enumerate(tokens)]
    dup = first_duplicate(texts)
    if dup is not None:
        raise InputError(f"GGUF tokenizer.ggml.tokens has the text {short(dup[0])} twice (ids {dup[1]} and "
                         f"{dup[2]}); llama.cpp cannot load a vocabulary with repeated texts", path)
    missing = missing_byte_pieces(texts) if model == "llama" else []
    if missing:
        raise InputError(f"GGUF SentencePiece vocabulary lacks {len(missing)} of the 256 byte tokens <0x00>..<0xFF> "
                         f"(first {byte_piece(missing[0])}); llama.cpp's tokenizer needs them", path)


def short(text: str | bytes, limit: int = 40) -> str:
    """A token for an error message: repr, cut to ``limit`` characters."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit - 3] + "..."

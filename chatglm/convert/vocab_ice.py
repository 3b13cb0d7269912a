"""ChatGLM-6B's ``ice_text.model``: a SentencePiece model whose ids are shifted by a block of image tokens.

What the published ``tokenization_chatglm.py`` of THUDM/chatglm-6b does (every release):

- ``encode(text)``: newlines become ``<n>``, tabs ``<|tab|>``, runs of 2..80 spaces ``<|blank_N|>`` (longest run
  first), then ``sp.encode``; every id is shifted by ``num_image_tokens`` (ids below it are ``<image_N>``).
- Special tokens ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>`` are SentencePiece pieces, looked
  up by text like any other piece; ``<sop>`` is bos (it opens the reply), ``<eop>`` eos, ``</s>`` the end token.
- Releases differ: the first loaded a text-only ``ice_text.model`` and appended the special pieces (control), the
  whitespace pieces (user-defined) and 256 byte pieces (byte fallback) at load time, with 20000 image tokens (vocab
  150528); later ones ship ``ice_text.model`` with those pieces baked in, and the last sets ``num_image_tokens`` to 0
  in tokenizer_config.json (vocab 130528, [gMASK] = 130001, <sop> = 130004).

This module reads the model's protobuf directly (no protobuf package needed): it lists pieces and completes a
first-release model the way that release's tokenizer did, so the GGUF stores the exact model the reference ran.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from chatglm.convert.vocab_common import first_duplicate, short
from chatglm.errors import InputError
from chatglm.fsutil import read_bytes
from chatglm.schema.ice import MAX_BLANK, NEWLINE_PIECE, SPECIAL_PIECES, TAB_PIECE, blank_piece

DEFAULT_IMAGE_TOKENS = 20000  # the published tokenizer's default when tokenizer_config.json does not say

# sentencepiece_model.proto: ModelProto.pieces = 1, trainer_spec = 2; SentencePiece.piece = 1, score = 2, type = 3;
# TrainerSpec.byte_fallback = 35. Piece types: NORMAL 1, UNKNOWN 2, CONTROL 3, USER_DEFINED 4, UNUSED 5, BYTE 6.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Piece:
    text: str
    score: float
    type: int


# ------------------------------------------------------------------------------------------- protobuf wire format
def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return value, pos
        shift += 7


def _put_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """(field number, wire type, value) of one message: varints as int, the rest as raw bytes."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            if pos + size > len(buf):
                raise ValueError("truncated fixed field")
            yield number, wire, buf[pos:pos + size]
            pos += size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated length-delimited field")
            yield number, wire, buf[pos:pos + size]
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")


def encode_field(number: int, wire: int, value: bytes | int) -> bytes:
    key = _put_varint(number << 3 | wire)
    if wire == 0:
        return key + _put_varint(int(value))  # type: ignore[arg-type]
    if wire == 2:
        return key + _put_varint(len(value)) + bytes(value)  # type: ignore[arg-type]
    return key + bytes(value)  # type: ignore[arg-type]


def parse_piece(raw: bytes) -> Piece:
    text, score, kind = "", 0.0, NORMAL
    for number, wire, value in fields(raw):
        if number == 1 and wire == 2:
            text = bytes(value).decode("utf-8")  # type: ignore[arg-type]
        elif number == 2 and wire == 5:
            score = struct.unpack("<f", value)[0]  # type: ignore[arg-type]
        elif number == 3 and wire == 0:
            kind = int(value)  # type: ignore[arg-type]
    return Piece(text, score, kind)


def encode_piece(p: Piece) -> bytes:
    return (encode_field(1, 2, p.text.encode("utf-8")) + encode_field(2, 5, struct.pack("<f", p.score))
            + encode_field(3, 0, p.type))


def pieces_of(proto: bytes) -> list[Piece]:
    return [parse_piece(bytes(v)) for n, w, v in fields(proto) if n == 1 and w == 2]  # type: ignore[arg-type]


def with_pieces(proto: bytes, pieces: list[Piece], byte_fallback: bool | None = None) -> bytes:
    """``proto`` with its piece list replaced (first, where sentencepiece writes it; other fields kept in order);
    optionally byte_fallback set."""
    out = bytearray(b"".join(encode_field(1, 2, encode_piece(p)) for p in pieces))
    for number, wire, value in fields(proto):
        if number == 1 and wire == 2:
            continue
        if number == 2 and wire == 2 and byte_fallback is not None:
            value = bytes(value) + encode_field(35, 0, int(byte_fallback))  # type: ignore[arg-type]
        out += encode_field(number, wire, value)
    return bytes(out)


# ------------------------------------------------------------------------------------------------------ ice vocab
def load_pieces(path: Path) -> tuple[bytes, list[Piece]]:
    proto = read_bytes(path, missing="tokenizer file not found (ChatGLM-6B ships ice_text.model)")
    try:
        pieces = pieces_of(proto)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"not a SentencePiece model ({exc})", path) from None
    if not pieces:
        raise InputError("not a SentencePiece model (no pieces)", path)
    return proto, pieces


def complete_first_release(proto: bytes, pieces: list[Piece]) -> tuple[bytes, list[Piece]]:
    """A text-only ice_text.model completed as the first release's tokenizer did at load time (no-op otherwise)."""
    if any(p.text == "[gMASK]" for p in pieces):
        return proto, pieces
    extra = [Piece(t, 0.0, CONTROL) for t in SPECIAL_PIECES]
    extra += [Piece(TAB_PIECE, 0.0, USER_DEFINED)] + [Piece(blank_piece(n), 0.0, USER_DEFINED)
                                                       for n in range(2, MAX_BLANK + 1)]
    extra += [Piece(f"<0x{b:02X}>", 0.0, BYTE) for b in range(256)]
    pieces = pieces + extra
    return with_pieces(proto, pieces, byte_fallback=True), pieces


@dataclass(frozen=True)
class IceVocab:
    """The tokenizer as the GGUF stores it: the (completed) model, its pieces, and the image-token offset."""

    proto: bytes
    pieces: list[Piece]
    image_tokens: int

    def id_of(self, text: str) -> int:
        for i, p in enumerate(self.pieces):
            if p.text == text:
                return i + self.image_tokens
        raise KeyError(text)

    @property
    def n_tokens(self) -> int:
        return self.image_tokens + len(self.pieces)


def load_ice_vocab(path: Path, image_tokens: int) -> IceVocab:
    proto, pieces = complete_first_release(*load_pieces(path))
    _check_distinct(pieces, path)
    texts = {p.text for p in pieces}
    missing = [t for t in (*SPECIAL_PIECES, NEWLINE_PIECE, TAB_PIECE, blank_piece(MAX_BLANK)) if t not in texts]
    if missing:
        raise InputError(f"not a ChatGLM-6B ice_text model: no pieces {', '.join(missing)}", path)
    if image_tokens < 0:
        raise InputError(f"num_image_tokens must not be negative, got {image_tokens}", path)
    return IceVocab(proto, pieces, image_tokens)


def _check_distinct(pieces: list[Piece], path: Path) -> None:
    """SentencePiece refuses a model with an empty or repeated piece, and so would a GGUF vocabulary."""
    empty = next((i for i, p in enumerate(pieces) if not p.text), None)
    if empty is not None:
        raise InputError(f"piece {empty} has an empty text", path)
    dup = first_duplicate(p.text for p in pieces)
    if dup is not None:
        raise InputError(f"piece {short(dup[0])} appears twice (pieces {dup[1]} and {dup[2]})", path)

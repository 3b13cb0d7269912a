"""ChatGLM-6B's tokenizer from a ``chatglm1`` GGUF: the stored ice_text SentencePiece model plus the published
tokenizer's normalisation and image-token id offset (see :mod:`chatglm.schema.ice`)."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import sentencepiece as spm

from chatglm.errors import InputError
from chatglm.schema.ice import NEWLINE_PIECE, TAB_PIECE, blank_piece
from chatglm.schema import keys

SPACE = "\u2581"
UNK_SURFACE = " \u2047 "  # what SentencePiece decodes an unknown piece to


class GLM1Tokenizer:
    def __init__(self, header: Any):
        raw = header.array(keys.GLM1_SPM_MODEL)
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8 or raw.size == 0:
            raise InputError(f"GGUF lacks {keys.GLM1_SPM_MODEL} (the ice_text SentencePiece model)", header.path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(raw.tobytes())
        except (RuntimeError, OSError) as exc:
            raise InputError(f"{keys.GLM1_SPM_MODEL} is not a SentencePiece model ({exc})", header.path) from None
        self.image_tokens = _u32(header, keys.GLM1_IMAGE_TOKENS)
        self.max_blank = _u32(header, keys.GLM1_MAX_BLANK)
        self.n_vocab = len(header.get("tokenizer.ggml.tokens") or [])
        self.n_pieces = self.sp.vocab_size()
        if self.image_tokens + self.n_pieces > self.n_vocab or self.max_blank < 1:
            raise InputError(f"tokenizer metadata disagrees with the vocabulary ({self.image_tokens} image tokens + "
                             f"{self.n_pieces} pieces > {self.n_vocab} tokens)", header.path)
        self._bytes: dict[int, bytes] = {}

    def preprocess(self, text: str) -> str:
        text = text.replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE)
        for n in range(self.max_blank, 1, -1):
            text = text.replace(" " * n, blank_piece(n))
        return text

    def encode(self, text: str) -> list[int]:
        """The published ``SPTokenizer.encode(text)``: no special-token parsing, no bos/eos."""
        if not text:
            return []
        return [i + self.image_tokens for i in self.sp.encode(self.preprocess(text))]

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token adds to running text: "▁" is a space, <n> a newline; special/image tokens add none."""
        cached = self._bytes.get(token)
        if cached is None:
            cached = self._bytes[token] = self._piece_bytes(token)
        return cached

    def _piece_bytes(self, token: int) -> bytes:
        if not 0 <= token < self.n_vocab:
            raise InputError(f"token id {token} is outside the vocabulary (0..{self.n_vocab - 1})")
        i = token - self.image_tokens
        if i < 0 or i >= self.n_pieces or self.sp.is_control(i) or self.sp.is_unused(i):
            return b""
        if self.sp.is_unknown(i):
            return UNK_SURFACE.encode()
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):
            return bytes([int(piece[3:5], 16)])
        return self.postprocess(piece.replace(SPACE, " ")).encode("utf-8")

    def postprocess(self, text: str) -> str:
        text = text.replace(NEWLINE_PIECE, "\n").replace(TAB_PIECE, "\t")
        for n in range(2, self.max_blank + 1):
            text = text.replace(blank_piece(n), " " * n)
        return text

    def decode(self, tokens: Sequence[int]) -> str:
        """The published ``SPTokenizer.decode``: drop image ids, SentencePiece decode, then undo the normalisation."""
        pieces = [t - self.image_tokens for t in tokens if self.image_tokens <= t < self.image_tokens + self.n_pieces]
        return self.postprocess(self.sp.decode(pieces))


def _u32(header: Any, key: str) -> int:
    value = header.get(key)
    if type(value) is not int or value < 0:
        raise InputError(f"GGUF lacks a valid {key}", header.path)
    return value

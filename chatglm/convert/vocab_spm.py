"""SentencePiece tokenizers (ChatGLM-6B/2/3, CodeGeeX2) exported as a GGUF ``llama`` (SPM) vocabulary.

Pieces keep their ids, scores and types; the family's special tokens follow at the ids the reference tokenizer gives
them (right after the SentencePiece vocabulary), and unused rows up to the embedding size become ``[PAD{id}]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import gguf
import sentencepiece as spm

from chatglm.convert.vocab_common import byte_piece, check_token_texts, missing_byte_pieces, pad_tokens
from chatglm.errors import InputError
from chatglm.fsutil import check_regular, open_regular

TT = gguf.TokenType


def load_sentencepiece(path: Path) -> spm.SentencePieceProcessor:
    check_regular(path, missing="tokenizer file not found")
    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputError(f"not a SentencePiece model ({str(exc).splitlines()[0][:120]})", path) from None
    if sp.vocab_size() <= 0:
        raise InputError("SentencePiece model has an empty vocabulary", path)
    return sp


def is_sentencepiece(path: Path) -> bool:
    """A cheap test of a tokenizer.model's format: a SentencePiece protobuf, not tiktoken's text lines."""
    try:
        with open_regular(path) as fh:
            head = fh.read(64)
    except (OSError, InputError):
        return False
    # tiktoken files are lines of "base64 rank"; a SentencePiece proto starts with field 1 (pieces, tag 0x0a).
    return head[:1] == b"\x0a"


@dataclass
class SpmVocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]


def _piece_type(sp: spm.SentencePieceProcessor, i: int) -> int:
    if sp.is_unknown(i):
        return TT.UNKNOWN
    if sp.is_control(i):
        return TT.CONTROL
    if sp.is_unused(i):
        return TT.UNUSED
    if sp.is_byte(i):
        return TT.BYTE
    return TT.NORMAL


def _piece_text(sp: spm.SentencePieceProcessor, i: int, path: Path) -> str:
    """Piece ``i``'s text; sentencepiece hands the model's bytes to Python as they are, so a piece that is not UTF-8
    (found by fuzzing) raises here instead of becoming a token llama.cpp would misread."""
    try:
        return sp.id_to_piece(i)
    except UnicodeDecodeError as exc:
        raise InputError(f"piece {i} of the SentencePiece model is not valid UTF-8 (byte {exc.start})", path) from None


def build_spm_vocab(sp: spm.SentencePieceProcessor, specials: Sequence[str], n_vocab: int, path: Path) -> SpmVocab:
    """Pieces, then ``specials`` at ids n_pieces.., then padding up to ``n_vocab`` (the embedding rows)."""
    n_pieces = sp.vocab_size()
    if n_pieces + len(specials) > n_vocab:
        raise InputError(
            f"tokenizer has {n_pieces} pieces + {len(specials)} special tokens, more than the model's "
            f"{n_vocab} embedding rows", path)
    tokens = [_piece_text(sp, i, path) for i in range(n_pieces)]
    _check_specials_are_new(tokens, specials, path)
    _check_byte_pieces(tokens, path)
    scores = [sp.get_score(i) for i in range(n_pieces)]
    types = [_piece_type(sp, i) for i in range(n_pieces)]
    tokens += list(specials)
    scores += [0.0] * len(specials)
    types += [TT.CONTROL] * len(specials)
    padded = pad_tokens(tokens, n_vocab)
    scores += [0.0] * len(padded)
    types += [TT.UNUSED] * len(padded)
    check_token_texts(tokens, path)
    return SpmVocab(tokens, scores, types)


def _check_specials_are_new(pieces: Sequence[str], specials: Sequence[str], path: Path) -> None:
    """Refuse a model that already has a piece spelled like one of the special tokens appended after it.

    The published tokenizer would keep both (text encodes to the piece, the special id is only reachable as an id),
    but a GGUF vocabulary cannot hold one text twice, and renaming either side would change what the text "[gMASK]"
    or "<|user|>" means to llama.cpp's tokenizer and to our prompt builders, which find special tokens by text.
    """
    index = {text: i for i, text in enumerate(pieces)}
    for k, text in enumerate(specials):
        if text in index:
            raise InputError(f"the SentencePiece model already has a piece {text!r} (id {index[text]}), which ChatGLM "
                             f"appends as special token id {len(pieces) + k}; a GGUF vocabulary cannot hold one text "
                             "twice", path)


def _check_byte_pieces(pieces: Sequence[str], path: Path) -> None:
    """Refuse a model without the 256 byte pieces: llama.cpp's SPM tokenizer spells any text outside the vocabulary
    as byte tokens (``<0xNN>``, else the one-byte piece) and throws std::out_of_range when one is missing.

    Adding them is not an option: the ids after the pieces belong to the special tokens, and the padding rows
    (230 in ChatGLM2/3) cannot hold 256. Every published GLM SentencePiece model (ChatGLM-6B, ChatGLM2/3, CodeGeeX2)
    has byte_fallback and all 256 pieces.
    """
    missing = missing_byte_pieces(pieces)
    if missing:
        raise InputError(f"the SentencePiece model lacks {len(missing)} of the 256 byte pieces <0x00>..<0xFF> "
                         f"(first {byte_piece(missing[0])}); llama.cpp's tokenizer needs them (train with "
                         "byte_fallback=True)", path)


def adds_dummy_prefix(sp: spm.SentencePieceProcessor) -> bool:
    """Whether the model's normalizer prepends a space (``add_dummy_prefix``), read off its behaviour."""
    pieces = sp.encode("a", out_type=str)
    return bool(pieces) and pieces[0].startswith("\u2581")


def write_spm_vocab(w: gguf.GGUFWriter, vocab: SpmVocab, special_ids: dict[str, int], space_prefix: bool) -> None:
    """``special_ids`` maps gguf special-token kinds (bos, eos, unk, pad, eot, eom, ...) to ids."""
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(vocab.tokens)
    w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    for kind, token_id in special_ids.items():
        w.add_uint32(f"tokenizer.ggml.{kind}_token_id", token_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(space_prefix)

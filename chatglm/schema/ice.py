"""ChatGLM-6B's ``ice_text`` piece rules, shared by the converter (which stores the model) and the GLM-1 tokenizer
(which normalises text the way the published ``tokenization_chatglm.py`` does before SentencePiece sees it):
newlines are ``<n>``, tabs ``<|tab|>``, runs of 2..80 spaces ``<|blank_N|>``."""

from __future__ import annotations

SPECIAL_PIECES = ("[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>")
MAX_BLANK = 80
TAB_PIECE = "<|tab|>"
NEWLINE_PIECE = "<n>"


def blank_piece(n: int) -> str:
    return f"<|blank_{n}|>"

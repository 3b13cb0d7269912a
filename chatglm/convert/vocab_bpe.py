"""Byte-level BPE tokenizers (GLM-4, GLM-4-0414, GLM-4.5) exported as a GGUF ``gpt2`` vocabulary.

Two sources, one output:

- THUDM layout (glm-4-9b-chat and friends): ``tokenizer.model`` holds tiktoken ranks, one ``base64(bytes) rank`` line
  per token; the special tokens are listed in ``tokenizer_config.json`` (``added_tokens_decoder``). tiktoken merges the
  adjacent pair whose concatenation has the lowest rank, so the merge list llama.cpp wants is recovered by replaying
  that rule on every multi-byte token with only lower ranks allowed: the last two parts are the token's merge, and
  merges are ordered by the token's rank.
- Hugging Face layout: ``tokenizer.json`` (the ``tokenizers`` library) already carries tokens, merges and added tokens.

Tokens are written in GPT-2's byte-to-unicode spelling. llama.cpp hard-codes each pre-tokenizer's regex, so the
source's regex must be GLM-4's; ``glm4`` (GLM-4's regex plus whole-word lookup before merging, which is what tiktoken
does) or ``chatglm-bpe`` (the same regex, merges only) is chosen to reproduce the source's own algorithm.
"""

from __future__ import annotations

import base64
import binascii
import functools
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import gguf

from chatglm.errors import InputError, UnsupportedModelError
from chatglm.fsutil import open_regular, read_bytes, read_json

TT = gguf.TokenType
log = logging.getLogger(__name__)

# The pre-tokenizer regex of every GLM-4 tokenizer (tiktoken pat_str / tokenizer.json Split pattern).
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_MERGES_ONLY = "chatglm-bpe"  # llama.cpp: GLM-4 regex, BPE merges
PRE_WHOLE_WORDS = "glm4"  # llama.cpp: GLM-4 regex, a pre-token found in the vocab is emitted whole (ignore_merges)

_TIKTOKEN_LINE = re.compile(rb"^([A-Za-z0-9+/]+={0,2}) ([0-9]+)$")


@functools.cache
def byte_to_unicode() -> tuple[str, ...]:
    """GPT-2's reversible spelling of bytes as printable characters: index = byte value."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return tuple(table[b] for b in range(256))


def spell(data: bytes) -> str:
    """Bytes in GPT-2 byte-level spelling."""
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


@dataclass
class BpeVocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    specials: dict[str, int] = field(default_factory=dict)  # special token text -> id


# ----------------------------------------------------------------------------------------------- tiktoken ranks


def is_tiktoken(path: Path) -> bool:
    """A cheap format test: the first lines of ``path`` are ``base64 rank`` pairs."""
    try:
        with open_regular(path) as fh:
            head = fh.read(4096)
    except (OSError, InputError):
        return False
    lines = head.split(b"\n")[:-1] if len(head) == 4096 else head.split(b"\n")
    lines = [line.rstrip(b"\r") for line in lines if line.strip()]
    return bool(lines) and all(_TIKTOKEN_LINE.match(line) for line in lines[:64])


def read_tiktoken(path: Path) -> dict[bytes, int]:
    """Token bytes -> rank. Ranks must be unique and cover 0..n-1 (they are the token ids)."""
    try:
        data = read_bytes(path, missing="tokenizer file not found")
    except FileNotFoundError:
        raise InputError("tokenizer file not found", path) from None
    except OSError as exc:
        raise InputError(f"cannot read tokenizer file: {exc.strerror or exc}", path) from None
    ranks: dict[bytes, int] = {}
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        line = raw.strip()
        if not line:
            continue
        m = _TIKTOKEN_LINE.match(line)
        if m is None:
            raise InputError(f"line {lineno} is not a tiktoken 'base64 rank' pair: {line[:60]!r}", path)
        try:
            token = base64.b64decode(m.group(1), validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"line {lineno}: invalid base64 {m.group(1)[:40]!r}", path) from None
        if not token or token in ranks:
            raise InputError(f"line {lineno}: {'empty' if not token else 'duplicate'} token {token[:20]!r}", path)
        ranks[token] = int(m.group(2))
    _check_ranks(ranks, path)
    return ranks


def _check_ranks(ranks: Mapping[bytes, int], path: Path) -> None:
    if not ranks:
        raise InputError("no tokens", path)
    values = sorted(ranks.values())
    if values != list(range(len(values))):
        first_gap = next((i for i, v in enumerate(values) if v != i), len(values))
        raise InputError(f"ranks must be the ids 0..{len(values) - 1} without gaps or repeats "
                         f"(first mismatch at rank {first_gap})", path)
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise InputError(f"{len(missing)} single bytes have no token (first: {missing[0]:#04x}); "
                         "a byte-level BPE needs all 256", path)


def _last_merge(token: bytes, rank: int, ranks: Mapping[bytes, int]) -> Optional[tuple[bytes, bytes]]:
    """The pair tiktoken joins last when it builds ``token`` from bytes using only ranks below ``rank``."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, where = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best:
                best, where = r, i
        if where < 0:
            return None  # unreachable by merges: only a whole-word match produces it
        parts[where:where + 2] = [parts[where] + parts[where + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[str]:
    """GGUF merges (``"left right"`` in byte-level spelling), in the order tiktoken's ranks apply them."""
    merges: list[str] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        pair = _last_merge(token, rank, ranks)
        if pair is not None:
            merges.append(f"{spell(pair[0])} {spell(pair[1])}")
    return merges


def added_tokens_from_config(path: Path) -> dict[int, tuple[str, bool]]:
    """``tokenizer_config.json``'s ``added_tokens_decoder``: id -> (text, special)."""
    from chatglm.convert.checkpoint import read_json

    cfg = read_json(path, "tokenizer_config.json")
    table = cfg.get("added_tokens_decoder") if isinstance(cfg, dict) else None
    if not isinstance(table, dict) or not table:
        raise InputError("no 'added_tokens_decoder' listing the special tokens ([gMASK], <sop>, <|user|>, ...)", path)
    out: dict[int, tuple[str, bool]] = {}
    for key, entry in table.items():
        if not (isinstance(key, str) and key.isdigit()) or not isinstance(entry, dict) \
                or not isinstance(entry.get("content"), str):
            raise InputError(f"added_tokens_decoder entry {key!r} is not an id with a 'content' string", path)
        out[int(key)] = (entry["content"], bool(entry.get("special", True)))
    return out


def build_tiktoken_vocab(model_path: Path, config_path: Path, n_vocab: int) -> BpeVocab:
    """THUDM GLM-4: ranks from ``tokenizer.model``, specials from ``tokenizer_config.json``, padding to ``n_vocab``."""
    ranks = read_tiktoken(model_path)
    tokens = [""] * len(ranks)
    for token, rank in ranks.items():
        tokens[rank] = spell(token)
    start = time.perf_counter()
    merges = merges_from_ranks(ranks)
    log.info("recovered %d merges from %d tiktoken ranks in %.1fs", len(merges), len(ranks),
             time.perf_counter() - start)
    vocab = BpeVocab(tokens, [TT.NORMAL] * len(tokens), merges, PRE_WHOLE_WORDS)
    _add_tokens(vocab, added_tokens_from_config(config_path), n_vocab, config_path)
    return vocab


def _add_tokens(vocab: BpeVocab, added: Mapping[int, tuple[str, bool]], n_vocab: int, path: Path) -> None:
    """Place added tokens at their ids after the BPE tokens; unused ids up to ``n_vocab`` become ``[PAD{id}]``."""
    n_base = len(vocab.tokens)
    top = max(added, default=n_base - 1)
    if max(top + 1, n_base) > n_vocab:
        raise InputError(f"token id {max(top, n_base - 1)} does not fit the model's {n_vocab} embedding rows", path)
    vocab.tokens += [f"[PAD{i}]" for i in range(n_base, n_vocab)]
    vocab.types += [TT.UNUSED] * (n_vocab - n_base)
    seen = set(vocab.tokens[:n_base])
    for token_id, (text, special) in sorted(added.items()):
        if token_id < n_base:
            if vocab.tokens[token_id] == spell(text.encode("utf-8")):
                continue  # an added token that is also a plain BPE token keeps its normal type
            raise InputError(f"added token {text!r} has id {token_id}, which is the BPE token "
                             f"{vocab.tokens[token_id]!r}", path)
        if text in seen:
            raise InputError(f"added token {text!r} appears twice", path)
        seen.add(text)
        vocab.tokens[token_id] = text
        vocab.types[token_id] = TT.CONTROL if special else TT.USER_DEFINED
        if special:
            vocab.specials[text] = token_id


# ----------------------------------------------------------------------------------------------- tokenizer.json


def build_tokenizer_json_vocab(path: Path, n_vocab: int) -> BpeVocab:
    """A ``tokenizers`` byte-level BPE with GLM-4's pre-tokenizer, padded to ``n_vocab`` ids."""
    from chatglm.convert.checkpoint import read_json

    data = read_json(path, "tokenizer.json")
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise UnsupportedModelError("tokenizer.json is not a BPE tokenizer", path)
    _check_pipeline(data, path)
    table = model.get("vocab")
    if not isinstance(table, dict) or not table:
        raise InputError("tokenizer.json has no BPE vocab", path)
    ids = sorted(table.values()) if all(type(v) is int for v in table.values()) else None
    if ids != list(range(len(table))):
        raise InputError("tokenizer.json vocab ids must be 0..n-1 without gaps or repeats", path)
    tokens = [""] * len(table)
    for text, token_id in table.items():
        tokens[token_id] = text
    pre = PRE_WHOLE_WORDS if model.get("ignore_merges") else PRE_MERGES_ONLY
    vocab = BpeVocab(tokens, [TT.NORMAL] * len(tokens), _json_merges(model.get("merges"), path), pre)
    _add_tokens(vocab, _json_added_tokens(data, path), n_vocab, path)
    return vocab


def _check_pipeline(data: dict[str, Any], path: Path) -> None:
    """Refuse tokenizer.json settings llama.cpp's ``chatglm-bpe``/``glm4`` pre-tokenizers would not reproduce."""
    if data.get("normalizer") is not None:
        raise UnsupportedModelError("tokenizer.json has a normalizer; GLM-4 tokenizers have none", path)
    pre = data.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    splits = [s for s in steps if s.get("type") == "Split"]
    levels = [s for s in steps if s.get("type") == "ByteLevel"]
    split = splits[0] if len(splits) == 1 else {}
    pattern = (split.get("pattern") or {}).get("Regex")
    isolated = split.get("behavior", "Isolated") == "Isolated" and not split.get("invert", False)
    if len(steps) != 2 or pattern != GLM4_PATTERN or not isolated or len(levels) != 1:
        raise UnsupportedModelError("tokenizer.json's pre-tokenizer is not GLM-4's (a Split on the GLM-4 regex, "
                                    "then ByteLevel)", path)
    if levels[0].get("add_prefix_space") or levels[0].get("use_regex", True):
        raise UnsupportedModelError("tokenizer.json's ByteLevel step adds a prefix space or its own regex", path)
    model = data["model"]
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise UnsupportedModelError(f"tokenizer.json BPE option {key}={model[key]!r} is not supported", path)


def _json_merges(merges: Any, path: Path) -> list[str]:
    if not isinstance(merges, list):
        raise InputError("tokenizer.json has no BPE merges list", path)
    out: list[str] = []
    for item in merges:
        pair = item.split(" ") if isinstance(item, str) else item
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p for p in pair)):
            raise InputError(f"malformed merge {item!r}", path)
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _json_added_tokens(data: dict[str, Any], path: Path) -> dict[int, tuple[str, bool]]:
    out: dict[int, tuple[str, bool]] = {}
    for entry in data.get("added_tokens") or []:
        if not isinstance(entry, dict) or type(entry.get("id")) is not int or not isinstance(entry.get("content"), str):
            raise InputError(f"malformed added token {entry!r}", path)
        if entry.get("normalized") or entry.get("lstrip") or entry.get("rstrip"):
            raise UnsupportedModelError(f"added token {entry['content']!r} is normalized or strips spaces", path)
        out[entry["id"]] = (entry["content"], bool(entry.get("special")))
    return out


# ----------------------------------------------------------------------------------------------- GGUF


def require_specials(vocab: BpeVocab, wanted: tuple[str, ...], path: Path) -> None:
    missing = [t for t in wanted if t not in vocab.specials]
    if missing:
        raise InputError(f"the special tokens {', '.join(missing)} are not defined", path)


def write_bpe_vocab(w: gguf.GGUFWriter, vocab: BpeVocab, special_ids: Mapping[str, int]) -> None:
    """``special_ids`` maps gguf special-token kinds (eos, eot, eom, pad, ...) to ids."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for kind, token_id in special_ids.items():
        w.add_uint32(f"tokenizer.ggml.{kind}_token_id", token_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def glm_special_ids(vocab: BpeVocab) -> dict[str, int]:
    """End of text is eos (and pad); ``<|user|>`` ends a turn (eot); ``<|observation|>`` follows a tool call (eom)."""
    s = vocab.specials
    return {"eos": s["<|endoftext|>"], "pad": s["<|endoftext|>"], "eot": s["<|user|>"], "eom": s["<|observation|>"]}


def chat_template_of(config_path: Path) -> str:
    """The chat template in ``tokenizer_config.json`` (or an adjacent ``chat_template.jinja``), or ""."""
    jinja = config_path.parent / "chat_template.jinja"
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return ""
    try:
        cfg = read_json(config_path)
    except InputError:
        return ""
    template = cfg.get("chat_template") if isinstance(cfg, dict) else None
    return template if isinstance(template, str) else ""

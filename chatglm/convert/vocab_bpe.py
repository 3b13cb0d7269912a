"""Byte-level BPE tokenizers (GLM-4, GLM-4-0414, GLM-4.5) exported as a GGUF ``gpt2`` vocabulary.

Two sources, one output:

- THUDM layout (glm-4-9b-chat and friends): ``tokenizer.model`` holds tiktoken ranks, one ``base64(bytes) rank`` line
  per token; the special tokens are listed in ``tokenizer_config.json`` (``added_tokens_decoder``). tiktoken merges the
  adjacent pair whose concatenation has the lowest rank, so the merge list llama.cpp wants is recovered by replaying
  that rule on every multi-byte token with only lower ranks allowed: the last two parts are the token's first merge,
  its other splits into two tokens follow, and merges are ordered by the token's rank.
- Hugging Face layout: ``tokenizer.json`` (the ``tokenizers`` library) already carries tokens, merges and added tokens.

Tokens are written in GPT-2's byte-to-unicode spelling. llama.cpp hard-codes each pre-tokenizer's regex, so the
source's regex must be GLM-4's; ``glm4`` (GLM-4's regex plus whole-word lookup before merging, which is what tiktoken
does) or ``chatglm-bpe`` (the same regex, merges only) is chosen to reproduce the source's own algorithm.
"""

from __future__ import annotations

import base64
import binascii
import functools
import heapq
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import gguf

from chatglm.convert.vocab_common import (check_token_length, check_token_texts, json_field, json_kind, json_object,
                                          short, unique_name)
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.fsutil import open_regular, reading

TT = gguf.TokenType
log = logging.getLogger(__name__)

# The pre-tokenizer regex of every GLM-4 tokenizer (tiktoken pat_str / tokenizer.json Split pattern).
GLM4_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_MERGES_ONLY = "chatglm-bpe"  # llama.cpp: GLM-4 regex, BPE merges
PRE_WHOLE_WORDS = "glm4"  # llama.cpp: GLM-4 regex, a pre-token found in the vocab is emitted whole (ignore_merges)

_TIKTOKEN_LINE = re.compile(rb"^([A-Za-z0-9+/]+={0,2}) ([0-9]+)$")
MAX_TIKTOKEN_FILE_BYTES = 16 << 20  # our bound (GLM-4's is 2.6 MB): merge recovery costs ~n log n per byte


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


@functools.cache
def _spell_table() -> dict[int, str]:
    return dict(enumerate(byte_to_unicode()))


def spell(data: bytes) -> str:
    """Bytes in GPT-2 byte-level spelling."""
    return data.decode("latin-1").translate(_spell_table())


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
    data = _read_bounded(path, MAX_TIKTOKEN_FILE_BYTES)
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
        check_token_length(token, f"line {lineno}: token {short(token)}", path)
        if len(m.group(2)) > 10:
            raise InputError(f"line {lineno}: rank {m.group(2)[:20].decode()}... is not a token id", path)
        ranks[token] = int(m.group(2))
    _check_ranks(ranks, path)
    return ranks


def _read_bounded(path: Path, limit: int) -> bytes:
    with open_regular(path, missing="tokenizer file not found") as fh, reading(path, "tokenizer file"):
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise InputError(f"tokenizer file is larger than {limit >> 20} MiB; GLM-4's is under 3 MiB", path)
    return data


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
    """The pair tiktoken joins last when it builds ``token`` from bytes using only ranks below ``rank``.

    tiktoken joins the adjacent pair of lowest rank, the leftmost on a tie. Replayed with a heap of candidate pairs
    (rank, start) and parts kept as a linked list, so one token costs O(n log n) instead of a rescan per join.
    """
    n = len(token)
    if n == 2:
        return token[:1], token[1:]
    nxt = list(range(1, n + 1))  # nxt[i]: where the part after the one starting at i starts (n: the end)
    prv = list(range(-1, n - 1))
    heap: list[tuple[int, int, int, int]] = []

    def candidate(i: int) -> None:
        j = nxt[i]
        if j < n:
            r = ranks.get(token[i:nxt[j]])
            if r is not None and r < rank:
                heapq.heappush(heap, (r, i, j, nxt[j]))

    for i in range(n - 1):
        candidate(i)
    parts = n
    while parts > 2 and heap:
        _, i, j, end = heapq.heappop(heap)
        if nxt[i] != j or nxt[j] != end or prv[j] != i:
            continue  # stale: one of the two parts has joined another since
        nxt[i], prv[j] = end, -2
        if end < n:
            prv[end] = i
        parts -= 1
        candidate(i)
        if prv[i] >= 0:
            candidate(prv[i])
    if parts != 2:
        return None  # unreachable by merges: only a whole-word match produces it
    return token[:nxt[0]], token[nxt[0]:]


# Other splits cost their token's length each: the whole list stays within this many times the vocabulary's bytes
# (the real GLM-4 vocabulary needs ~1.3x; a crafted run of 1024 tokens "aa".."a"*1024 would otherwise want 500 MB).
SPLIT_BUDGET = 4


def merges_from_ranks(ranks: Mapping[bytes, int]) -> list[str]:
    """GGUF merges (``"left right"`` in byte-level spelling), in the order tiktoken's ranks apply them.

    tiktoken joins any two adjacent parts whose concatenation is a token, whichever split of it they are, while
    llama.cpp joins only listed pairs. So each token lists the split tiktoken reaches from its own bytes first, then
    its other splits into two tokens (the parts a longer word can leave side by side) while the budget lasts: with
    only the first, the real GLM-4 vocabulary tokenized 4 of 156 corpus lines differently from tiktoken ("测试" came
    out as "测" "试").
    """
    merges: list[str] = []
    budget, cut = SPLIT_BUDGET * sum(map(len, ranks)), False
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        pair = _last_merge(token, rank, ranks)
        if pair is not None:
            merges.append(f"{spell(pair[0])} {spell(pair[1])}")
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks and (left, right) != pair:
                if budget < len(token):
                    cut = True
                    break
                merges.append(f"{spell(left)} {spell(right)}")
                budget -= len(token)
    if cut:
        log.warning("tiktoken vocabulary: the list of alternative merges was cut at its size bound")
    return merges


_DECIMAL_ID = re.compile(r"[0-9]{1,10}")


def added_tokens_from_config(path: Path) -> dict[int, tuple[str, bool]]:
    """``tokenizer_config.json``'s ``added_tokens_decoder``: id -> (text, special)."""
    from chatglm.convert.checkpoint import read_json

    cfg = json_object(read_json(path, "tokenizer_config.json"), "tokenizer_config.json", path)
    table = json_field(cfg, "added_tokens_decoder", dict, path, default=None)
    if not table:
        raise InputError("no 'added_tokens_decoder' listing the special tokens ([gMASK], <sop>, <|user|>, ...)", path)
    out: dict[int, tuple[str, bool]] = {}
    for key, entry in table.items():
        if not _DECIMAL_ID.fullmatch(key):
            raise InputError(f"field 'added_tokens_decoder' has the key {short(key)}, not a token id", path)
        where = f"added_tokens_decoder.{key}."
        entry = json_object(entry, f"field 'added_tokens_decoder.{key}'", path)
        content = json_field(entry, "content", str, path, where)
        special = json_field(entry, "special", bool, path, where, default=True)
        if not content:
            raise InputError(f"field '{where}content' is empty", path)
        check_token_length(content, f"added token {short(content)}", path)
        out[int(key)] = (content, special)
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
    """Place added tokens at their ids after the BPE tokens; unused ids up to ``n_vocab`` become ``[PAD{id}]``.

    An added token spelled like a BPE token is refused, not renamed: the published tokenizers map that text to one
    id, and our prompt builders and llama.cpp find special tokens by their text.
    """
    n_base = len(vocab.tokens)
    top = max(added, default=n_base - 1)
    if max(top + 1, n_base) > n_vocab:
        raise InputError(f"token id {max(top, n_base - 1)} does not fit the model's {n_vocab} embedding rows", path)
    index = {text: i for i, text in enumerate(vocab.tokens)}
    placed: dict[int, str] = {}
    for token_id, (text, special) in sorted(added.items()):
        if token_id < n_base:
            if vocab.tokens[token_id] == spell(text.encode("utf-8", "surrogatepass")):
                continue  # an added token that is also a plain BPE token keeps its normal type
            raise InputError(f"added token {short(text)} has id {token_id}, which is the BPE token "
                             f"{short(vocab.tokens[token_id])}", path)
        if text in index:
            raise InputError(f"added token {short(text)} (id {token_id}) repeats the text of token {index[text]}; "
                             "a GGUF vocabulary needs distinct texts", path)
        index[text] = token_id
        placed[token_id] = text
        if special:
            vocab.specials[text] = token_id
    taken = set(index)
    for i in range(n_base, n_vocab):
        text = placed.get(i)
        if text is None:  # a filler: no tokenizer produces it, so a free name changes nothing
            text = unique_name(f"[PAD{i}]", taken)
            taken.add(text)
        vocab.tokens.append(text)
        vocab.types.append(_added_type(added, i))
    check_token_texts(vocab.tokens, path)


def _added_type(added: Mapping[int, tuple[str, bool]], token_id: int) -> int:
    entry = added.get(token_id)
    if entry is None:
        return TT.UNUSED
    return TT.CONTROL if entry[1] else TT.USER_DEFINED


# ----------------------------------------------------------------------------------------------- tokenizer.json


def build_tokenizer_json_vocab(path: Path, n_vocab: int) -> BpeVocab:
    """A ``tokenizers`` byte-level BPE with GLM-4's pre-tokenizer, padded to ``n_vocab`` ids."""
    from chatglm.convert.checkpoint import read_json

    data = json_object(read_json(path, "tokenizer.json"), "tokenizer.json", path)
    model = json_field(data, "model", dict, path)
    if json_field(model, "type", str, path, "model.", default=None) != "BPE":
        raise UnsupportedModelError("tokenizer.json is not a BPE tokenizer", path)
    _check_pipeline(data, path)
    tokens = _json_vocab(json_field(model, "vocab", dict, path, "model."), path)
    whole_words = json_field(model, "ignore_merges", bool, path, "model.", default=False)
    pre = PRE_WHOLE_WORDS if whole_words else PRE_MERGES_ONLY
    merges = _json_merges(json_field(model, "merges", list, path, "model."), tokens, path)
    vocab = BpeVocab(tokens, [TT.NORMAL] * len(tokens), merges, pre)
    _add_tokens(vocab, _json_added_tokens(data, path), n_vocab, path)
    return vocab


def _json_vocab(table: dict[str, Any], path: Path) -> list[str]:
    """``model.vocab`` (text -> id) as a list indexed by id; ids must be 0..n-1."""
    if not table:
        raise InputError("tokenizer.json has no BPE vocab", path)
    tokens: list[Optional[str]] = [None] * len(table)
    for text, token_id in table.items():
        if type(token_id) is not int:
            raise InputError(f"field 'model.vocab' maps {short(text)} to {json_kind(token_id)}, not a token id", path)
        if not 0 <= token_id < len(table) or tokens[token_id] is not None:
            raise InputError("tokenizer.json vocab ids must be 0..n-1 without gaps or repeats "
                             f"({short(text)} has id {token_id})", path)
        check_token_length(text, f"vocab token {short(text)}", path)
        tokens[token_id] = text
    return tokens  # type: ignore[return-value]  # every slot is filled: n distinct ids in 0..n-1


def _check_pipeline(data: dict[str, Any], path: Path) -> None:
    """Refuse tokenizer.json settings llama.cpp's ``chatglm-bpe``/``glm4`` pre-tokenizers would not reproduce."""
    if data.get("normalizer") is not None:
        raise UnsupportedModelError("tokenizer.json has a normalizer; GLM-4 tokenizers have none", path)
    pre = json_field(data, "pre_tokenizer", (dict, type(None)), path, default=None) or {}
    if pre.get("type") == "Sequence":
        steps = json_field(pre, "pretokenizers", list, path, "pre_tokenizer.")
        where = "pre_tokenizer.pretokenizers[]."
        steps = [json_object(s, "each of 'pre_tokenizer.pretokenizers'", path) for s in steps]
    else:
        steps, where = [pre], "pre_tokenizer."
    splits = [s for s in steps if s.get("type") == "Split"]
    levels = [s for s in steps if s.get("type") == "ByteLevel"]
    split = splits[0] if len(splits) == 1 else {}
    pattern = json_field(split, "pattern", dict, path, where, default={})
    regex = json_field(pattern, "Regex", str, path, where + "pattern.", default=None)
    isolated = json_field(split, "behavior", str, path, where, default="Isolated") == "Isolated" \
        and not json_field(split, "invert", bool, path, where, default=False)
    if len(steps) != 2 or regex != GLM4_PATTERN or not isolated or len(levels) != 1:
        raise UnsupportedModelError("tokenizer.json's pre-tokenizer is not GLM-4's (a Split on the GLM-4 regex, "
                                    "then ByteLevel)", path)
    if json_field(levels[0], "add_prefix_space", bool, path, where, default=False) \
            or json_field(levels[0], "use_regex", bool, path, where, default=True):
        raise UnsupportedModelError("tokenizer.json's ByteLevel step adds a prefix space or its own regex", path)
    model = data["model"]
    for key, kinds in (("continuing_subword_prefix", str), ("end_of_word_suffix", str), ("dropout", float)):
        if json_field(model, key, (kinds, type(None)), path, "model.", default=None):
            raise UnsupportedModelError(f"tokenizer.json BPE option {key}={model[key]!r} is not supported", path)


def _json_merges(merges: list[Any], tokens: list[str], path: Path) -> list[str]:
    """``model.merges`` in either published form ("left right" strings, or [left, right] pairs). llama.cpp splits a
    merge at its first space, so neither side may hold one; both sides and their join must be vocab tokens, as
    ``tokenizers`` itself requires."""
    known = set(tokens)
    out: list[str] = []
    for n, item in enumerate(merges):
        pair = item.split(" ") if isinstance(item, str) else item
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) and p and " " not in p
                                                                  for p in pair)):
            raise InputError(f"field 'model.merges' entry {n} is not a merge \"left right\" or [left, right]: "
                             f"{short(item) if isinstance(item, str) else json_kind(item)}", path)
        for part in (pair[0], pair[1], pair[0] + pair[1]):
            if part not in known:
                raise InputError(f"field 'model.merges' entry {n} ({short(pair[0] + ' ' + pair[1])}) uses "
                                 f"{short(part)}, which is not in the vocab", path)
        out.append(f"{pair[0]} {pair[1]}")
    return out


_ADDED_FLAGS = ("special", "normalized", "lstrip", "rstrip", "single_word")


def _json_added_tokens(data: dict[str, Any], path: Path) -> dict[int, tuple[str, bool]]:
    out: dict[int, tuple[str, bool]] = {}
    entries = json_field(data, "added_tokens", (list, type(None)), path, default=None) or []
    for n, entry in enumerate(entries):
        where = f"added_tokens[{n}]."
        entry = json_object(entry, f"added_tokens[{n}]", path)
        token_id = json_field(entry, "id", int, path, where)
        content = json_field(entry, "content", str, path, where)
        flags = {key: json_field(entry, key, bool, path, where, default=False) for key in _ADDED_FLAGS}
        if token_id < 0:
            raise InputError(f"field '{where}id' is negative ({token_id})", path)
        if not content:
            raise InputError(f"field '{where}content' is empty", path)
        check_token_length(content, f"added token {short(content)}", path)
        if flags["normalized"] or flags["lstrip"] or flags["rstrip"]:
            raise UnsupportedModelError(f"added token {short(content)} is normalized or strips spaces", path)
        if token_id in out:
            raise InputError(f"added tokens {short(out[token_id][0])} and {short(content)} share id {token_id}",
                             path)
        out[token_id] = (content, flags["special"])
    return out


# ----------------------------------------------------------------------------------------------- GGUF


def require_specials(vocab: BpeVocab, wanted: tuple[str, ...], path: Path) -> None:
    missing = [t for t in wanted if t not in vocab.specials]
    if missing:
        raise InputError(f"the special tokens {', '.join(missing)} are not defined", path)


# gguf's key names where they are not tokenizer.ggml.<kind>_token_id (llama.cpp reads padding_token_id)
SPECIAL_ID_KEYS = {"pad": gguf.Keys.Tokenizer.PAD_ID}


def write_bpe_vocab(w: gguf.GGUFWriter, vocab: BpeVocab, special_ids: Mapping[str, int]) -> None:
    """``special_ids`` maps gguf special-token kinds (eos, eot, eom, pad, ...) to ids."""
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    w.add_token_merges(vocab.merges)
    for kind, token_id in special_ids.items():
        w.add_uint32(SPECIAL_ID_KEYS.get(kind, f"tokenizer.ggml.{kind}_token_id"), token_id)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)


def glm_special_ids(vocab: BpeVocab) -> dict[str, int]:
    """End of text is eos (and pad); ``<|user|>`` ends a turn (eot); ``<|observation|>`` follows a tool call (eom)."""
    s = vocab.specials
    return {"eos": s["<|endoftext|>"], "pad": s["<|endoftext|>"], "eot": s["<|user|>"], "eom": s["<|observation|>"]}


def chat_template_of(config_path: Path) -> str:
    """The chat template in ``tokenizer_config.json`` (or an adjacent ``chat_template.jinja``), or "" when neither
    file has one. ``chat_template`` is a string, or Hugging Face's list of named templates (the "default" one)."""
    from chatglm.convert.checkpoint import read_json
    from chatglm.fsutil import read_text

    jinja = config_path.parent / "chat_template.jinja"
    if jinja.is_file():
        return read_text(jinja)
    if not config_path.exists():
        return ""
    cfg = json_object(read_json(config_path, "tokenizer_config.json"), "tokenizer_config.json", config_path)
    template = json_field(cfg, "chat_template", (str, list, type(None)), config_path, default=None)
    if isinstance(template, list):
        return _default_template(template, config_path)
    return template or ""


def _default_template(named: list[Any], path: Path) -> str:
    for n, entry in enumerate(named):
        entry = json_object(entry, f"field 'chat_template[{n}]'", path)
        name = json_field(entry, "name", str, path, f"chat_template[{n}].")
        text = json_field(entry, "template", str, path, f"chat_template[{n}].")
        if name == "default":
            return text
    return ""

"""Train tiny SentencePiece models shaped like ChatGLM2/3's ``tokenizer.model``, and name their special-token ids.

What the published tokenizer looks like (from its ``tokenization_chatglm.py`` and its observable encodings):

- ``SPTokenizer`` wraps one SentencePiece model; ``encode(text)`` is ``sp.encode(text)`` with no BOS/EOS; bos/eos/unk
  come from the model (``<s>``=1, ``</s>``=2, ``<unk>``=0) and pad is unk. There is no pad piece.
- Special tokens are not pieces: they are appended after ``sp.vocab_size()`` in a fixed order
  (``[MASK] [gMASK] [sMASK] sop eop`` then, for ChatGLM3, ``<|system|> <|user|> <|assistant|> <|observation|>``).
- Published ChatGLM3 prompts encode ``"\\n"`` as ``[30910, 13]``: the piece ``▁`` (dummy prefix) followed by the byte
  piece ``<0x0A>`` (id 3 + 10). So: BPE with ``byte_fallback``, ``add_dummy_prefix``, no newline piece.

The trainer settings below reproduce those properties: BPE, byte fallback, dummy prefix, identity normalisation (no NFKC,
so full-width characters stay themselves), extra whitespace kept and whitespace-only pieces allowed (code indentation
becomes ``▁▁▁▁`` pieces), digits split one by one, single-threaded for determinism. Training lines are split at
``"\\n"`` so a newline never becomes a piece and always goes through byte fallback, as in the published model.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path

from chatglm.devtools.corpus import training_texts

log = logging.getLogger(__name__)

#: Special tokens appended after the SentencePiece vocabulary, in the published order.
SPECIAL_TOKENS: dict[str, tuple[str, ...]] = {
    "chatglm2": ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"),
    "chatglm3": (
        "[MASK]",
        "[gMASK]",
        "[sMASK]",
        "sop",
        "eop",
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|observation|>",
    ),
}

DEFAULT_SP_VOCAB = 1000


def _split_lines(texts: Iterable[str]) -> list[str]:
    lines: list[str] = []
    for text in texts:
        lines.extend(line for line in text.split("\n") if line)
    return lines


def train_sentencepiece(
    out_path: str | Path,
    texts: Sequence[str] | None = None,
    vocab_size: int = DEFAULT_SP_VOCAB,
    seed: int = 0,
    character_coverage: float = 1.0,
) -> Path:
    """Train a ChatGLM-style BPE SentencePiece model on ``texts`` (default: the corpus minus rare scripts).

    Returns ``out_path``. The same arguments give byte-identical files.
    """
    import sentencepiece as spm

    lines = _split_lines(training_texts() if texts is None else texts)
    if not lines:
        raise ValueError("train_sentencepiece: no training text")
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=True,
        max_sentencepiece_length=16,
        character_coverage=character_coverage,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        shuffle_input_sentence=False,
        input_sentence_size=0,
        minloglevel=2,
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    log.info("trained SentencePiece (%d pieces) on %d lines -> %s", vocab_size, len(lines), out)
    return out


def sp_vocab_size(tokenizer_model: str | Path) -> int:
    """Number of pieces in a SentencePiece model file."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(tokenizer_model)).vocab_size()


def special_token_ids(tokenizer_model: str | Path, family: str = "chatglm3") -> dict[str, int]:
    """Ids the published ChatGLM tokenizer assigns: the appended specials plus ``<bos> <eos> <pad> <unk>``."""
    import sentencepiece as spm

    if family not in SPECIAL_TOKENS:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(SPECIAL_TOKENS)}")
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    n = sp.vocab_size()
    ids = {token: n + i for i, token in enumerate(SPECIAL_TOKENS[family])}
    ids.update({"<bos>": sp.bos_id(), "<eos>": sp.eos_id(), "<pad>": sp.unk_id(), "<unk>": sp.unk_id()})
    return ids

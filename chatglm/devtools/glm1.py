"""Tiny ChatGLM-6B (first generation) checkpoints in the published THUDM/chatglm-6b layout, for tests and benchmarks.

Development only: nothing in the runtime imports this module. Weights are drawn with numpy and written as
safetensors under the published key names; config.json uses the published keys; the tokenizer is a small
SentencePiece model rearranged into the ``ice_text.model`` arrangement (see :mod:`chatglm.convert.vocab_ice`):
text pieces (``<unk> <s> </s> <pad> <n>`` first), then ``[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC>
<dBLOCK>``, then ``<|tab|>`` and ``<|blank_2|>``..``<|blank_80|>``, then the 256 byte pieces. With
``first_release=True`` only the text pieces are kept, as in the first published release (the converter completes it).
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from chatglm.convert.vocab_ice import BYTE, CONTROL, USER_DEFINED, Piece, pieces_of, with_pieces
from chatglm.schema.ice import MAX_BLANK, NEWLINE_PIECE, SPECIAL_PIECES, TAB_PIECE, blank_piece

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["ChatGLMModel"],
    "model_type": "chatglm",
    "hidden_size": 64,
    "inner_hidden_size": 256,
    "num_layers": 28,  # the published block fixes alpha = sqrt(2 * 28); 28 layers keep every reading equal
    "num_attention_heads": 4,
    "layernorm_epsilon": 1e-5,
    "max_sequence_length": 2048,
    "position_encoding_2d": True,
    "quantization_bit": 0,
    "pre_seq_len": None,
    "prefix_projection": False,
    "use_cache": True,
    "torch_dtype": "float16",
}


# ----------------------------------------------------------------------------------------------------- tokenizer
def preprocess(text: str, max_blank: int = MAX_BLANK) -> str:
    """The published tokenizer's text normalisation (newline, tab, runs of spaces -> pieces)."""
    text = text.replace("\n", NEWLINE_PIECE).replace("\t", TAB_PIECE)
    for n in range(max_blank, 1, -1):
        text = text.replace(" " * n, blank_piece(n))
    return text


def train_ice_tokenizer(out_path: str | Path, texts: Optional[Iterable[str]] = None, vocab_size: int = 900,
                        first_release: bool = False, seed: int = 0) -> Path:
    """Train a small unigram SentencePiece model and lay it out as ChatGLM-6B's ``ice_text.model``."""
    import sentencepiece as spm

    from chatglm.devtools.corpus import training_texts

    lines = [preprocess(t) for t in (training_texts() if texts is None else texts)]
    spm.set_random_generator_seed(seed)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter([ln for ln in lines if ln]), model_writer=buf, model_type="unigram",
        vocab_size=vocab_size, byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, split_digits=True, user_defined_symbols=[NEWLINE_PIECE],
        character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=3, num_threads=1,
        shuffle_input_sentence=False, input_sentence_size=0, minloglevel=2, max_sentencepiece_length=8,
    )
    proto = buf.getvalue()
    pieces = pieces_of(proto)
    text = [p for p in pieces if p.type != BYTE]
    if first_release:
        arranged, fallback = text, False
    else:
        arranged = (text + [Piece(t, 0.0, CONTROL) for t in SPECIAL_PIECES] + [Piece(TAB_PIECE, 0.0, USER_DEFINED)]
                    + [Piece(blank_piece(n), 0.0, USER_DEFINED) for n in range(2, MAX_BLANK + 1)]
                    + [p for p in pieces if p.type == BYTE])
        fallback = True
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(with_pieces(proto, arranged, byte_fallback=fallback))
    return out


class ReferenceTokenizer:
    """The published SPTokenizer's encode/decode over a SentencePiece model (what the engine must reproduce)."""

    def __init__(self, model_path: str | Path, image_tokens: int):
        import sentencepiece as spm

        from chatglm.convert.vocab_ice import complete_first_release, load_pieces

        proto, _ = complete_first_release(*load_pieces(Path(model_path)))
        self.sp = spm.SentencePieceProcessor(model_proto=proto)
        self.image_tokens = image_tokens

    def encode(self, text: str) -> list[int]:
        return [i + self.image_tokens for i in self.sp.encode(preprocess(text))]

    def decode(self, ids: Sequence[int]) -> str:
        text = self.sp.decode([i - self.image_tokens for i in ids if i >= self.image_tokens])
        text = text.replace(NEWLINE_PIECE, "\n").replace(TAB_PIECE, "\t")
        for n in range(2, MAX_BLANK + 1):
            text = text.replace(blank_piece(n), " " * n)
        return text

    def __getitem__(self, piece: str) -> int:
        return self.sp.piece_to_id(piece) + self.image_tokens


# -------------------------------------------------------------------------------------------------------- weights
def tiny_config(vocab_size: int, bos: int, eos: int, mask: int, gmask: int, **overrides: Any) -> dict[str, Any]:
    unknown = set(overrides) - set(TINY_CONFIG)
    if unknown:
        raise TypeError(f"tiny_config: unknown settings {sorted(unknown)}")
    return {**TINY_CONFIG, **overrides, "vocab_size": vocab_size, "bos_token_id": bos, "eos_token_id": eos,
            "mask_token_id": mask, "gmask_token_id": gmask, "pad_token_id": 3}


def random_weights(config: dict[str, Any], seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    """float32 weights under the published names. Scales keep activations O(1) through 28 alpha-scaled layers."""
    rng = np.random.default_rng(seed)
    h, ff, v, n = config["hidden_size"], config["inner_hidden_size"], config["vocab_size"], config["num_layers"]

    def linear(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def vec(size: int, mean: float, spread: float) -> np.ndarray:
        return (mean + spread * rng.standard_normal(size)).astype(np.float32)

    w: dict[str, np.ndarray] = {"transformer.word_embeddings.weight": rng.standard_normal((v, h)).astype(np.float32)}
    head_dim = h // config["num_attention_heads"]
    inv_freq = 1.0 / 10000 ** (np.arange(0, head_dim // 2, 2, dtype=np.float32) / (head_dim // 2))
    for i in range(n):
        p = f"transformer.layers.{i}."
        w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"] = vec(h, 1.0, 0.2), vec(h, 0.0, 0.2)
        w[p + "attention.query_key_value.weight"] = linear(3 * h, h)
        w[p + "attention.query_key_value.bias"] = vec(3 * h, 0.0, 0.5)
        w[p + "attention.dense.weight"], w[p + "attention.dense.bias"] = linear(h, h), vec(h, 0.0, 0.2)
        w[p + "attention.rotary_emb.inv_freq"] = inv_freq.astype(np.float32)
        w[p + "post_attention_layernorm.weight"] = vec(h, 1.0, 0.2)
        w[p + "post_attention_layernorm.bias"] = vec(h, 0.0, 0.2)
        w[p + "mlp.dense_h_to_4h.weight"], w[p + "mlp.dense_h_to_4h.bias"] = linear(ff, h), vec(ff, 0.0, 0.2)
        w[p + "mlp.dense_4h_to_h.weight"], w[p + "mlp.dense_4h_to_h.bias"] = linear(h, ff), vec(h, 0.0, 0.2)
    w["transformer.final_layernorm.weight"] = vec(h, 1.0, 0.2)
    w["transformer.final_layernorm.bias"] = vec(h, 0.0, 0.2)
    if not tied:
        w["lm_head.weight"] = linear(v, h)
    return w


def save_glm1_checkpoint(out_dir: str | Path, tokenizer_model: str | Path, config: dict[str, Any],
                         weights: dict[str, np.ndarray], image_tokens: int = 0, dtype: str = "float32") -> Path:
    """Write config.json, tokenizer_config.json, ice_text.model and model.safetensors in the published layout."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tok_cfg = {"tokenizer_class": "ChatGLMTokenizer", "bos_token": "<sop>", "eos_token": "<eop>",
               "end_token": "</s>", "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>",
               "unk_token": "<unk>", "remove_space": False, "do_lower_case": False,
               "num_image_tokens": image_tokens}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2), encoding="utf-8")
    (out / "ice_text.model").write_bytes(Path(tokenizer_model).read_bytes())
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    save_file({k: np.ascontiguousarray(a.astype(np_dtype)) for k, a in weights.items()},
              str(out / "model.safetensors"))
    return out


def tiny_glm1_checkpoint(out_dir: str | Path, tokenizer_model: str | Path, seed: int = 0, image_tokens: int = 0,
                         pad_to: int = 64, tied: bool = False, **overrides: Any) -> tuple[Path, dict, dict]:
    """A complete tiny checkpoint: returns (folder, config, weights)."""
    ref = ReferenceTokenizer(tokenizer_model, image_tokens)
    n_tokens = image_tokens + ref.sp.vocab_size()
    vocab = -(-n_tokens // pad_to) * pad_to
    config = tiny_config(vocab, ref["<sop>"], ref["<eop>"], ref["[MASK]"], ref["[gMASK]"], **overrides)
    weights = random_weights(config, seed, tied=tied)
    folder = save_glm1_checkpoint(out_dir, tokenizer_model, config, weights, image_tokens)
    return folder, config, weights


"""Checks a GGUF's hyperparameters and tokenizer before a native loader sees them.

llama.cpp throws (and we report) on a missing tensor or a wrong shape, but divides by head counts and indexes by token
ids it was given: a zero, a count that does not divide, or an id past the vocabulary would crash or abort the process.
"""

from __future__ import annotations

from chatglm.schema.vocab import check_loadable_vocab
from chatglm.errors import InputError
from chatglm.gguf_file import GGUFHeader

SIZES = ("block_count", "embedding_length", "feed_forward_length", "attention.head_count", "context_length")


def _positive(header: GGUFHeader, key: str, required: bool = True) -> int | None:
    value = header.arch_get(key)
    if value is None:
        if required:
            raise InputError(f"GGUF lacks {header.arch}.{key}", header.path)
        return None
    if type(value) is not int or not 0 < value < 1 << 31:
        raise InputError(f"GGUF {header.arch}.{key} must be a positive integer, got {value!r}", header.path)
    return value


def check_transformer(header: GGUFHeader) -> None:
    """Hyperparameters, tokenizer and embedding of a llama.cpp-run GLM GGUF."""
    n_layer, n_embd, _, n_head, _ = (_positive(header, k) for k in SIZES)
    n_head_kv = _positive(header, "attention.head_count_kv", required=False) or n_head
    head_dim = _positive(header, "attention.key_length", required=False) or n_embd // n_head
    if n_head % n_head_kv:
        raise InputError(f"GGUF head_count {n_head} is not a multiple of head_count_kv {n_head_kv}", header.path)
    if header.arch_get("attention.key_length") is None and n_embd % n_head:
        raise InputError(f"GGUF embedding_length {n_embd} is not a multiple of head_count {n_head}", header.path)
    rope = header.arch_get("rope.dimension_count")
    if rope is not None and (type(rope) is not int or rope <= 0 or rope > head_dim or rope % 2):
        raise InputError(f"GGUF rope.dimension_count {rope!r} does not fit a head of {head_dim}", header.path)
    check_vocab(header, n_embd)
    missing = [i for i in range(n_layer) if not any(n.startswith(f"blk.{i}.") for n in header.tensors)]
    if missing:
        raise InputError(f"GGUF has block_count {n_layer} but no tensors for block(s) {missing[:5]}", header.path)


def check_vocab(header: GGUFHeader, n_embd: int) -> int:
    tokens = header.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise InputError("GGUF has no tokenizer (tokenizer.ggml.tokens)", header.path)
    n_vocab = len(tokens)
    check_loadable_vocab(tokens, header.get("tokenizer.ggml.model"), header.path)
    types = header.array("tokenizer.ggml.token_type")
    if len(types) not in (0, n_vocab):
        raise InputError(f"GGUF has {len(types)} token types for {n_vocab} tokens", header.path)
    for key, value in header.kv.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if type(value) is not int or not 0 <= value < n_vocab:
                raise InputError(f"GGUF {key} = {value!r} is outside the vocabulary of {n_vocab}", header.path)
    emb = header.tensors.get("token_embd.weight")
    if emb is None:
        raise InputError("GGUF lacks token_embd.weight", header.path)
    if emb.shape[:2] != (n_embd, n_vocab):
        raise InputError(f"GGUF token_embd.weight has shape {list(emb.shape)}, expected [{n_embd}, {n_vocab}]",
                         header.path)
    return n_vocab


KV_BLOCK = {"f32": 1, "f16": 1, "bf16": 1, "q8_0": 32, "q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32}


def check_kv_type(header: GGUFHeader, kv_type: str) -> None:
    """llama.cpp refuses a quantized KV cache whose block does not divide the head size: say so plainly."""
    if kv_type not in KV_BLOCK:
        raise InputError(f"unknown KV cache type {kv_type!r}; choose from {', '.join(KV_BLOCK)}")
    n_head = header.arch_get("attention.head_count") or 1
    head_dim = header.arch_get("attention.key_length") or (header.arch_get("embedding_length") or 0) // n_head
    if head_dim % KV_BLOCK[kv_type]:
        raise InputError(f"KV cache type {kv_type} needs a head size that is a multiple of {KV_BLOCK[kv_type]}; "
                         f"this model's is {head_dim}", header.path)

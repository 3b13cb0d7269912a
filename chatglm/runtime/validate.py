"""Checks a GGUF's hyperparameters, tokenizer and tensor table before a native loader sees them.

llama.cpp asserts (GGML_ASSERT aborts the process) on layer and expert counts, divides by head and expert counts,
indexes fixed-size per-layer arrays and ``.at()``s its token maps: every condition it can reach from file contents is
checked here first, in one pass over the keys and one over the tensors (see docs/llama_asserts.md for the list).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import gguf
import numpy as np

from chatglm import limits
from chatglm.errors import InputError
from chatglm.gguf_file import ArrayRef, GGUFHeader
from chatglm.runtime.kv_types import KV_TYPES
from chatglm.runtime.validate_tensors import GLM5_NEXT, LLAMA_ARCHS, LlamaArch, expected_tensors

MAX_INT = 2**31 - 1
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
TOKEN_TYPE_BYTE = 6
INT32, FLOAT32 = 5, 6  # GGUF array item types


@dataclass(frozen=True)
class HParams:
    """What llama.cpp's load_hparams reads for the GLM architectures, every value checked."""

    arch: str
    n_layer_all: int  # block_count: trunk layers plus NextN/MTP layers
    n_nextn: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_k: int
    head_v: int
    n_ff: int
    n_vocab: int
    n_expert: int = 0
    n_expert_used: int = 0
    n_expert_shared: int = 0
    n_ff_exp: int = 0
    n_dense_lead: int = 0
    mla: Optional["MlaHParams"] = None  # latent attention and the DSA indexer (glm-dsa)

    @property
    def n_layer(self) -> int:
        return self.n_layer_all - self.n_nextn


def _fail(header: GGUFHeader, problem: str) -> InputError:
    return InputError(f"GGUF {problem}", header.path)


def _llama_arch(header: GGUFHeader) -> LlamaArch:
    arch = LLAMA_ARCHS.get(header.arch)
    if arch is None:
        raise _fail(header, f"architecture {header.arch!r} is not one llama.cpp runs here ({', '.join(LLAMA_ARCHS)})")
    return arch


def _int(header: GGUFHeader, key: str, *, required: bool = False, minimum: int = 1, maximum: int = MAX_INT,
         default: int = 0) -> int:
    value = header.arch_get(key)
    if value is None:
        if required:
            raise _fail(header, f"lacks {header.arch}.{key}")
        return default
    if type(value) is not int or not minimum <= value <= maximum:
        kind = f"a positive integer up to {maximum}" if minimum == 1 else f"an integer in {minimum}..{maximum}"
        raise _fail(header, f"{header.arch}.{key} must be {kind}, got {_show(value)}")
    return value


def _layer_int(header: GGUFHeader, key: str, n_layer: int, *, required: bool = False, minimum: int = 1,
               default: int = 0) -> int:
    """A value llama.cpp reads with get_key_or_arr: one integer, or an array of one per layer (all equal here)."""
    value = header.arch_get(key)
    if not isinstance(value, (list, ArrayRef)):
        return _int(header, key, required=required, minimum=minimum, default=default)
    count = value.count if isinstance(value, ArrayRef) else len(value)
    if count != n_layer:
        raise _fail(header, f"{header.arch}.{key} has {count} per-layer values for block_count {n_layer}")
    values = set(value)
    if any(type(v) is not int or not minimum <= v <= MAX_INT for v in values):
        raise _fail(header, f"{header.arch}.{key} must hold integers >= {minimum}")
    if len(values) != 1:
        raise _fail(header, f"{header.arch}.{key} differs between layers ({sorted(values)[:4]}), "
                            "which the GLM architectures do not support")
    return values.pop()


def _float(header: GGUFHeader, key: str, *, required: bool = False, minimum: float = 0.0,
           inclusive: bool = False) -> Optional[float]:
    value = header.arch_get(key)
    if value is None:
        if required:
            raise _fail(header, f"lacks {header.arch}.{key}")
        return None
    ok = isinstance(value, (int, float)) and type(value) is not bool and math.isfinite(value)
    if not ok or value < minimum or (value == minimum and not inclusive):
        bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"
        raise _fail(header, f"{header.arch}.{key} must be a finite number {bound}, got {_show(value)}")
    return float(value)


def _show(value: Any) -> str:
    text = repr(value) if not isinstance(value, ArrayRef) else f"an array of {value.count}"
    return text if len(text) <= 40 else text[:37] + "..."


def hparams(header: GGUFHeader) -> HParams:
    """Sizes and counts in the order llama.cpp's load_hparams reads them, each bounded as it asserts."""
    special = _ARCH_HPARAMS.get(header.arch)
    if special is not None:
        return special(header)
    n_layer = _int(header, "block_count", required=True, maximum=limits.MAX_LAYERS)
    n_nextn = _int(header, "nextn_predict_layers", minimum=0, maximum=n_layer - 1)
    n_embd = _int(header, "embedding_length", required=True)
    _int(header, "context_length", required=True)
    n_head = _layer_int(header, "attention.head_count", n_layer, required=True)
    n_head_kv = _layer_int(header, "attention.head_count_kv", n_layer, default=n_head)
    n_ff = _layer_int(header, "feed_forward_length", n_layer, required=True)
    if n_head % n_head_kv:
        raise _fail(header, f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
    if header.arch_get("attention.key_length") is None and n_embd % n_head:
        raise _fail(header, f"embedding_length {n_embd} is not a multiple of head_count {n_head}")
    head_k = _int(header, "attention.key_length", default=n_embd // n_head)
    head_v = _int(header, "attention.value_length", default=n_embd // n_head)
    arch = _llama_arch(header)
    if head_v != head_k and not arch.mla:
        raise _fail(header, f"value_length {head_v} differs from key_length {head_k}; GLM attention needs them equal")
    if arch.square_attention and head_k * n_head != n_embd:
        raise _fail(header, f"key_length {head_k} x head_count {n_head} is not embedding_length {n_embd}, as the "
                            "chatglm architecture's attention output needs")
    _check_rope(header, head_k)
    _float(header, "attention.layer_norm_rms_epsilon", required=True)
    n_vocab = _vocab_size(header)
    mla = _mla(header, arch, n_layer - n_nextn, n_nextn, n_head_kv, head_k, head_v) if arch.mla else None
    return HParams(header.arch, n_layer, n_nextn, n_embd, n_head, n_head_kv, head_k, head_v, n_ff, n_vocab,
                   **_experts(header, n_layer, n_ff), mla=mla)


@dataclass(frozen=True)
class MlaHParams:
    """What the latent-attention loaders read beyond the common keys (deepseek2.cpp, glm-dsa.cpp)."""

    q_lora: int  # 0: a plain attn_q (deepseek2's lite models)
    kv_lora: int
    head_k_mla: int  # per-head q/k size once decompressed: nope + rope
    head_v_mla: int
    n_rot: int
    index_heads: int = 0  # the DSA lightning indexer (glm-dsa); 0: none
    index_dim: int = 0
    index_full: tuple[bool, ...] = ()  # per trunk layer: runs its own indexer


# llama.cpp's default pattern (context_length >= 2^20, no indexer.types): 1 1, then 1 0 0 0 to layer 78, then 0
GLM_5_2_FULL_INDEXERS, GLM_5_2_LISTED = 2, 78
DEEPSEEK2 = gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.DEEPSEEK2]


def _mla(header: GGUFHeader, arch: LlamaArch, n_trunk: int, n_nextn: int, n_head_kv: int, head_k: int,
         head_v: int) -> MlaHParams:
    """Latent attention stored as MQA (deepseek2, glm-dsa): the cache row is [latent | rope] of one KV head, each
    head has at least one non-rope key dimension; then what each arch's loader or graph asserts on top (deepseek2's
    MTP graph, glm-dsa's indexer)."""
    lite = header.arch == DEEPSEEK2 and (n_trunk in (26, 27) or (n_trunk == 48 and _vocab_size(header) == 128256))
    q_minimum = 0 if header.arch == DEEPSEEK2 else 1  # deepseek2: 0 writes a plain attn_q
    q_lora = _int(header, "attention.q_lora_rank", required=not lite, minimum=q_minimum)
    kv_lora = _int(header, "attention.kv_lora_rank", required=True)
    head_k_mla = _int(header, "attention.key_length_mla", required=True)  # without it: "requires MLA" (throws)
    head_v_mla = _int(header, "attention.value_length_mla", required=True)
    n_rot = _int(header, "rope.dimension_count", default=head_k)
    if n_rot >= head_k_mla:
        raise _fail(header, f"rope.dimension_count {n_rot} leaves no non-rope key dimension of key_length_mla "
                            f"{head_k_mla}")
    if (n_head_kv, head_k, head_v) != (1, kv_lora + n_rot, kv_lora):
        raise _fail(header, f"MLA needs head_count_kv 1, key_length kv_lora_rank + rope ({kv_lora + n_rot}) and "
                            f"value_length kv_lora_rank ({kv_lora}); got {n_head_kv}, {head_k}, {head_v}")
    if header.arch == DEEPSEEK2:
        _deepseek2_mtp(header, n_nextn, q_lora)
    if not arch.indexer:
        return MlaHParams(q_lora, kv_lora, head_k_mla, head_v_mla, n_rot)
    heads = _int(header, "attention.indexer.head_count", required=True)
    dim = _int(header, "attention.indexer.key_length", required=True)
    _int(header, "attention.indexer.top_k", required=True)
    if dim < 64 or dim & (dim - 1):
        raise _fail(header, f"attention.indexer.key_length {dim} must be a power of two >= 64 (llama.cpp's "
                            "Hadamard rotation of the indexer asserts otherwise)")
    if n_rot > dim:
        raise _fail(header, f"rope.dimension_count {n_rot} is more than attention.indexer.key_length {dim}")
    return MlaHParams(q_lora, kv_lora, head_k_mla, head_v_mla, n_rot, heads, dim, _indexer_types(header, n_trunk))


def _deepseek2_mtp(header: GGUFHeader, n_nextn: int, q_lora: int) -> None:
    """deepseek2's loader creates the shared expert's tensors; its MTP graph runs one block with a q LoRA and no
    attention temperature."""
    if _int(header, "expert_shared_count", required=True, minimum=0) < 1:
        raise _fail(header, f"{header.arch} needs expert_shared_count of at least 1 (its loader creates the shared "
                            "expert's tensors)")
    temp = header.arch_get("attention.temperature_scale")
    if n_nextn and (not q_lora or temp not in (None, 0, 0.0)):
        raise _fail(header, f"{header.arch}'s MTP graph needs a q LoRA and no attention temperature; got "
                            f"q_lora_rank {q_lora}, temperature_scale {_show(temp)}")


def _indexer_types(header: GGUFHeader, n_trunk: int) -> tuple[bool, ...]:
    key = "attention.indexer.types"
    value = header.arch_get(key)
    if value is None:  # llama.cpp: all full before GLM-5.2 (context below 2^20), else its GLM-5.2 pattern
        if (header.arch_get("context_length") or 0) < 2**20:
            return (True,) * n_trunk
        return tuple(i < GLM_5_2_FULL_INDEXERS or (i < GLM_5_2_LISTED and (i - GLM_5_2_FULL_INDEXERS) % 4 == 0)
                     for i in range(n_trunk))
    if isinstance(value, ArrayRef):
        value = header.array(f"{header.arch}.{key}").tolist()
    if not isinstance(value, list) or len(value) != n_trunk or not all(type(v) in (bool, int) for v in value):
        raise _fail(header, f"{header.arch}.{key} must hold one flag per trunk layer ({n_trunk}), got {_show(value)}")
    if not value[0]:
        raise _fail(header, f"{header.arch}.{key} marks layer 0 'shared'; llama.cpp asserts the first layer runs "
                            "the indexer")
    return tuple(bool(v) for v in value)


def _check_rope(header: GGUFHeader, head_dim: int) -> None:
    rope = header.arch_get("rope.dimension_count")
    if rope is not None and (type(rope) is not int or rope <= 0 or rope > head_dim or rope % 2):
        raise _fail(header, f"rope.dimension_count {_show(rope)} does not fit a head of {head_dim}")
    scaling = header.arch_get("rope.scaling.type")
    if scaling is not None and scaling not in limits.ROPE_SCALING_TYPES:
        raise _fail(header, f"{header.arch}.rope.scaling.type {_show(scaling)} is not one of llama.cpp's "
                            f"({', '.join(limits.ROPE_SCALING_TYPES)})")
    _float(header, "rope.freq_base")
    _float(header, "rope.scaling.factor", inclusive=True)
    _int(header, "rope.scaling.original_context_length")
    sections = header.arch_get("rope.dimension_sections")
    if sections is not None and not (isinstance(sections, list) and len(sections) == 4
                                     and all(type(s) is int and 0 <= s <= head_dim for s in sections)):
        raise _fail(header, f"{header.arch}.rope.dimension_sections must be 4 integers, got {_show(sections)}")


def _experts(header: GGUFHeader, n_layer: int, n_ff: int) -> dict[str, int]:
    """llama.cpp's GGML_ASSERTs on expert counts (load_hparams), and what glm4moe's loader requires on top."""
    n_expert = _int(header, "expert_count", minimum=0, maximum=limits.MAX_EXPERTS)
    used = _layer_int(header, "expert_used_count", n_layer, minimum=0)
    groups = _int(header, "expert_group_count", minimum=0)
    group_used = _int(header, "expert_group_used_count", minimum=0)
    moe = _llama_arch(header).experts
    if moe and (n_expert == 0 or used == 0):
        raise _fail(header, f"{header.arch} needs expert_count and expert_used_count above 0, got {n_expert} and {used}")
    if n_expert == 0 and (used or groups):
        raise _fail(header, f"has no experts but expert_used_count {used}, expert_group_count {groups}")
    if n_expert and not 0 < used <= n_expert:
        raise _fail(header, f"expert_used_count {used} must be in 1..expert_count ({n_expert})")
    if n_expert and groups >= n_expert:
        raise _fail(header, f"expert_group_count {groups} must be below expert_count {n_expert}")
    if groups > 1 and (n_expert % groups or not 0 < group_used < groups):
        raise _fail(header, f"expert groups ({groups}, {group_used} used) must divide expert_count {n_expert} "
                            "and use 1..groups-1 of them")
    if not moe:
        if n_expert:
            raise _fail(header, f"has expert_count {n_expert}, but {header.arch} models have no experts")
        return {}
    # an unknown gating function is a GGML_ABORT at the first decode
    _int(header, "expert_gating_func", minimum=0, maximum=len(limits.EXPERT_GATING_FUNCS) - 1)
    shared = _int(header, "expert_shared_count", required=True, minimum=0, maximum=n_expert)
    ff_exp = _layer_int(header, "expert_feed_forward_length", n_layer, required=True)
    dense = _int(header, "leading_dense_block_count", minimum=0, maximum=n_layer)
    return {"n_expert": n_expert, "n_expert_used": used, "n_expert_shared": shared, "n_ff_exp": ff_exp,
            "n_dense_lead": dense}


def check_mtp(header: GGUFHeader, hp: HParams) -> None:
    """glm4moe's and deepseek2's MTP graphs GGML_ASSERT a single NextN block, which has an expert FFN."""
    if _llama_arch(header).mtp_expert_block and hp.n_nextn and (hp.n_nextn != 1 or hp.n_dense_lead > hp.n_layer):
        raise _fail(header, f"{header.arch}'s MTP graph runs one NextN block with an expert FFN; got "
                            f"nextn_predict_layers {hp.n_nextn}, leading_dense_block_count {hp.n_dense_lead} of "
                            f"{hp.n_layer} trunk blocks")


def check_transformer(header: GGUFHeader) -> HParams:
    """Hyperparameters, tokenizer and every tensor of a llama.cpp-run GLM GGUF (chatglm, glm4, glm4moe, deepseek2)."""
    hp = hparams(header)
    check_mtp(header, hp)
    check_vocab(header, hp.n_embd)
    check_tensors(header, hp)
    return hp


def check_tensors(header: GGUFHeader, hp: HParams) -> None:
    """Every tensor llama.cpp's loader creates is there with the shape the hyperparameters give, and nothing else
    (llama.cpp refuses a file with tensors it did not create). One pass over the expected table, one over the file."""
    expected = expected_tensors(hp, header.tensors.keys())
    missing = [name for name, (_, required) in expected.items() if required and name not in header.tensors]
    if missing:
        raise _fail(header, f"lacks tensor(s) {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else "")
                    + f" (block_count {hp.n_layer_all})")
    for name, entry in header.tensors.items():
        spec = expected.get(name)
        if spec is None:
            raise _fail(header, f"has tensor {name}, which a {hp.arch} model with these hyperparameters does "
                                "not use")
        if tuple(entry.shape) != spec[0]:
            raise _fail(header, f"tensor {name} has shape {list(entry.shape)}, expected {list(spec[0])} from the "
                                "hyperparameters")
        check_weight_type(header, name, entry.ggml_type, len(entry.shape))


def check_weight_type(header: GGUFHeader, name: str, ggml_type: int, n_dims: int) -> None:
    """Types ggml's CPU ops cannot take: a 1-D tensor (norm, bias) other than f32 aborts in its binary ops, an
    integer matrix in its matmul."""
    if n_dims == 1 and ggml_type != limits.VECTOR_TYPE:
        raise _fail(header, f"tensor {name} is {_type_name(ggml_type)}; llama.cpp adds and multiplies 1-D tensors "
                            "(norms, biases) only as f32")
    if ggml_type in limits.WEIGHT_TYPES_REFUSED:
        raise _fail(header, f"tensor {name} has type {limits.WEIGHT_TYPES_REFUSED[ggml_type]}, which ggml cannot "
                            "use as a weight")


def _type_name(ggml_type: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(ggml_type).name.lower()


def _vocab_size(header: GGUFHeader) -> int:
    tokens = header.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens[:1]):
        raise _fail(header, "has no tokenizer (tokenizer.ggml.tokens)")
    if len(tokens) > MAX_INT:
        raise _fail(header, f"has {len(tokens)} tokens, more than llama.cpp's int32 ids can address")
    return len(tokens)


def check_vocab(header: GGUFHeader, n_embd: int) -> int:
    """What llama_vocab::load throws or asserts on, and what its tokenizer later ``.at()``s."""
    n_vocab = _vocab_size(header)
    tokens = header.get("tokenizer.ggml.tokens")
    if not all(isinstance(t, str) for t in tokens):
        raise _fail(header, "tokenizer.ggml.tokens must be an array of strings")
    model = header.get("tokenizer.ggml.model")
    if model not in limits.VOCAB_MODELS:
        raise _fail(header, f"tokenizer.ggml.model {_show(model)} is not one of {', '.join(limits.VOCAB_MODELS)}")
    types = _token_types(header, n_vocab)
    _check_scores(header, n_vocab)
    texts = _check_duplicates(header, tokens)
    _check_byte_tokens(header, tokens, types)
    if model == "llama":
        _check_spm_bytes(header, texts)
    else:
        merges = header.get("tokenizer.ggml.merges")
        if not isinstance(merges, list) or not all(isinstance(m, str) for m in merges):
            raise _fail(header, "has a BPE tokenizer (gpt2) but no tokenizer.ggml.merges array of strings")
    _check_added_specials(header, model)
    _check_name_quirks(header, texts)
    if header.get("tokenizer.ggml.precompiled_charsmap") is not None:
        raise _fail(header, "has a tokenizer.ggml.precompiled_charsmap, which GLM tokenizers never use")
    for key, value in header.kv.items():
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            if type(value) is not int or not 0 <= value < n_vocab:
                raise _fail(header, f"{key} = {_show(value)} is outside the vocabulary of {n_vocab}")
    emb = header.tensors.get("token_embd.weight")
    if emb is None:
        raise _fail(header, "lacks token_embd.weight")
    if emb.shape[:2] != (n_embd, n_vocab):
        raise _fail(header, f"token_embd.weight has shape {list(emb.shape)}, expected [{n_embd}, {n_vocab}]")
    return n_vocab


def _numeric(header: GGUFHeader, key: str, item_types: tuple[int, ...]) -> Optional[np.ndarray]:
    value = header.get(key)
    if value is None:
        return None
    if isinstance(value, ArrayRef):
        ok = value.item_type in item_types
    else:
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and type(v) is not bool for v in value)
        ok = ok and (FLOAT32 in item_types or all(type(v) is int for v in value))
    if not ok:
        raise _fail(header, f"{key} must be a numeric array")
    return np.asarray(header.array(key))


def _token_types(header: GGUFHeader, n_vocab: int) -> Optional[np.ndarray]:
    types = _numeric(header, "tokenizer.ggml.token_type", (INT32,))
    if types is not None and len(types) != n_vocab:
        raise _fail(header, f"has {len(types)} token types for {n_vocab} tokens")
    return types


def _check_scores(header: GGUFHeader, n_vocab: int) -> None:
    scores = _numeric(header, "tokenizer.ggml.scores", (INT32, FLOAT32))
    if scores is not None and len(scores) < n_vocab:
        raise _fail(header, f"has {len(scores)} token scores for {n_vocab} tokens")


def _check_duplicates(header: GGUFHeader, tokens: list[str]) -> set[str]:
    """llama.cpp maps text -> id and asserts that no two ids share a text (empty texts become [EMPTY_i] first)."""
    texts = {t or limits.EMPTY_TOKEN.format(i) for i, t in enumerate(tokens)}
    if len(texts) == len(tokens):
        return texts
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        t = t or limits.EMPTY_TOKEN.format(i)
        if t in seen:
            raise _fail(header, f"vocabulary has token {t!r} twice (ids {seen[t]} and {i}); llama.cpp aborts on "
                                "duplicate token texts")
        seen[t] = i
    return texts


def _check_byte_tokens(header: GGUFHeader, tokens: list[str], types: Optional[np.ndarray]) -> None:
    """Decoding a token typed BYTE parses its text as <0xXX> (a shorter text throws std::out_of_range)."""
    if types is None:
        return
    for i in np.flatnonzero(types == TOKEN_TYPE_BYTE):
        if not BYTE_TOKEN.fullmatch(tokens[i]):
            raise _fail(header, f"token {int(i)} {tokens[i]!r} is typed BYTE but is not of the form <0xXX>")


def _check_spm_bytes(header: GGUFHeader, texts: set[str]) -> None:
    """SentencePiece tokenization falls back to byte pieces for unknown text: llama.cpp looks up <0xXX> (or the
    one-character text) with .at(), which throws std::out_of_range, uncaught, for a byte the vocabulary lacks."""
    missing = [b for b in range(256) if f"<0x{b:02X}>" not in texts and not (0 < b < 128 and chr(b) in texts)]
    if missing:
        pieces = ", ".join(f"<0x{b:02X}>" for b in missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise _fail(header, f"SentencePiece vocabulary lacks byte piece(s) {pieces} ({len(missing)} of 256 missing)")


def _check_added_specials(header: GGUFHeader, model: str) -> None:
    """Tokenizing with specials GGML_ASSERTs that the bos/eos/sep it must add exists."""
    defaults = {"llama": {"bos", "eos"}, "gpt2": {"eos"}}[model]  # llama-vocab.cpp's default ids per model
    for name in ("bos", "eos", "sep"):
        if header.get(f"tokenizer.ggml.add_{name}_token") is True and name not in defaults \
                and header.get(f"tokenizer.ggml.{name}_token_id") is None:
            raise _fail(header, f"sets tokenizer.ggml.add_{name}_token but names no tokenizer.ggml.{name}_token_id")


def _check_name_quirks(header: GGUFHeader, texts: set[str]) -> None:
    """For some general.name values llama.cpp looks up fixed token texts with .at() (throws when absent)."""
    name = header.get("general.name")
    name = name.lower() if isinstance(name, str) else ""
    for keys, needed in limits.NAME_QUIRKS.items():
        missing = [t for t in needed if t not in texts]
        if any(k in name for k in keys) and missing:
            raise _fail(header, f"general.name {name!r} makes llama.cpp look up token(s) {', '.join(missing)}, "
                                "which this vocabulary lacks; rename the model")


def check_kv_type(kv_type: Any) -> str:
    """The KV cache type, or a one-line error naming the choices."""
    if not isinstance(kv_type, str) or kv_type not in KV_TYPES:
        raise InputError(f"unknown KV cache type {_show(kv_type)}; choose from {', '.join(KV_TYPES)}")
    return kv_type


def check_kv_head(header: GGUFHeader, kv_type: str) -> None:
    """llama.cpp refuses a quantized KV cache whose block does not divide the head size: say so plainly."""
    block = KV_TYPES[check_kv_type(kv_type)].block
    n_head = header.arch_get("attention.head_count") or 1
    n_head = n_head if type(n_head) is int else 1
    head_dim = header.arch_get("attention.key_length") or (header.arch_get("embedding_length") or 0) // n_head
    if head_dim % block:
        raise InputError(f"KV cache type {kv_type} needs a head size that is a multiple of {block}; "
                         f"this model's is {head_dim}", header.path)
    for what, size in _ARCH_KV_ROWS.get(header.arch, lambda h: ())(header):
        if size % block:  # ggml_row_size asserts on a row its blocks do not divide
            raise InputError(f"KV cache type {kv_type} needs {what} that is a multiple of {block}; this model's "
                             f"is {size}", header.path)


def resolve_flash_attn(kv_type: str, flash_attn: Optional[bool]) -> tuple[Optional[bool], str]:
    """The flash-attention setting to give llama.cpp for this KV type, and a note saying which applies.

    llama.cpp's flash attention keeps K and V in f16 whatever was asked, so an f32 cache turns it off (or is refused
    with it explicitly on); a quantized V cache needs it on (llama.cpp refuses one with it off)."""
    check_kv_type(kv_type)
    if kv_type == "f32":
        if flash_attn:
            raise InputError("an f32 KV cache needs flash attention off (llama.cpp's flash attention stores K and V "
                             "in f16); drop --flash-attn or choose another --kv-type")
        return False, "f32 KV cache: flash attention off (llama.cpp's flash attention would keep K/V in f16)"
    if KV_TYPES[kv_type].quantized:
        if flash_attn is False:
            raise InputError(f"a quantized KV cache ({kv_type}) needs flash attention; drop --no-flash-attn or "
                             "choose f16/f32")
        return True, f"{kv_type} KV cache: flash attention on (llama.cpp needs it for a quantized V cache)"
    setting = {None: "llama.cpp decides", True: "on", False: "off"}[flash_attn]
    return flash_attn, f"{kv_type} KV cache: flash attention {setting}"


def check_context(n_ctx: Any, n_batch: Any = 1, n_threads: Any = 1) -> None:
    """Sizes llama.cpp takes as uint32 (a larger value would wrap) and that must be positive."""
    if any(type(v) is not int for v in (n_ctx, n_batch, n_threads)):
        raise InputError(f"context ({_show(n_ctx)}), batch ({_show(n_batch)}) and thread ({_show(n_threads)}) "
                         "counts must be integers")
    if n_ctx < 1 or n_batch < 1 or n_threads < 1:
        raise InputError(f"context ({n_ctx}), batch ({n_batch}) and thread ({n_threads}) counts must be positive")
    top_ctx = limits.LLAMA_MAX_CONTEXT
    for what, value, top in (("context size", n_ctx, top_ctx), ("batch size", n_batch, top_ctx),
                             ("thread count", n_threads, limits.MAX_THREADS)):
        if value > top:
            raise InputError(f"{what} {value} is past llama.cpp's limit of {top}")


# -- glm5-next (GLM-5.3-Flash): src/models/glm5-next.cpp's load_arch_hparams and its graph's asserts -------------


@dataclass(frozen=True)
class Glm5NextHParams(HParams):
    """What glm5-next's loader reads beyond the GLM hyperparameters: per-layer kinds, KDA, latent attention sizes,
    the k-pool indexer and the hyper-connections."""

    recurrent: tuple[bool, ...] = ()  # head_count_kv 0: a linear-attention (KDA) layer
    kda_dim: int = 0
    d_conv: int = 0
    kpool: int = 0
    hc_mult: int = 4


def _glm5next_kinds(header: GGUFHeader, n_layer: int, n_trunk: int) -> tuple[bool, ...]:
    """head_count_kv per layer: 0 (linear attention) or 1 (the latent, one key head); the NextN block is latent."""
    value = header.arch_get("attention.head_count_kv")
    values = list(value) if isinstance(value, (list, ArrayRef)) else None
    if values is None or len(values) != n_layer or any(v not in (0, 1) or type(v) is not int for v in values):
        raise _fail(header, f"{header.arch}.attention.head_count_kv must list 0 (linear attention) or 1 (latent "
                            f"attention) for each of the {n_layer} blocks, got {_show(value)}")
    if any(v == 0 for v in values[n_trunk:]):
        raise _fail(header, "a NextN block is marked linear attention (head_count_kv 0); llama.cpp's NextN block is "
                            "a latent-attention layer")
    return tuple(v == 0 for v in values)


def _glm5next_indexer(header: GGUFHeader, n_trunk: int, recurrent: tuple[bool, ...]) -> tuple[bool, ...]:
    value = header.arch_get("attention.indexer.types")
    full = [True] * n_trunk if value is None else list(value) if isinstance(value, (list, ArrayRef)) else None
    if full is None or len(full) != n_trunk or any(type(v) is not bool for v in full):
        raise _fail(header, f"{header.arch}.attention.indexer.types must hold {n_trunk} booleans, got {_show(value)}")
    latent = [il for il in range(n_trunk) if not recurrent[il]]
    if latent and not full[latent[0]]:  # GGML_ASSERT(*prev_sel != nullptr) in build_dsa_layer
        raise _fail(header, f"the first latent-attention block ({latent[0]}) shares its indexer selection, but no "
                            "earlier block has a full indexer")
    return tuple(full)


def _glm5next_hparams(header: GGUFHeader) -> Glm5NextHParams:
    n_layer = _int(header, "block_count", required=True, maximum=limits.MAX_LAYERS)
    n_nextn = _int(header, "nextn_predict_layers", minimum=0, maximum=n_layer - 1)
    n_embd = _int(header, "embedding_length", required=True)
    _int(header, "context_length", required=True)
    n_head = _layer_int(header, "attention.head_count", n_layer, required=True)
    n_ff = _layer_int(header, "feed_forward_length", n_layer, required=True)
    recurrent = _glm5next_kinds(header, n_layer, n_layer - n_nextn)
    kv_lora = _int(header, "attention.kv_lora_rank", required=True)
    head_k = _int(header, "attention.key_length", required=True)
    if head_k != kv_lora:
        raise _fail(header, f"key_length {head_k} must be kv_lora_rank {kv_lora} (the latent cache holds the "
                            "compressed key)")
    if header.arch_get("rope.dimension_count") != 0:  # GGML_ASSERT(n_rot() == 0): nope-only latent attention
        raise _fail(header, f"{header.arch}.rope.dimension_count must be 0 (nope-only latent attention), got "
                            f"{_show(header.arch_get('rope.dimension_count'))}")
    _float(header, "attention.layer_norm_rms_epsilon", required=True)
    _float(header, "attention.layer_norm_epsilon")
    kpool = _int(header, "attention.indexer.kpool", required=True)
    top_k = _int(header, "attention.indexer.top_k", required=True)
    if kpool < 2 or top_k % kpool:  # GGML_ASSERT(kpool > 1 && top_k % kpool == 0)
        raise _fail(header, f"indexer top_k {top_k} must be a multiple of a k-pool of 2 or more, got kpool {kpool}")
    if header.arch_get("attention.indexer.kpool_select_tail") is False:
        raise _fail(header, "has attention.indexer.kpool_select_tail false: the first tokens of a sequence select no "
                            "key, and llama.cpp's attention gives NaN there")
    hc = _int(header, "hyper_connection.count", required=True)
    if hc != 4:  # GGML_ASSERT(hc_mult == 4)
        raise _fail(header, f"hyper_connection.count is {hc}; llama.cpp's glm5-next runs 4 streams")
    _int(header, "hyper_connection.sinkhorn_iterations", required=True)
    _float(header, "hyper_connection.epsilon", required=True)
    d_conv = _int(header, "ssm.conv_kernel", required=True)
    if d_conv < 2:
        raise _fail(header, f"ssm.conv_kernel {d_conv} leaves the short convolution no state (needs 2 or more)")
    for key in ("swiglu_clamp_exp", "swiglu_clamp_shexp"):
        _clamps(header, key, n_layer)
    _float(header, "kda.gate_lower_bound", minimum=-math.inf)
    return Glm5NextHParams(
        header.arch, n_layer, n_nextn, n_embd, n_head, 1, head_k, head_k, n_ff, _vocab_size(header),
        **_experts(header, n_layer, n_ff), recurrent=recurrent,
        kda_dim=_int(header, "kda.head_dim", required=True), d_conv=d_conv,
        mla=MlaHParams(_int(header, "attention.q_lora_rank", required=True), kv_lora,
                       _int(header, "attention.key_length_mla", required=True),
                       _int(header, "attention.value_length_mla", required=True), 0,
                       _int(header, "attention.indexer.head_count", required=True),
                       _int(header, "attention.indexer.key_length", required=True),
                       _glm5next_indexer(header, n_layer - n_nextn, recurrent)),
        kpool=kpool, hc_mult=hc)


def _clamps(header: GGUFHeader, key: str, n_layer: int) -> None:
    """A SwiGLU clamp: one number or one per block (get_key_or_arr throws on another length)."""
    value = header.arch_get(key)
    if value is None:
        return
    values = list(value) if isinstance(value, (list, ArrayRef)) else [value]
    if isinstance(value, (list, ArrayRef)) and len(values) != n_layer:
        raise _fail(header, f"{header.arch}.{key} has {len(values)} values for block_count {n_layer}")
    if not all(isinstance(v, (int, float)) and type(v) is not bool and math.isfinite(v) for v in values):
        raise _fail(header, f"{header.arch}.{key} must hold finite numbers")


def _glm5next_kv_rows(header: GGUFHeader) -> list[tuple[str, int]]:
    """The indexer cache of glm5-next stores key | gate | pooled (3 x key length) per token in the KV type."""
    key = header.arch_get("attention.indexer.key_length")
    return [("an indexer row (3 x indexer key length)", 3 * key)] if type(key) is int else []


_ARCH_HPARAMS = {GLM5_NEXT: _glm5next_hparams}
_ARCH_KV_ROWS = {GLM5_NEXT: _glm5next_kv_rows}

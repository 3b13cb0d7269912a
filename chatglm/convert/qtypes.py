"""Output types: user-facing names, llama.cpp's mixed recipes, and the per-tensor type each recipe picks.

Names are llama-quantize's (``q4_k_m``, ``q8_0``, ``iq4_xs``, ``f16``, ...; ``q3_k``/``q4_k``/``q5_k`` are its aliases
of the ``_m`` recipes). A recipe is a ``llama_ftype``: one default type plus rules that keep some tensors at higher
precision. :func:`plan_types` reproduces ``llama_tensor_get_type`` of llama.cpp's ``src/llama-quant.cpp`` (the version
llama-cpp-python 0.3.36 vendors) for the tensor names of our architectures, so a converted file gets the same type
for every tensor as ``llama-quantize`` run on the f32 GGUF. Rules llama.cpp keeps for other families (Falcon,
LLaMA-70B, ...) are left out; ``MODEL_ARCHS`` lists the architectures this module answers for.

Shapes are numpy order here: the last axis is the row (ggml's ne[0]), a leading axis of 3-D tensors is the expert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable, Iterable, Optional, Sequence, Union

from gguf import GGML_QUANT_SIZES, LlamaFileType
from gguf import GGMLQuantizationType as QT

from chatglm import families
from chatglm.errors import InputError
from chatglm.schema.llama_names import ARCH_GLM5_NEXT

F = LlamaFileType

MODEL_ARCHS = frozenset(families.archs())  # every architecture a family writes


@dataclass(frozen=True)
class Recipe:
    """A ``-t`` choice: the llama ftype written as ``general.file_type`` and the type most tensors get."""

    name: str
    ftype: LlamaFileType
    default: QT
    pure: bool = False  # every quantizable tensor gets ``default`` (llama-quantize --pure); shape fallbacks still apply

    @property
    def quantized(self) -> bool:
        return self.default not in _FLOAT_TYPES


_FLOAT_TYPES = frozenset({QT.F32, QT.F16, QT.BF16})

# llama_ftype_get_default_type, for the ftypes offered here.
_DEFAULT_TYPE: dict[F, QT] = {
    F.ALL_F32: QT.F32, F.MOSTLY_F16: QT.F16, F.MOSTLY_BF16: QT.BF16,
    F.MOSTLY_Q4_0: QT.Q4_0, F.MOSTLY_Q4_1: QT.Q4_1, F.MOSTLY_Q5_0: QT.Q5_0, F.MOSTLY_Q5_1: QT.Q5_1,
    F.MOSTLY_Q8_0: QT.Q8_0, F.MOSTLY_MXFP4_MOE: QT.MXFP4,
    F.MOSTLY_Q2_K: QT.Q2_K, F.MOSTLY_Q2_K_S: QT.Q2_K,
    F.MOSTLY_Q3_K_S: QT.Q3_K, F.MOSTLY_Q3_K_M: QT.Q3_K, F.MOSTLY_Q3_K_L: QT.Q3_K,
    F.MOSTLY_Q4_K_S: QT.Q4_K, F.MOSTLY_Q4_K_M: QT.Q4_K,
    F.MOSTLY_Q5_K_S: QT.Q5_K, F.MOSTLY_Q5_K_M: QT.Q5_K, F.MOSTLY_Q6_K: QT.Q6_K,
    F.MOSTLY_IQ1_S: QT.IQ1_S, F.MOSTLY_IQ1_M: QT.IQ1_M,
    F.MOSTLY_IQ2_XXS: QT.IQ2_XXS, F.MOSTLY_IQ2_XS: QT.IQ2_XS, F.MOSTLY_IQ2_S: QT.IQ2_XS, F.MOSTLY_IQ2_M: QT.IQ2_S,
    F.MOSTLY_IQ3_XXS: QT.IQ3_XXS, F.MOSTLY_IQ3_XS: QT.IQ3_S, F.MOSTLY_IQ3_S: QT.IQ3_S, F.MOSTLY_IQ3_M: QT.IQ3_S,
    F.MOSTLY_IQ4_NL: QT.IQ4_NL, F.MOSTLY_IQ4_XS: QT.IQ4_XS,
}

# llama-quantize's aliases.
_ALIASES = {"q3_k": F.MOSTLY_Q3_K_M, "q4_k": F.MOSTLY_Q4_K_M, "q5_k": F.MOSTLY_Q5_K_M}


def _ftype_name(ftype: F) -> str:
    return ftype.name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()


RECIPES: dict[str, Recipe] = {
    **{_ftype_name(f): Recipe(_ftype_name(f), f, t) for f, t in _DEFAULT_TYPE.items()},
    **{alias: Recipe(alias, f, _DEFAULT_TYPE[f]) for alias, f in _ALIASES.items()},
}


def get_recipe(name: str, pure: bool = False) -> Recipe:
    """The recipe called ``name`` (case-insensitive); InputError listing the valid names otherwise."""
    recipe = RECIPES.get(name.strip().lower())
    if recipe is None:
        raise InputError(f"unknown output type {name!r}; valid types: {', '.join(RECIPES)}")
    return replace(recipe, pure=pure)


def recipe_for_ftype(ftype: int) -> Optional[Recipe]:
    """The recipe a GGUF's ``general.file_type`` names, or None for ftypes not offered here."""
    return next((r for r in RECIPES.values() if r.ftype == ftype and r.name not in _ALIASES), None)


def is_lossy_requantize(source: QT, target: QT) -> bool:
    """True when a tensor already block-quantized would be quantized again to another type (llama-quantize refuses
    that without --allow-requantize: the result is worse than quantizing the original weights)."""
    return source not in _FLOAT_TYPES and source != target


@dataclass(frozen=True)
class ModelInfo:
    """The hyperparameters llama.cpp's recipes look at."""

    arch: str
    n_layer: int  # block_count, MTP/nextn blocks included
    n_head: int
    n_head_kv: int
    n_expert: int = 0

    def __post_init__(self) -> None:
        if self.arch not in MODEL_ARCHS:
            raise ValueError(f"no quantization recipe for architecture {self.arch!r}")

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


class Category(Enum):
    """llama.cpp's tensor_category: broad roles found by name."""

    TOKEN_EMBD = "token_embd"
    ATTENTION_Q = "attn_q"
    ATTENTION_K = "attn_k"
    ATTENTION_V = "attn_v"
    ATTENTION_QKV = "attn_qkv"
    ATTENTION_KV_B = "attn_kv_b"
    ATTENTION_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OUTPUT = "output"
    OTHER = "other"


C = Category

# First match wins (tensor_get_category): exact names, then substrings in this order.
_EXACT_CATEGORY = {
    "output.weight": C.OUTPUT, "token_embd.weight": C.TOKEN_EMBD, "per_layer_token_embd.weight": C.TOKEN_EMBD,
}
_SUBSTRING_CATEGORY = [
    ("attn_qkv.weight", C.ATTENTION_QKV), ("attn_kv_b.weight", C.ATTENTION_KV_B), ("attn_v.weight", C.ATTENTION_V),
    ("attn_k.weight", C.ATTENTION_K), ("attn_q.weight", C.ATTENTION_Q), ("attn_output.weight", C.ATTENTION_OUTPUT),
    ("ffn_up", C.FFN_UP), ("ffn_gate", C.FFN_GATE), ("ffn_down", C.FFN_DOWN),
]
_ATTN_V_LIKE = frozenset({C.ATTENTION_V, C.ATTENTION_QKV, C.ATTENTION_KV_B})

# Weights llama.cpp never quantizes (substrings of the name), beyond 1-D tensors and names not ending in "weight".
_KEEP_SUBSTRINGS = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
                    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "attn_rel_b.weight",
                    "position_embd", "token_types.weight")


# Per-architecture rules of tensor_allows_quantization and llama_tensor_get_type_impl, keyed by llama.cpp's
# architecture name: substrings of tensors kept as they are, and of tensors never quantized below Q8_0.
_ARCH_KEEP: dict[str, tuple[str, ...]] = {
    ARCH_GLM5_NEXT: ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                  "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
                  "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight"),
}
_ARCH_Q8_FLOOR: dict[str, tuple[str, ...]] = {ARCH_GLM5_NEXT: ("attn_q_a", "attn_q_b", "nextn.eh_proj")}


def _arch_keeps(arch: str, name: str) -> bool:
    return any(sub in name for sub in _ARCH_KEEP.get(arch, ()))


def category(name: str) -> Category:
    if name in _EXACT_CATEGORY:
        return _EXACT_CATEGORY[name]
    return next((cat for sub, cat in _SUBSTRING_CATEGORY if sub in name), C.OTHER)


def _n_dims(shape: Sequence[int]) -> int:
    """ggml_n_dims: axes up to the last one longer than 1 (numpy order: leading 1s do not count)."""
    dims = list(shape)
    while len(dims) > 1 and dims[0] == 1:
        dims.pop(0)
    return max(1, len(dims))


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    """tensor_allows_quantization: 2-D/3-D weights except norms, routers and a few small tables."""
    return (_n_dims(shape) >= 2 and name.endswith("weight")
            and not any(sub in name for sub in _KEEP_SUBSTRINGS))


def _block(qtype: QT) -> int:
    return GGML_QUANT_SIZES[qtype][0]


# tensor_type_fallback: the type a row length not divisible by the block size gets instead.
_FALLBACK: dict[QT, QT] = {
    **dict.fromkeys([QT.IQ1_S, QT.IQ1_M, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ3_XXS, QT.IQ3_S, QT.IQ4_XS], QT.IQ4_NL),
    **dict.fromkeys([QT.Q2_K, QT.Q3_K, QT.TQ1_0, QT.TQ2_0], QT.Q4_0),
    QT.Q4_K: QT.Q5_0, QT.Q5_K: QT.Q5_1, QT.Q6_K: QT.Q8_0,
}


def fallback_type(qtype: QT, n_cols: int) -> QT:
    """``qtype`` if rows of ``n_cols`` fit its blocks, else llama.cpp's substitute (f16 when nothing fits)."""
    if n_cols % _block(qtype) == 0:
        return qtype
    substitute = _FALLBACK.get(qtype, qtype)
    return substitute if n_cols % _block(substitute) == 0 else QT.F16


@dataclass(frozen=True)
class Slot:
    """Where llama.cpp's running counters stand when it reaches a tensor (see :func:`plan_types`)."""

    index_in_category: int  # quantized tensors of the same category before this one (llama.cpp's i_attention_wv, ...)
    n_attention_wv: int  # attn_v-like tensors in the model
    tied_embeddings: bool  # no output.weight: token_embd doubles as the output projection
    has_imatrix: bool


@dataclass(frozen=True)
class _Ctx:
    ftype: F
    default: QT
    model: ModelInfo
    slot: Slot
    name: str
    shape: tuple[int, ...]

    @property
    def i(self) -> int:
        return self.slot.index_in_category

    def layer(self) -> tuple[int, int]:
        """(i_layer, n_layer) of FFN tensors: from the name for MoE models, else from the running counter."""
        if max(1, self.model.n_expert) > 1:
            found = re.match(r"blk\.(-?\d+)\.", self.name)
            if not found or not 0 <= int(found.group(1)) < self.model.n_layer:
                raise ValueError(f"{self.name}: no block number in [0, {self.model.n_layer})")
            return int(found.group(1)), self.model.n_layer
        return self.i, self.model.n_layer


def _more_bits(i_layer: int, n_layer: int) -> bool:
    """use_more_bits: the first and last eighth of the layers and every third one between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


# A rule: (recipes it applies to, extra condition or None, type or function giving it). In each table the first rule
# that applies wins, mirroring the else-if chains of llama_tensor_get_type_impl.
Choice = Union[QT, Callable[[_Ctx], QT]]
Rule = tuple[frozenset, Optional[Callable[[_Ctx], bool]], Choice]


def _fs(*ftypes: F) -> frozenset:
    return frozenset(ftypes)


_IQ2_FAMILY = _fs(F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M, F.MOSTLY_IQ1_M)
_IQ2_S_M = _fs(F.MOSTLY_IQ2_S, F.MOSTLY_IQ2_M)
_ANY = frozenset(F)


def _iq3s_or_q2k(c: _Ctx) -> QT:
    return QT.IQ3_S if c.ftype in _IQ2_S_M else QT.Q2_K


def _gqa4(c: _Ctx) -> bool:
    return c.model.n_gqa >= 4


def _first_eighth(c: _Ctx) -> bool:
    i_layer, n_layer = c.layer()
    return i_layer < n_layer // 8


def _layer_more_bits(c: _Ctx) -> bool:
    return _more_bits(*c.layer())


# Output projection, and token_embd when it doubles as one (the output branch; nx % block size is checked first).
_OUTPUT: list[Rule] = [
    (_fs(F.MOSTLY_MXFP4_MOE), None, QT.Q8_0),
    (_ANY, lambda c: c.shape[-1] % _block(c.default) != 0, QT.Q8_0),
    (_IQ2_FAMILY | _fs(F.MOSTLY_IQ3_XXS), None, QT.Q5_K),
    (_ANY, lambda c: c.default != QT.Q8_0, QT.Q6_K),
]

_TOKEN_EMBD: list[Rule] = [
    (_fs(F.MOSTLY_IQ2_XXS, F.MOSTLY_IQ2_XS, F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M), None, QT.Q2_K),
    (_IQ2_S_M | _fs(F.MOSTLY_IQ3_XXS), None, QT.IQ3_S),
]

# The 1-2 bit recipes have their own short table for every other tensor.
_IQ2_RULES: dict[Category, list[Rule]] = {
    C.ATTENTION_V: [(_ANY, lambda c: _gqa4(c) or c.model.n_expert >= 4, QT.Q4_K), (_ANY, None, _iq3s_or_q2k)],
    C.ATTENTION_K: [(_ANY, lambda c: c.model.n_expert == 8, QT.Q4_K)],
    C.FFN_DOWN: [(_ANY, lambda c: c.i < c.model.n_layer // 8, _iq3s_or_q2k)],
    C.ATTENTION_OUTPUT: [
        (_ANY, lambda c: c.model.n_expert == 8, QT.Q5_K),
        (_fs(F.MOSTLY_IQ1_S, F.MOSTLY_IQ1_M), None, QT.IQ2_XXS),
        (_IQ2_S_M, None, QT.IQ3_S),
    ],
}

_ATTN_V: list[Rule] = [
    (_fs(F.MOSTLY_Q2_K), None, lambda c: QT.Q4_K if _gqa4(c) else QT.Q3_K),
    (_fs(F.MOSTLY_Q2_K_S), _gqa4, QT.Q4_K),
    (_fs(F.MOSTLY_IQ3_XXS), None,
     lambda c: QT.Q4_K if _gqa4(c) else QT.IQ3_XXS if c.slot.has_imatrix else QT.IQ3_S),
    (_fs(F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_S), _gqa4, QT.Q4_K),
    (_fs(F.MOSTLY_IQ3_M), None, QT.Q4_K),
    (_fs(F.MOSTLY_Q3_K_M), None, lambda c: QT.Q5_K if c.i < 2 else QT.Q4_K),
    (_fs(F.MOSTLY_Q3_K_L), None, QT.Q5_K),
    (_fs(F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS), _gqa4, QT.Q5_K),
    (_fs(F.MOSTLY_Q4_K_M, F.MOSTLY_Q5_K_M), lambda c: _more_bits(c.i, c.slot.n_attention_wv), QT.Q6_K),
    (_fs(F.MOSTLY_Q4_K_S), lambda c: c.i < 4, QT.Q5_K),
]

_IQ3_XS_INNER = (_fs(F.MOSTLY_IQ3_XS), lambda c: not _first_eighth(c) and c.layer()[0] < 7 * c.layer()[1] // 8,
                 QT.IQ3_XXS)

_RULES: dict[Category, list[Rule]] = {
    C.ATTENTION_K: [
        (_ANY, lambda c: c.model.n_expert == 8, QT.Q8_0),
        (_fs(F.MOSTLY_IQ3_XS), None, QT.IQ3_XXS),
        (_fs(F.MOSTLY_IQ3_XXS), None, QT.IQ2_S),
    ],
    C.ATTENTION_Q: [(_fs(F.MOSTLY_IQ3_XS), None, QT.IQ3_XXS), (_fs(F.MOSTLY_IQ3_XXS), None, QT.IQ2_S)],
    C.FFN_DOWN: [
        (_fs(F.MOSTLY_Q2_K), None, QT.Q3_K),
        (_fs(F.MOSTLY_Q2_K_S), None, lambda c: QT.Q4_K if _first_eighth(c) else c.default),
        (_fs(F.MOSTLY_IQ3_XXS), lambda c: not c.slot.has_imatrix,
         lambda c: QT.Q4_K if _first_eighth(c) else QT.Q3_K),
        (_fs(F.MOSTLY_Q3_K_M), None, lambda c: QT.Q5_K if c.layer()[0] < c.layer()[1] // 16 else QT.Q4_K),
        (_fs(F.MOSTLY_IQ3_M), lambda c: _first_eighth(c) or (c.model.n_expert == 8 and _layer_more_bits(c)),
         QT.Q4_K),
        (_fs(F.MOSTLY_Q3_K_L), None, QT.Q5_K),
        (_fs(F.MOSTLY_Q4_K_M), _layer_more_bits, QT.Q6_K),
        (_fs(F.MOSTLY_IQ4_NL, F.MOSTLY_IQ4_XS), lambda c: _first_eighth(c) and not c.slot.has_imatrix, QT.Q5_K),
        (_fs(F.MOSTLY_Q5_K_M), _layer_more_bits, QT.Q6_K),
        (_fs(F.MOSTLY_Q4_K_S), _first_eighth, QT.Q5_K),
        (_fs(F.MOSTLY_Q4_0), lambda c: c.slot.has_imatrix and _first_eighth(c), QT.Q4_1),
        (_fs(F.MOSTLY_Q5_0), lambda c: c.slot.has_imatrix and _first_eighth(c), QT.Q5_1),
    ],
    C.ATTENTION_OUTPUT: [
        (_fs(F.MOSTLY_Q2_K, F.MOSTLY_IQ3_XS, F.MOSTLY_IQ3_XXS, F.MOSTLY_Q3_K_S, F.MOSTLY_Q3_K_M, F.MOSTLY_IQ4_NL,
             F.MOSTLY_Q4_K_S, F.MOSTLY_Q4_K_M, F.MOSTLY_IQ3_S, F.MOSTLY_IQ3_M, F.MOSTLY_IQ4_XS),
         lambda c: c.model.n_expert == 8, QT.Q5_K),
        (_ANY, lambda c: c.model.n_expert == 8, lambda c: c.default),
        (_fs(F.MOSTLY_Q2_K), None, QT.Q3_K),
        (_fs(F.MOSTLY_IQ3_XXS), None, QT.IQ3_S),
        (_fs(F.MOSTLY_Q3_K_M), None, QT.Q4_K),
        (_fs(F.MOSTLY_Q3_K_L), None, QT.Q5_K),
        (_fs(F.MOSTLY_IQ3_M), None, QT.Q4_K),
    ],
    # llama.cpp has a separate attn_qkv rule, but attn_qkv counts as attn_v-like first, so it never runs.
    C.FFN_GATE: [_IQ3_XS_INNER],
    C.FFN_UP: [_IQ3_XS_INNER],
}


def _apply(rules: Iterable[Rule], c: _Ctx) -> QT:
    for ftypes, cond, choice in rules:
        if c.ftype in ftypes and (cond is None or cond(c)):
            return choice(c) if callable(choice) else choice
    return c.default


def _mixed_type(c: _Ctx, cat: Category) -> QT:
    """llama_tensor_get_type_impl: the recipe's choice before the shape fallback."""
    if any(sub in c.name for sub in _ARCH_Q8_FLOOR.get(c.model.arch, ())):
        return QT.Q8_0
    if cat == C.OUTPUT or (cat == C.TOKEN_EMBD and c.slot.tied_embeddings):
        return _apply(_OUTPUT, c)
    if c.ftype == F.MOSTLY_MXFP4_MOE:
        return QT.MXFP4 if len(c.shape) >= 3 and c.shape[-3] > 1 else QT.Q8_0
    if cat == C.TOKEN_EMBD:
        return _apply(_TOKEN_EMBD, c)
    if cat in _ATTN_V_LIKE:  # attn_qkv and attn_kv_b follow the attn_v rules
        cat = C.ATTENTION_V
    if c.ftype in _IQ2_FAMILY:
        return _apply(_IQ2_RULES.get(cat, []), c)
    if cat == C.ATTENTION_V:
        return QT.Q8_0 if c.model.n_expert == 8 else _apply(_ATTN_V, c)
    return _apply(_RULES.get(cat, []), c)


def choose_type(recipe: Recipe, name: str, shape: Sequence[int], model: ModelInfo, slot: Slot,
                source: QT = QT.F32) -> QT:
    """The type llama.cpp's quantizer gives tensor ``name`` of numpy ``shape`` (stored now as ``source``).

    ``slot`` carries llama.cpp's running counters; :func:`plan_types` computes them for a whole model.
    """
    if not allows_quantization(name, shape) or _arch_keeps(model.arch, name):
        return source
    if not recipe.quantized:
        return recipe.default
    ctx = _Ctx(recipe.ftype, recipe.default, model, slot, name, tuple(shape))
    chosen = recipe.default if recipe.pure else _mixed_type(ctx, category(name))
    return fallback_type(chosen, shape[-1])


def llama_order(names: Iterable[str]) -> list[str]:
    """The order llama.cpp's loader walks tensors in: non-block tensors, then block by block, by name within each."""
    def key(name: str) -> tuple[int, str]:
        found = re.match(r"blk\.(-?\d+)", name)
        return (int(found.group(1)) if found else -1, name)

    return sorted(names, key=key)


def _counted_category(name: str, shape: Sequence[int], recipe: Recipe, arch: str = "") -> Optional[Category]:
    """The counter a tensor advances when llama.cpp's recipe code reaches it, if any."""
    cat = category(name)
    if (recipe.pure or not recipe.quantized or recipe.ftype == F.MOSTLY_MXFP4_MOE
            or not allows_quantization(name, shape) or _arch_keeps(arch, name) or cat in (C.OUTPUT, C.TOKEN_EMBD)):
        return None
    if cat in _ATTN_V_LIKE:
        return C.ATTENTION_V
    if cat == C.FFN_DOWN or (cat in (C.FFN_GATE, C.FFN_UP) and recipe.ftype not in _IQ2_FAMILY):
        return cat
    return None


def plan_types(recipe: Recipe, tensors: Sequence[tuple[str, Sequence[int]]], model: ModelInfo,
               has_imatrix: bool = False, sources: Optional[dict[str, QT]] = None) -> dict[str, QT]:
    """The type of every tensor of a model, as ``llama-quantize`` would choose it.

    ``tensors``: (GGUF name, numpy shape) of every tensor the file will hold, in any order. ``sources``: current
    types of tensors that are not f32 (what stays unquantized keeps its type). ``has_imatrix``: an importance matrix
    was given (some recipes choose differently then).
    """
    shapes = dict(tensors)
    if len(shapes) != len(tensors):
        raise ValueError("tensor names repeat")
    sources = sources or {}
    tied = "output.weight" not in shapes
    n_attention_wv = sum(category(name) in _ATTN_V_LIKE for name in shapes)
    counters: dict[Category, int] = {}
    plan: dict[str, QT] = {}
    for name in llama_order(shapes):
        counted = _counted_category(name, shapes[name], recipe, model.arch)
        slot = Slot(counters.get(counted, 0) if counted else 0, n_attention_wv, tied, has_imatrix)
        plan[name] = choose_type(recipe, name, shapes[name], model, slot, sources.get(name, QT.F32))
        if counted:
            counters[counted] = counters.get(counted, 0) + 1
    return plan


def tensor_requires_imatrix(recipe: Recipe, name: str, qtype: QT) -> bool:
    """tensor_requires_imatrix: llama.cpp refuses these tensor types without an importance matrix."""
    if name in ("token_embd.weight", "per_layer_token_embd.weight", "output.weight"):
        return False
    if qtype in (QT.IQ3_XXS, QT.IQ2_XXS, QT.IQ2_XS, QT.IQ2_S, QT.IQ1_M, QT.IQ1_S):
        return True
    return qtype == QT.Q2_K and recipe.ftype == F.MOSTLY_Q2_K_S



def tensors_needing_imatrix(recipe: Recipe, plan: dict[str, QT]) -> list[str]:
    """Tensors of a plan that llama.cpp would refuse to quantize without importance-matrix data for them."""
    return [name for name, qtype in plan.items() if tensor_requires_imatrix(recipe, name, qtype)]

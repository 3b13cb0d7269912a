"""P-Tuning v2 prefixes: the trained keys and values in front of every layer's attention, read in numpy.

THUDM's ``PrefixEncoder`` (``modeling_chatglm.py`` of ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B and GLM-4-9B) maps the
prefix tokens ``0..pre_seq_len-1`` to ``(pre_seq_len, n_layer * 2 * n_head_kv * head_dim)``: an embedding, or with
``prefix_projection`` an embedding of width ``hidden_size`` followed by ``Linear -> tanh -> Linear``. ``get_prompt``
views that as ``(pre_seq_len, n_layer * 2, n_head_kv, head_dim)`` (ChatGLM-6B: n_head_kv = n_head; ChatGLM2/3, GLM-4:
multi_query_group_num x kv_channels): layer ``l``'s keys are slice ``2l``, its values ``2l + 1``. A PEFT
prefix-tuning adapter (:class:`PeftPrefix`) stores rows of the same layout. The prefix is evaluated here once, at
convert time, and written as the plain per-layer array.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from chatglm import families, limits
from chatglm.convert.checkpoint import Checkpoint, CheckpointView, read_json
from chatglm.convert.lora import ADAPTER_CONFIG, open_weights
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.descriptor import ENGINE_LLAMA
from chatglm.schema import keys

PREFIX = "prefix_encoder."
EMBEDDING = "embedding.weight"
MLP = ("trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias")
PEFT_TENSOR = "prompt_embeddings"  # peft's BasePromptEncoder._get_adapter_state_dict
PEFT_SIZES = ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads")


def _prefix_names(ckpt: Checkpoint | CheckpointView) -> dict[str, str]:
    """``{short name: checkpoint name}`` of the prefix encoder's tensors (``transformer.prefix_encoder.*``)."""
    out: dict[str, str] = {}
    for name in ckpt.names():
        at = name.find(PREFIX)
        if at == 0 or (at > 0 and name[at - 1] == "."):
            out[name[at + len(PREFIX):]] = name
    return out


def has_prefix(ckpt: Checkpoint | CheckpointView) -> bool:
    return bool(ckpt.config.get("pre_seq_len")) or bool(_prefix_names(ckpt))


def weight_names(ckpt: Checkpoint | CheckpointView) -> set[str]:
    """The checkpoint names of the prefix encoder (the model's tensor plan leaves them out)."""
    return set(_prefix_names(ckpt).values())


def _load(ckpt: Checkpoint | CheckpointView, name: str) -> np.ndarray:
    return np.asarray(ckpt.load(name), dtype=np.float64)


def read_prefix(ckpt: "Checkpoint | CheckpointView | PeftPrefix", config: dict[str, Any], where: os.PathLike | str,
                *, layout: Optional[tuple[int, int, int]]) -> np.ndarray:
    """The prefix as float32 ``(n_layer, 2, pre_seq_len, n_head_kv * head_dim)``; ``config`` is the P-Tuning
    folder's config.json (``pre_seq_len``, ``prefix_projection``), ``layout`` the base model's
    ``(n_layer, n_head_kv, head_dim)`` (None: the family runs no prefix)."""
    where = Path(where)
    if layout is None:
        raise UnsupportedModelError("P-Tuning v2 prefixes run only on ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B / "
                                    "GLM-4-9B models in THUDM's layout", where)
    n_layer, n_kv, head_dim = layout
    width = n_layer * 2 * n_kv * head_dim
    kv = ckpt.rows(layout) if isinstance(ckpt, PeftPrefix) else _encoded(ckpt, config, where, layout)
    if kv.shape[1] != width:
        raise InputError(f"the prefix is {kv.shape[1]} wide, this model needs {width} ({n_layer} layers x 2 x "
                         f"{n_kv} kv heads x {head_dim}): a prefix of another model", where)
    if not np.all(np.isfinite(kv)):
        raise InputError("the prefix holds NaN or infinite values", where)
    if np.abs(kv).max(initial=0.0) > np.finfo(np.float32).max:
        raise InputError("the prefix overflows float32", where)
    n = kv.shape[0]
    if n < 1:
        raise InputError("the prefix is empty (pre_seq_len 0)", where)
    out = kv.reshape(n, n_layer, 2, n_kv * head_dim).transpose(1, 2, 0, 3)
    return np.ascontiguousarray(out, dtype=np.float32)


def _encoded(ckpt: Checkpoint | CheckpointView, config: dict[str, Any], where: Path,
             layout: tuple[int, int, int]) -> np.ndarray:
    """THUDM's PrefixEncoder evaluated: (pre_seq_len, n_layer * 2 * kv width), float64."""
    n_layer, n_kv, head_dim = layout
    width = n_layer * 2 * n_kv * head_dim
    names = _prefix_names(ckpt)
    if EMBEDDING not in names:
        raise InputError(f"no {PREFIX}{EMBEDDING} tensor: not a P-Tuning v2 checkpoint", where)
    pre_seq_len = config.get("pre_seq_len")
    emb = _load(ckpt, names[EMBEDDING])
    if emb.ndim != 2:
        raise InputError(f"{PREFIX}{EMBEDDING} has shape {list(emb.shape)}, expected 2 dimensions", where)
    if pre_seq_len is not None and (not isinstance(pre_seq_len, int) or isinstance(pre_seq_len, bool)
                                    or pre_seq_len != emb.shape[0]):
        raise InputError(f"pre_seq_len={pre_seq_len!r} in config.json disagrees with the prefix tensor's "
                         f"{emb.shape[0]} rows", where)
    if not (bool(config.get("prefix_projection")) or MLP[0] in names):
        return emb
    missing = [m for m in MLP if m not in names]
    if missing:
        raise InputError(f"prefix_projection is set but {PREFIX}{missing[0]} is missing", where)
    w0, b0, w2, b2 = (_load(ckpt, names[m]) for m in MLP)
    if w0.shape != (w0.shape[0], emb.shape[1]) or b0.shape != (w0.shape[0],) \
            or w2.shape != (width, w0.shape[0]) or b2.shape != (width,):
        raise InputError(f"the prefix projection's shapes {list(w0.shape)}, {list(w2.shape)} do not fit this "
                         f"model ({width} = {n_layer} layers x 2 x {n_kv} kv heads x {head_dim})", where)
    return np.tanh(emb @ w0.T + b0) @ w2.T + b2


class PeftPrefix:
    """A PEFT prefix-tuning adapter folder (``PrefixTuningConfig``): ``adapter_config.json`` with ``peft_type``
    PREFIX_TUNING and the sizes PEFT prepared (``num_virtual_tokens``, ``num_layers``, ``token_dim``,
    ``num_attention_heads``), and ``adapter_model.safetensors`` (or ``.bin``) holding one tensor,
    ``prompt_embeddings`` (num_virtual_tokens, num_layers * 2 * token_dim). PEFT saves it already encoded
    (``get_prompt_embedding_to_save`` runs the ``prefix_projection`` MLP, or in inference mode it is the plain
    embedding), and ``get_prompt`` views each row as (num_layers * 2, num_attention_heads, token_dim / heads): the
    row layout of THUDM's prefix, layer l's keys at 2l, its values at 2l + 1."""

    def __init__(self, folder: Path):
        self.dir = folder
        self.config = _peft_config(folder / ADAPTER_CONFIG)
        self.source = open_weights(folder)

    def __enter__(self) -> "PeftPrefix":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.source.close()

    def rows(self, layout: tuple[int, int, int]) -> np.ndarray:
        """(num_virtual_tokens, n_layer * 2 * kv width) float64, checked against the model's ``layout``."""
        cfg, where = self.config, self.dir / ADAPTER_CONFIG
        n_layer, n_kv, head_dim = layout
        sizes = (cfg.get("num_layers", n_layer), cfg.get("num_attention_heads", n_kv),
                 cfg.get("token_dim", n_kv * head_dim))
        if sizes != (n_layer, n_kv, n_kv * head_dim):
            raise InputError(f"the adapter's prefix is {sizes[0]} layers x {sizes[1]} heads (token_dim {sizes[2]}), "
                             f"this model keeps {n_layer} layers x {n_kv} kv heads x {head_dim}: PEFT sizes it from "
                             "hidden_size unless config.json names num_key_value_heads; train with token_dim="
                             f"{n_kv * head_dim}, num_attention_heads={n_kv}", where)
        infos = self.source.infos()
        other = sorted(set(infos) - {PEFT_TENSOR})
        if PEFT_TENSOR not in infos or other:
            found = f"also {', '.join(other[:3])}" if PEFT_TENSOR in infos else f"found {', '.join(other[:3])}"
            raise InputError(f"a prefix-tuning adapter holds one tensor, {PEFT_TENSOR} ({found})", self.source.path)
        rows = np.asarray(self.source.load(PEFT_TENSOR), dtype=np.float64)
        want = (cfg["num_virtual_tokens"], n_layer * 2 * n_kv * head_dim)
        if rows.shape != want:
            raise InputError(f"{PEFT_TENSOR} has shape {list(rows.shape)}, adapter_config.json makes it "
                             f"{list(want)}", self.source.path)
        return rows


def _peft_config(path: Path) -> dict[str, Any]:
    cfg = read_json(path, ADAPTER_CONFIG)
    if not isinstance(cfg, dict):
        raise InputError("not a JSON object", path)
    kind = cfg.get("peft_type")
    kind = kind.upper() if isinstance(kind, str) else kind
    if kind != "PREFIX_TUNING":
        what = "a LoRA adapter: merge it with --lora" if kind == "LORA" else (
            "prompt tuning adds trained input embeddings, not per-layer keys and values, and is not supported"
            if kind in ("P_TUNING", "PROMPT_TUNING") else "not supported")
        raise UnsupportedModelError(f"--ptuning takes PEFT prefix-tuning adapters (peft_type PREFIX_TUNING); "
                                    f"peft_type {kind!r} is {what}", path)
    for key in PEFT_SIZES:
        value = cfg.get(key)
        if key == "num_virtual_tokens" or value is not None:
            if type(value) is not int or not 0 < value <= limits.MAX_CONTEXT:
                raise InputError(f"{key} must be a positive integer, got {value!r}", path)
    if cfg.get("num_transformer_submodules") not in (None, 1):
        raise UnsupportedModelError("num_transformer_submodules is not 1: an encoder-decoder adapter", path)
    return cfg


def open_ptuning(folder: os.PathLike | str) -> "Checkpoint | PeftPrefix":
    """``--ptuning DIR``: a PEFT prefix-tuning adapter (adapter_config.json) or THUDM's P-Tuning v2 output."""
    folder = Path(folder)
    return PeftPrefix(folder) if (folder / ADAPTER_CONFIG).is_file() else Checkpoint(folder)


class TransformersPrefix:
    """For the families of transformers' own classes (``hp`` with n_layer, n_head_kv, head_dim) that take PEFT
    prefix-tuning adapters: PEFT sizes the prefix by num_key_value_heads and head_dim, and transformers' forward
    numbers the tokens after a cached prefix from P (see ``Family.prefix_positions_follow_cache``)."""

    prefix_positions_follow_cache = True

    def prefix_layout(self) -> tuple[int, int, int]:
        return self.hp.n_layer, self.hp.n_head_kv, self.hp.head_dim


def _takes_peft(arch: str) -> bool:
    """Whether models of ``arch`` take a PEFT prefix: the ones llama.cpp runs. ChatGLM-6B (our GLM-1 engine) does
    not: its published forward drops its 2D positions and mask when handed past_key_values, so a PEFT prefix has no
    published meaning there."""
    return any(f.engine == ENGINE_LLAMA for f in families.of_arch(arch))


def _source(base: Checkpoint | CheckpointView, ptuning: "Checkpoint | PeftPrefix | None") -> tuple[Any, dict, Path]:
    """Where the prefix comes from: the ``--ptuning`` folder (THUDM's, whose config.json may lack pre_seq_len
    when the trainer saved only the encoder, or a PEFT adapter) or the base folder when it is a full P-Tuning
    checkpoint."""
    if isinstance(ptuning, PeftPrefix):
        return ptuning, ptuning.config, ptuning.dir
    if ptuning is not None:
        cfg = dict(base.config)
        cfg.update({k: v for k, v in ptuning.config.items() if v is not None})
        return ptuning, cfg, ptuning.dir
    return base, dict(base.config), base.dir


@dataclass(frozen=True)
class Prefix:
    """What the GGUF carries: the values, how they are stored, and where the published forward numbers the first
    token (0: THUDM's remote code; P: transformers' own classes, whose positions continue after a cached prefix)."""

    values: np.ndarray  # float32 (n_layer, 2, P, n_head_kv * head_dim)
    stored: str  # "f32" or "f16"
    first_position: int


def load_prefix(base: Checkpoint | CheckpointView, ptuning: "Checkpoint | PeftPrefix | None", family,
                prefix_type: str = "f32") -> Prefix:
    """The prefix of ``--ptuning`` (or of a full P-Tuning checkpoint ``base``) for ``family`` (its
    ``prefix_layout`` and ``prefix_positions_follow_cache``), checked and ready to write."""
    source, config, where = _source(base, ptuning)
    follows = family.prefix_positions_follow_cache
    if isinstance(source, PeftPrefix) and not _takes_peft(family.arch):
        raise UnsupportedModelError(f"PEFT prefix-tuning adapters run on the models llama.cpp runs, not on a "
                                    f"{family.arch} model", where)
    if follows and not isinstance(source, PeftPrefix):
        raise UnsupportedModelError("a THUDM P-Tuning v2 prefix belongs to THUDM's remote-code layout "
                                    "(ChatGLMModel); this checkpoint is in transformers' layout, which takes PEFT "
                                    "prefix-tuning adapters", where)
    values = read_prefix(source, config, where, layout=family.prefix_layout())
    check_prefix_type(prefix_type, values, where)
    return Prefix(values, prefix_type, values.shape[2] if follows else 0)


PREFIX_TYPES = ("f32", "f16")


def check_prefix_type(prefix_type: str, prefix: Optional[np.ndarray] = None, where: Optional[Path] = None) -> None:
    """``prefix_type`` is one we store, and ``prefix`` (when given) fits it."""
    if prefix_type not in PREFIX_TYPES:
        raise InputError(f"the P-Tuning prefix is stored as {' or '.join(PREFIX_TYPES)}, not {prefix_type!r}")
    if prefix is not None and prefix_type == "f16" and np.abs(prefix).max(initial=0.0) > np.finfo(np.float16).max:
        raise InputError("the prefix overflows float16: store it as f32 (--ptuning-type f32)", where)


def write_prefix(w, prefix: Prefix) -> None:
    """The prefix metadata (``schema/keys.py``): pre_seq_len, the layout, the first position when not 0, and the
    values, float32 or (``f16``, half the size) IEEE half bits in a u16 array, GGUF metadata having no f16 type."""
    import gguf

    values = prefix.values.reshape(-1)
    if prefix.stored == "f16":
        values, item = values.astype(np.float16).view(np.uint16), gguf.GGUFValueType.UINT16
        w.add_string(keys.PTUNING_PREFIX_TYPE, prefix.stored)
    else:
        item = gguf.GGUFValueType.FLOAT32
    w.add_uint32(keys.PTUNING_PRE_SEQ_LEN, prefix.values.shape[2])
    if prefix.first_position:
        w.add_uint32(keys.PTUNING_FIRST_POSITION, prefix.first_position)
    w.add_array(keys.PTUNING_LAYOUT, list(prefix.values.shape))
    w.add_key_value(keys.PTUNING_PREFIX, np.ascontiguousarray(values), gguf.GGUFValueType.ARRAY, item)

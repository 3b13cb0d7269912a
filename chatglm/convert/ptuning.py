"""P-Tuning v2 prefixes: the trained keys and values in front of every layer's attention, read in numpy.

THUDM's ``PrefixEncoder`` (``modeling_chatglm.py`` of ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B) maps the prefix tokens
``0..pre_seq_len-1`` to ``(pre_seq_len, n_layer * 2 * n_head_kv * head_dim)``: an embedding, or with
``prefix_projection`` an embedding of width ``hidden_size`` followed by ``Linear -> tanh -> Linear``. ``get_prompt``
views that as ``(pre_seq_len, n_layer * 2, n_head_kv, head_dim)`` (ChatGLM-6B: n_head_kv = n_head): layer ``l``'s keys are slice ``2l``, its values
``2l + 1``. The prefix is evaluated here once, at convert time, and written as the plain per-layer array.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from chatglm.convert.checkpoint import Checkpoint, CheckpointView
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.schema import keys

PREFIX = "prefix_encoder."
EMBEDDING = "embedding.weight"
MLP = ("trans.0.weight", "trans.0.bias", "trans.2.weight", "trans.2.bias")


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


def read_prefix(ckpt: Checkpoint | CheckpointView, config: dict[str, Any], where: os.PathLike | str, *,
                layout: Optional[tuple[int, int, int]]) -> np.ndarray:
    """The prefix as float32 ``(n_layer, 2, pre_seq_len, n_head_kv * head_dim)``; ``config`` is the P-Tuning
    folder's config.json (``pre_seq_len``, ``prefix_projection``), ``layout`` the base model's
    ``(n_layer, n_head_kv, head_dim)`` (None: the family runs no prefix)."""
    where = Path(where)
    if layout is None:
        raise UnsupportedModelError("P-Tuning v2 prefixes run only on ChatGLM-6B / ChatGLM2-6B / ChatGLM3-6B "
                                    "models", where)
    names = _prefix_names(ckpt)
    if EMBEDDING not in names:
        raise InputError(f"no {PREFIX}{EMBEDDING} tensor: not a P-Tuning v2 checkpoint", where)
    n_layer, n_kv, head_dim = layout
    width = n_layer * 2 * n_kv * head_dim
    pre_seq_len = config.get("pre_seq_len")
    emb = _load(ckpt, names[EMBEDDING])
    if emb.ndim != 2:
        raise InputError(f"{PREFIX}{EMBEDDING} has shape {list(emb.shape)}, expected 2 dimensions", where)
    if pre_seq_len is not None and (not isinstance(pre_seq_len, int) or isinstance(pre_seq_len, bool)
                                    or pre_seq_len != emb.shape[0]):
        raise InputError(f"pre_seq_len={pre_seq_len!r} in config.json disagrees with the prefix tensor's "
                         f"{emb.shape[0]} rows", where)
    projection = bool(config.get("prefix_projection")) or MLP[0] in names
    if projection:
        missing = [m for m in MLP if m not in names]
        if missing:
            raise InputError(f"prefix_projection is set but {PREFIX}{missing[0]} is missing", where)
        w0, b0, w2, b2 = (_load(ckpt, names[m]) for m in MLP)
        if w0.shape != (w0.shape[0], emb.shape[1]) or b0.shape != (w0.shape[0],) \
                or w2.shape != (width, w0.shape[0]) or b2.shape != (width,):
            raise InputError(f"the prefix projection's shapes {list(w0.shape)}, {list(w2.shape)} do not fit this "
                             f"model ({width} = {n_layer} layers x 2 x {n_kv} kv heads x {head_dim})", where)
        kv = np.tanh(emb @ w0.T + b0) @ w2.T + b2
    else:
        kv = emb
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


def prefix_source(base: Checkpoint | CheckpointView, ptuning: Optional[Checkpoint]) -> tuple[Any, dict, Path]:
    """Where the prefix comes from: the ``--ptuning`` folder (its config.json, which may lack pre_seq_len when
    THUDM's trainer saved only the encoder) or the base folder when it is a full P-Tuning checkpoint."""
    if ptuning is not None:
        cfg = dict(base.config)
        cfg.update({k: v for k, v in ptuning.config.items() if v is not None})
        return ptuning, cfg, ptuning.dir
    return base, dict(base.config), base.dir


def write_prefix(w, prefix: np.ndarray) -> None:
    """The prefix metadata (``schema/keys.py``): pre_seq_len, the layout and the float32 values."""
    import gguf

    w.add_uint32(keys.PTUNING_PRE_SEQ_LEN, prefix.shape[2])
    w.add_array(keys.PTUNING_LAYOUT, list(prefix.shape))
    w.add_key_value(keys.PTUNING_PREFIX, prefix.reshape(-1).tolist(), gguf.GGUFValueType.ARRAY,
                    gguf.GGUFValueType.FLOAT32)

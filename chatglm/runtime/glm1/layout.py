"""Where each token sits in ChatGLM-6B's 2D positions and prefix-bidirectional mask (host-side, numpy).

From the published modeling_chatglm.py (final release), for a sequence ``seq``:

- the context is every token before the first ``<sop>`` (bos); all of it when there is none (as the published
  tokenizer's ``_pad`` does; the model itself would raise);
- the mask token is ``[gMASK]`` if the sequence has one, else ``[MASK]``; its first index is the mask position;
- position id = the index inside the context, and the mask position for ``<sop>`` and every later token (the index
  itself when there is no mask token, as in ``_pad``);
- block position id = 0 inside the context, then 1, 2, 3, ... from ``<sop>``;
- context tokens attend to the whole context (bidirectionally); later tokens to the context and causally.

The mask token is looked for in the context only: tokens generated later cannot move the positions of cached ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class SpecialIds:
    bos: int  # <sop>
    mask: int  # [MASK]
    gmask: int  # [gMASK]


def context_length(tokens: Sequence[int], ids: SpecialIds) -> int:
    try:
        return list(tokens).index(ids.bos)
    except ValueError:
        return len(tokens)


def mask_position(tokens: Sequence[int], ids: SpecialIds) -> int | None:
    context = list(tokens[:context_length(tokens, ids)])
    for token in (ids.gmask, ids.mask):
        if token in context:
            return context.index(token)
    return None


def positions(tokens: Sequence[int], ids: SpecialIds) -> tuple[np.ndarray, np.ndarray]:
    """(position ids, block position ids), int32, one per token."""
    n, c = len(tokens), context_length(tokens, ids)
    pos = np.arange(n, dtype=np.int32)
    where = mask_position(tokens, ids)
    if where is not None:
        pos[c:] = where
    block = np.zeros(n, dtype=np.int32)
    block[c:] = np.arange(1, n - c + 1, dtype=np.int32)
    return pos, block


def attention_mask(first: int, last: int, context: int) -> np.ndarray:
    """f32 (rows first..last-1, keys 0..last-1): 0 where query i may see key j (j < context or j <= i), else -inf."""
    rows = np.arange(first, last)[:, None]
    keys = np.arange(last)[None, :]
    allowed = (keys < context) | (keys <= rows)
    return np.where(allowed, 0.0, -np.inf).astype(np.float32)  # (T, n_kv): ggml's (n_kv, T)


def reusable_prefix(cached: Sequence[int], tokens: Sequence[int], ids: SpecialIds) -> int:
    """How many cached tokens stay valid for ``tokens``: their common prefix, but only when both sequences have the
    same context (every cached context token attended to the whole context, so any change there spoils all)."""
    n = min(len(cached), len(tokens))
    prefix = next((i for i in range(n) if cached[i] != tokens[i]), n)
    c_old, c_new = context_length(cached, ids), context_length(tokens, ids)
    if c_old != c_new or prefix < c_old:
        return 0
    return prefix

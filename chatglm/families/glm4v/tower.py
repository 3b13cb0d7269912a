"""The GLM vision tower's tensors, declared once: the projector writer (``vision.py``) plans its output from these
rows, and :func:`check_tower` (the ``check_projector`` of ``glm4v``'s and ``glm5_next``'s ``chat.py``) holds a file
to the same rows before libmtmd sees it (a missing tensor is an exception there, a wrong shape or merge size a
GGML_ASSERT: the process aborts). No converter code here, so the runtime may import it.

Each row: the GGUF tensor, its source below the tower's prefix (``model.visual.`` or ``visual.``), its numpy-order
shape in the names of :func:`layout`'s ``sizes``, and the part it belongs to (None: always there). Parts:
``positions`` (a learned position table and an RMSNorm after the patch embedding), ``qk_norm`` (per-head q/k
RMSNorms) and the bias groups ``qkv``, ``out``, ``ffn``. A writer takes the parts its :class:`Tower` and config.json
give; the check takes those the file shows (one tensor of a part present: the whole part is required).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Sequence

import gguf

T = gguf.MODEL_TENSOR
PARTS = ("positions", "qk_norm", "qkv", "out", "ffn")
MERGE = 2  # libmtmd's glm4v graph merges 2x2 patches

# the Conv3d patch embedding, two frames deep: frame k is written as ``v.patch_embd.weight`` + FRAMES[k]
PATCH = (T.V_ENC_EMBD_PATCH, "patch_embed.proj.weight", ("d", "rgb", "p", "p"))
FRAMES = ("", ".1")
STEM = (
    (T.V_ENC_EMBD_PATCH, "patch_embed.proj.bias", ("d",), None),
    (T.V_ENC_EMBD_NORM, "post_conv_layernorm.weight", ("d",), "positions"),
    (T.V_ENC_EMBD_POS, "embeddings.position_embedding.weight", ("n_pos", "d"), "positions"),
)
BLOCK = (  # below ``blocks.{bid}.``
    (T.V_ENC_INPUT_NORM, "norm1.weight", ("d",), None),
    (T.V_ENC_POST_ATTN_NORM, "norm2.weight", ("d",), None),
    (T.V_ENC_ATTN_QKV, "attn.qkv.weight", ("3d", "d"), None),
    (T.V_ENC_ATTN_O, "attn.proj.weight", ("d", "d"), None),
    (T.V_ENC_ATTN_QKV, "attn.qkv.bias", ("3d",), "qkv"),
    (T.V_ENC_ATTN_O, "attn.proj.bias", ("d",), "out"),
    (T.V_ENC_ATTN_Q_NORM, "attn.q_norm.weight", ("head",), "qk_norm"),
    (T.V_ENC_ATTN_K_NORM, "attn.k_norm.weight", ("head",), "qk_norm"),
    (T.V_ENC_FFN_GATE, "mlp.gate_proj.weight", ("ff", "d"), None),
    (T.V_ENC_FFN_GATE, "mlp.gate_proj.bias", ("ff",), "ffn"),
    (T.V_ENC_FFN_UP, "mlp.up_proj.weight", ("ff", "d"), None),
    (T.V_ENC_FFN_UP, "mlp.up_proj.bias", ("ff",), "ffn"),
    (T.V_ENC_FFN_DOWN, "mlp.down_proj.weight", ("d", "ff"), None),
    (T.V_ENC_FFN_DOWN, "mlp.down_proj.bias", ("d",), "ffn"),
)
HEAD = (
    (T.V_POST_NORM, "post_layernorm.weight", ("d",), None),
    (T.V_MM_PATCH_MERGER, "downsample.weight", ("o", "d", "m", "m"), None),
    (T.V_MM_PATCH_MERGER, "downsample.bias", ("o",), None),
    (T.V_MMPROJ_FC, "merger.proj.weight", ("o", "o"), None),
    (T.V_MM_POST_NORM, "merger.post_projection_norm.weight", ("o",), None),
    (T.V_MM_POST_NORM, "merger.post_projection_norm.bias", ("o",), None),
    (T.V_MM_GATE, "merger.gate_proj.weight", ("merger_ff", "o"), None),
    (T.V_MM_UP, "merger.up_proj.weight", ("merger_ff", "o"), None),
    (T.V_MM_DOWN, "merger.down_proj.weight", ("o", "merger_ff"), None),
)


@dataclass(frozen=True)
class Tower:
    """What one family's vision tower has of its own."""

    projector_type: str  # libmtmd's name
    tower_ff: tuple[str, ...]  # the vision_config keys whose product is the ViT blocks' MLP width
    merger_ff: tuple[str, ...]  # the same for the merger's SwiGLU
    positions: bool  # a learned position table and an RMSNorm after the patch embedding
    qk_norm: bool  # per-head RMSNorm of q and k
    biased: tuple[str, ...]  # the bias groups ("qkv", "out", "ffn") vision_config.attention_bias turns on
    bias_default: bool = False  # attention_bias when vision_config has none (transformers' default for the family)
    default_norm: tuple[Sequence[float], Sequence[float]] | None = None  # mean/std without preprocessor_config.json


@dataclass(frozen=True)
class Row:
    """One GGUF tensor of a tower: its name, source below the prefix, numpy-order shape and patch frame (or None)."""

    name: str
    source: str
    shape: tuple[int, ...]
    frame: int | None = None


def _rows(table, sizes: dict[str, int], parts, bid: int | None = None) -> list[Row]:
    below = "" if bid is None else f"blocks.{bid}."
    return [Row(gguf.TENSOR_NAMES[t].format(bid=bid) + "." + source.rsplit(".", 1)[1], below + source,
                tuple(sizes[x] for x in shape)) for t, source, shape, part in table if part is None or part in parts]


def layout(sizes: dict[str, int], depth: int, parts) -> list[Row]:
    """Every tensor of a tower ``depth`` blocks deep with these ``parts``, in file order. ``sizes``: ``d`` (width),
    ``3d``, ``head`` (head width), ``ff`` (the blocks' MLP), ``o`` (projection), ``merger_ff``, ``p`` (patch), ``m``
    (merge), ``n_pos`` (learned positions), ``rgb`` (3)."""
    t, source, shape = PATCH
    plan = [Row(gguf.TENSOR_NAMES[t] + ".weight" + suffix, source, tuple(sizes[x] for x in shape), k)
            for k, suffix in enumerate(FRAMES)]
    plan += _rows(STEM, sizes, parts)
    for bid in range(depth):
        plan += _rows(BLOCK, sizes, parts, bid)
    return plan + _rows(HEAD, sizes, parts)


def _header_sizes(header, fail: Callable[[str], Exception]) -> tuple[dict[str, int], int]:
    """The sizes :func:`layout` takes, from a projector's keys (widths the keys do not hold from its tensors)."""
    kv = header.get
    e, n_head, depth = (kv("clip.vision.embedding_length"), kv("clip.vision.attention.head_count"),
                        kv("clip.vision.block_count"))
    p, o, merge = kv("clip.vision.patch_size"), kv("clip.vision.projection_dim"), kv("clip.vision.spatial_merge_size",
                                                                                      MERGE)
    for key, value in (("embedding_length", e), ("attention.head_count", n_head), ("block_count", depth),
                       ("patch_size", p), ("projection_dim", o)):
        if type(value) is not int or not 0 < value < 1 << 20:
            raise fail(f"clip.vision.{key} must be a positive integer, got {value!r}")
    if merge != MERGE:
        raise fail(f"clip.vision.spatial_merge_size must be {MERGE} for this projector (libmtmd's graph merges 2x2 "
                   f"patches), got {merge!r}")
    if e % n_head or (e // n_head) % 4:
        raise fail(f"embedding_length {e} must split into {n_head} heads of a multiple of 4 dims")

    def width(*where: tuple[str, int]) -> int:
        """The width most of these (tensor, ggml axis) have, so that a tensor off is the one reported."""
        found = [t.shape[axis] for name, axis in where
                 if (t := header.tensors.get(name)) is not None and len(t.shape) == 2]
        return Counter(found).most_common(1)[0][0] if found else 0

    ff = width(*((f"v.blk.{i}.ffn_{k}.weight", int(k != "down")) for i in range(depth) for k in ("gate", "up", "down")))
    merger_ff = width(("mm.gate.weight", 1), ("mm.up.weight", 1), ("mm.down.weight", 0))
    n_pos = width(("v.position_embd.weight", 1))
    if n_pos and math.isqrt(n_pos) ** 2 != n_pos:
        raise fail(f"v.position_embd.weight holds {n_pos} positions: not a square grid")
    return {"d": e, "3d": 3 * e, "head": e // n_head, "ff": ff, "o": o, "merger_ff": merger_ff, "p": p, "m": merge,
            "n_pos": n_pos, "rgb": 3}, depth


def require_tensor(tensors: dict, name: str, shape: tuple[int, ...], fail: Callable[[str], Exception]):
    """The header's entry of tensor ``name`` if it has ``shape`` (ggml order, no zero), else ``fail``'s exception:
    what every projector check built on libmtmd's vision graphs asks of each tensor first."""
    t = tensors.get(name)
    if t is None:
        raise fail(f"lacks tensor {name}")
    if tuple(t.shape) != shape or 0 in shape:
        raise fail(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")
    return t


def check_tower(header, fail: Callable[[str], Exception]) -> None:
    """Every tensor of :func:`layout` for the parts the file has, with the shapes (ggml order) its keys give."""
    sizes, depth = _header_sizes(header, fail)
    tensors = header.tensors
    if "v.class_embd" in tensors:
        raise fail("a GLM vision projector has no class embedding (v.class_embd)")
    always = {r.name for r in layout(sizes, depth, ())}
    parts = {part for part in PARTS
             if any(r.name in tensors and r.name not in always for r in layout(sizes, depth, (part,)))}
    for row in layout(sizes, depth, parts):
        require_tensor(tensors, row.name, row.shape[::-1], fail)

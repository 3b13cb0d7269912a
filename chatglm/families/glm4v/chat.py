"""GLM-4.1V/4.6V have no builder of their own: the GGUF carries the checkpoint's template, rendered by the sandboxed
Jinja path (``runtime/jinja_chat.py``), which gives each image the template's content part and so its
``<|begin_of_image|><|image|><|end_of_image|>`` (libmtmd's chunk takes the place of ``<|image|>``).

:func:`check_projector` is what libmtmd's ``glm4v`` loader and graph (tools/mtmd/clip.cpp, models/glm4v.cpp) need of
an mmproj file beyond the keys every projector has, checked before libmtmd sees it: a missing tensor is an exception
there, but a wrong shape or merge size is a GGML_ASSERT (the process aborts).
"""

from __future__ import annotations

import math
from typing import Callable

FORMATS = ()


def check_projector(header, fail: Callable[[str], Exception]) -> None:
    """Every tensor the glm4v graph reads, with the shapes (ggml order) its hyperparameters give."""
    kv = header.get
    e, n_head, n_layer = (kv("clip.vision.embedding_length"), kv("clip.vision.attention.head_count"),
                          kv("clip.vision.block_count"))
    p, n_out, merge = kv("clip.vision.patch_size"), kv("clip.vision.projection_dim"), kv(
        "clip.vision.spatial_merge_size", 2)
    for key, value in (("embedding_length", e), ("attention.head_count", n_head), ("block_count", n_layer),
                       ("patch_size", p), ("projection_dim", n_out)):
        if type(value) is not int or not 0 < value < 1 << 20:
            raise fail(f"clip.vision.{key} must be a positive integer, got {value!r}")
    if merge != 2:
        raise fail(f"clip.vision.spatial_merge_size must be 2 for glm4v (libmtmd's graph merges 2x2 patches), "
                   f"got {merge!r}")
    if e % n_head or (e // n_head) % 4:
        raise fail(f"embedding_length {e} must split into {n_head} heads of a multiple of 4 dims")
    tensors = header.tensors
    ff = tensors.get("mm.down.weight")
    f = ff.shape[0] if ff is not None and len(ff.shape) == 2 else 0
    pos = tensors.get("v.position_embd.weight")
    if pos is not None and (len(pos.shape) != 2 or math.isqrt(pos.shape[1]) ** 2 != pos.shape[1]):
        raise fail(f"v.position_embd.weight has shape {list(pos.shape)}: not a square grid of positions")
    expected: dict[str, tuple[int, ...]] = {
        "v.patch_embd.weight": (p, p, 3, e), "v.patch_embd.weight.1": (p, p, 3, e), "v.patch_embd.bias": (e,),
        "mm.patch_merger.weight": (merge, merge, e, n_out), "mm.patch_merger.bias": (n_out,),
        "mm.model.fc.weight": (n_out, n_out), "mm.post_norm.weight": (n_out,), "mm.gate.weight": (n_out, f),
        "mm.up.weight": (n_out, f), "mm.down.weight": (f, n_out),
    }
    up = tensors.get("v.blk.0.ffn_up.weight")
    n_ff = up.shape[1] if up is not None and len(up.shape) == 2 else 0
    for i in range(n_layer):
        b = f"v.blk.{i}."
        expected.update({b + "attn_qkv.weight": (e, 3 * e), b + "attn_out.weight": (e, e), b + "ln1.weight": (e,),
                         b + "ln2.weight": (e,), b + "ffn_gate.weight": (e, n_ff), b + "ffn_up.weight": (e, n_ff),
                         b + "ffn_down.weight": (n_ff, e)})
    optional = {"v.norm_embd.weight": (e,), "v.post_ln.weight": (e,), "mm.post_norm.bias": (n_out,),
                **({"v.position_embd.weight": (e, pos.shape[1])} if pos is not None else {}),
                **{f"v.blk.{i}.attn_qkv.bias": (3 * e,) for i in range(n_layer)}}
    if "v.class_embd" in tensors:
        raise fail("a glm4v projector has no class embedding (v.class_embd)")
    for name, shape in (*expected.items(), *optional.items()):
        t = tensors.get(name)
        if t is None:
            if name in expected:
                raise fail(f"lacks tensor {name}")
            continue
        if tuple(t.shape) != shape or 0 in shape:
            raise fail(f"tensor {name} has shape {list(t.shape)}, expected {list(shape)}")

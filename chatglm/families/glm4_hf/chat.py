"""The ``glm-edge`` chat format of GLM-Edge 1.5B/4B chat (glm-4-9b-chat-hf uses the ``glm4`` format of
``chatglm/families/glm4``); ``glm-edge-v``, GLM-Edge-V's (images through its own template), and
:func:`check_projector`, what its ``adapter`` (GLM_EDGE) projector must hold before libmtmd reads it."""

from __future__ import annotations

from typing import Callable, Sequence

from chatglm.errors import InputError
from chatglm.families.glm4_hf import FAMILY
from chatglm.families.glm4v.tower import require_tensor
from chatglm.runtime.jinja_chat import JinjaFormat, added_token_ids, hf_messages, render, template_kwargs
from chatglm.runtime.messages import Message
from chatglm.runtime.prompts import Tokenizer, check_roles
from chatglm.runtime.prompts_glm import GLMFormat, Piece

IMAGE_TOKEN = FAMILY.projectors[0].placeholder  # the template writes one per embedding of the image


class GLMEdgeFormat(GLMFormat):
    """GLM-Edge chat: no ``[gMASK]<sop>`` prefix; ``<|role|>\\ncontent`` per message; no tools."""

    name = FAMILY.chat_formats[0]
    required_tokens = ("<|system|>", "<|user|>", "<|assistant|>")

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        check_roles(messages, ("system", "user", "assistant"), self.name)
        pieces: list[Piece] = []
        for m in messages:
            if m.tools is not None or m.tool_calls:
                raise InputError("the glm-edge chat format has no tool calling")
            pieces += [self.role(m.role), f"\n{m.content}"]
        return self.encode(pieces + [self.role("assistant")], tok)


class GLMEdgeVTemplate(JinjaFormat):
    """GLM-Edge-V's template, sandboxed: it writes each image as a run of ``<|begin_of_image|>`` tokens, one per
    embedding the model puts there (boi, the image's, eoi); each run becomes the one placeholder the runtime
    replaces with libmtmd's chunk of the same embeddings. Every message's content is given as parts, as
    transformers' processor gives it (the template iterates them)."""

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        if not messages:
            raise InputError("empty conversation: give at least one user message")
        hf, tools = hf_messages(messages)
        for m in hf:
            if isinstance(m["content"], str):
                m["content"] = [{"type": "text", "text": m["content"]}]
        text = render(self.template, hf, tools, True, **template_kwargs(self.options))
        token = self.added.get(IMAGE_TOKEN)
        if token is None:
            raise InputError(f"the model's vocabulary has no {IMAGE_TOKEN} token, which its images take")
        return collapse_runs(added_token_ids(text, self.added, tok), token, sum(len(m.media) for m in messages))


class GLMEdgeVFormat(GLMEdgeFormat):
    """GLM-Edge-V chat: text prompts as GLM-Edge's; a conversation with images takes the checkpoint's own template
    (:class:`GLMEdgeVTemplate`)."""

    name = FAMILY.chat_formats[1]
    renders_template = True
    media_template = GLMEdgeVTemplate  # what jinja_chat.media_format renders the template with


def collapse_runs(ids: list[int], token: int, n_media: int) -> list[int]:
    """``ids`` with the template's ``n_media`` equal runs of ``token`` (adjacent images' runs touch) one each."""
    total = sum(1 for t in ids if t == token)
    if not n_media:
        return ids
    per = total // n_media
    out: list[int] = []
    run = 0
    for t in [*ids, None]:
        if t == token:
            run += 1
            continue
        if run:
            if not per or run % per:
                raise InputError(f"the chat template wrote {total} {IMAGE_TOKEN} tokens for {n_media} images: not "
                                 "one equal run per image")
            out += [token] * (run // per)
            run = 0
        if t is not None:
            out.append(t)
    return out


def check_projector(header, fail: Callable[[str], Exception]) -> None:
    """What libmtmd's GLM_EDGE loader and graph (clip.cpp, models/llava.cpp) need of an mmproj file, checked before
    libmtmd sees it: a missing tensor is an exception there, a wrong shape or type a GGML_ASSERT."""
    kv = header.get
    sizes = {key: kv(f"clip.vision.{key}") for key in ("embedding_length", "attention.head_count", "block_count",
                                                        "feed_forward_length", "image_size", "patch_size",
                                                        "projection_dim")}
    for key, value in sizes.items():
        if type(value) is not int or not 0 < value < 1 << 20:
            raise fail(f"clip.vision.{key} must be a positive integer, got {value!r}")
    d, n_head, n_layer, ff, size, p, n = sizes.values()
    grid, rest = divmod(size, p)
    if d % n_head or rest or grid % 2 or ff == d:
        raise fail(f"the vision sizes do not fit libmtmd's GLM-Edge graph (embedding_length {d}, {n_head} heads, "
                   f"feed_forward_length {ff}, image_size {size}, patch_size {p})")
    down = header.tensors.get("adapter.linear.dense_4h_to_h.weight")
    f = down.shape[0] if down is not None and len(down.shape) == 2 else 0
    for name, (shape, f32) in projector_shapes(d, ff, n, f, p, grid * grid, n_layer).items():
        t = require_tensor(header.tensors, name, shape, fail)
        if f32 and t.ggml_type != 0:
            raise fail(f"tensor {name} must be f32 (libmtmd joins it to f32 embeddings)")
    if "v.class_embd" in header.tensors:
        raise fail("a GLM-Edge projector has no class embedding (v.class_embd)")


def image_cost(info, width: int, height: int) -> tuple[int, int]:
    """(embeddings, encoder patches) of one image: libmtmd resizes every image to ``image_size``, the adapter's 2x2
    convolution merges the patch grid, and the begin/end-of-image embeddings add two (578 for the published 2B/5B)."""
    grid = info.image_size // max(1, info.patch_size)
    return (grid // 2) ** 2 + 2, grid * grid


def projector_shapes(d: int, ff: int, n: int, f: int, p: int, n_pos: int, n_layer: int) -> dict:
    """name -> (ggml shape, must be f32) of every tensor the GLM_EDGE graph reads."""
    out = {"v.patch_embd.weight": ((p, p, 3, d), False), "v.patch_embd.bias": ((d,), False),
           "v.position_embd.weight": ((d, n_pos), False), "v.post_ln.weight": ((d,), False),
           "v.post_ln.bias": ((d,), False), "adapter.conv.weight": ((2, 2, d, n), False),
           "adapter.conv.bias": ((n,), False), "adapter.linear.linear.weight": ((n, n), False),
           "adapter.linear.norm1.weight": ((n,), False), "adapter.linear.norm1.bias": ((n,), False),
           "adapter.linear.dense_h_to_4h.weight": ((n, f), False), "adapter.linear.gate.weight": ((n, f), False),
           "adapter.linear.dense_4h_to_h.weight": ((f, n), False), "adapter.boi": ((n, 1), True),
           "adapter.eoi": ((n, 1), True)}
    for i in range(n_layer):
        b = f"v.blk.{i}."
        for part, shape in (("ln1", (d,)), ("ln2", (d,)), ("attn_q", (d, d)), ("attn_k", (d, d)),
                            ("attn_v", (d, d)), ("attn_out", (d, d)), ("ffn_up", (d, ff)), ("ffn_down", (ff, d))):
            out[b + part + ".weight"] = (shape, False)
            out[b + part + ".bias"] = ((shape[-1],), False)
    return out


FORMATS = (GLMEdgeFormat, GLMEdgeVFormat)

"""GLM-ASR defines no chat format: its GGUFs carry the checkpoint's template (sandboxed Jinja path).

:func:`check_projector` is what libmtmd's ``glma`` loader and graph (tools/mtmd/clip.cpp, models/whisper-enc.cpp)
need of an mmproj file, checked before libmtmd sees it: a tensor of the wrong shape or type there is a GGML_ASSERT.
"""

from __future__ import annotations

from typing import Callable, Optional

from chatglm.families.glm_asr.rope_layout import require_tensor

FORMATS = ()

GGML_F32 = 0
WHISPER_POSITIONS = 1500  # libmtmd's front end gives 3000 mel frames per 30 s chunk; the stride-2 conv halves them


def _glma_tensors(header, fail: Callable[[str], Exception]) -> dict[str, tuple[Optional[tuple[int, ...]], bool]]:
    """name -> (ggml shape, None: checked apart; must be f32) of every tensor clip.cpp loads for glma and
    whisper-enc.cpp multiplies, adds or concatenates (a mismatch there is a GGML_ASSERT, not an error)."""
    d = _uint(header, fail, "clip.audio.embedding_length")
    ff = _uint(header, fail, "clip.audio.feed_forward_length")
    heads = _uint(header, fail, "clip.audio.attention.head_count")
    stack = _uint(header, fail, "clip.audio.projector.stack_factor")
    n_mel = _uint(header, fail, "clip.audio.num_mel_bins")
    out = _uint(header, fail, "clip.audio.projection_dim")
    if d % heads:
        raise fail(f"projector embedding_length {d} is not a multiple of head_count {heads}")
    if WHISPER_POSITIONS % stack:
        raise fail(f"projector stack_factor {stack} does not divide the {WHISPER_POSITIONS} positions of a "
                   "30 s chunk")
    mid = header.tensors.get("mm.a.mlp.1.weight")
    hidden = mid.shape[1] if mid is not None and len(mid.shape) == 2 else 0
    spec: dict[str, tuple[Optional[tuple[int, ...]], bool]] = {
        "a.conv1d.1.weight": ((3, n_mel, d), False), "a.conv1d.1.bias": ((1, d), True),
        "a.conv1d.2.weight": ((3, d, d), False), "a.conv1d.2.bias": ((1, d), True),
        "a.position_embd.weight": (None, True), "mm.a.norm_pre.weight": ((d,), True),
        "mm.a.norm_pre.bias": ((d,), True), "mm.a.mlp.1.weight": ((d * stack, hidden), False),
        "mm.a.mlp.1.bias": ((hidden,), True), "mm.a.mlp.2.weight": ((hidden, out), False),
        "mm.a.mlp.2.bias": ((out,), True), "v.boi": ((out, 1), True), "v.eoi": ((out, 1), True)}
    for i in range(_uint(header, fail, "clip.audio.block_count")):
        p = f"a.blk.{i}."
        spec.update({f"{p}{n}.weight": ((d,), True) for n in ("ln1", "ln2")})
        spec.update({f"{p}{n}.bias": ((d,), True) for n in ("ln1", "ln2", "attn_q", "attn_v", "attn_out")})
        spec.update({f"{p}{n}.weight": ((d, d), False) for n in ("attn_q", "attn_k", "attn_v", "attn_out")})
        spec.update({f"{p}ffn_up.weight": ((d, ff), False), f"{p}ffn_up.bias": ((ff,), True),
                     f"{p}ffn_down.weight": ((ff, d), False), f"{p}ffn_down.bias": ((d,), True)})
    return spec


def check_projector(header, fail: Callable[[str], Exception]) -> None:
    """Every tensor libmtmd's glma graph uses is there, shaped as the header's sizes say and typed as its ops take;
    our own rotary-encoder projector is checked by the module that runs it."""
    from chatglm.families.glm_asr import ROPE_PROJECTOR

    if header.get("clip.projector_type") == ROPE_PROJECTOR:
        from chatglm.runtime.glmasr.weights import check_header

        check_header(header, fail)
        return
    for name, (shape, f32) in _glma_tensors(header, fail).items():
        t = require_tensor(header, name, shape, fail)
        if f32 and t.ggml_type != GGML_F32:
            raise fail(f"projector tensor {name} must be f32")
    pos = header.tensors["a.position_embd.weight"].shape
    d = header.get("clip.audio.embedding_length")
    if len(pos) != 2 or pos[0] != d or pos[1] < WHISPER_POSITIONS:
        raise fail(f"projector position table is {list(pos)}, expected [{d}, >= {WHISPER_POSITIONS}]")
    if any(n.startswith("a.blk.") and n.endswith(".attn_k.bias") for n in header.tensors):
        raise fail("projector has attn_k biases, which libmtmd's glma graph refuses")


def _uint(header, fail: Callable[[str], Exception], key: str) -> int:
    value = header.get(key)
    if type(value) is not int or value <= 0:
        raise fail(f"projector key {key} is missing or not a positive integer")
    return value

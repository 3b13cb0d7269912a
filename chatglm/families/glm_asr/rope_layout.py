"""The ``chatglm_glmasr_rope`` projector's layout, shared by its converter (:mod:`.rope_encoder`) and the runtime
that runs it (chatglm/runtime/glmasr/): the header keys (:data:`KEYS`), the encoder's sizes
(:class:`RopeEncoderParams`) and the one table of tensor names and ggml shapes (:func:`expected_tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from chatglm.families.glm_asr import ROPE_PROJECTOR

PROJECTOR_TYPE = ROPE_PROJECTOR
OUTPUT = "mm.a.mlp.2.weight"
KEYS = {  # RopeEncoderParams field -> GGUF key
    "d": "clip.audio.embedding_length", "n_ff": "clip.audio.feed_forward_length",
    "n_layer": "clip.audio.block_count", "n_head": "clip.audio.attention.head_count",
    "n_head_kv": "chatglm.audio.attention.head_count_kv", "n_out": "clip.audio.projection_dim",
    "n_mel": "clip.audio.num_mel_bins", "stack": "clip.audio.projector.stack_factor",
    "rope_dim": "chatglm.audio.rope.dimension_count", "n_pos": "chatglm.audio.context_length",
}
KEY_EPS = "clip.audio.attention.layer_norm_epsilon"
KEY_THETA = "chatglm.audio.rope.freq_base"
KEY_K_BIAS = "chatglm.audio.attention.key_bias"
KEY_BOA = "chatglm.audio.has_boa_eoa"
LAYER_NORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which both layouts use
POSITIONS = 1500  # 3000 mel frames of a 30 s window, halved by the stride-2 conv


@dataclass(frozen=True)
class RopeEncoderParams:
    d: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_out: int  # the language model's width
    n_mel: int
    stack: int
    rope_dim: int
    n_pos: int
    theta: float = 10000.0
    eps: float = LAYER_NORM_EPS
    k_bias: bool = False
    boa_eoa: bool = False

    @property
    def head_dim(self) -> int:
        return self.d // self.n_head

    @property
    def n_hidden(self) -> int:  # the adapter's hidden width (transformers: 2 x the text model's)
        return 2 * self.n_out


def expected_tensors(p: RopeEncoderParams) -> dict[str, tuple[int, ...]]:
    """Every tensor of the projector, ggml order (ne0 first)."""
    d, q, kv = p.d, p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "a.conv1d.1.weight": (3, p.n_mel, d), "a.conv1d.1.bias": (d,),
        "a.conv1d.2.weight": (3, d, d), "a.conv1d.2.bias": (d,),
        "a.post_norm.weight": (d,), "a.post_norm.bias": (d,),
        "mm.a.mlp.1.weight": (d * p.stack, p.n_hidden), "mm.a.mlp.1.bias": (p.n_hidden,),
        "mm.a.mlp.2.weight": (p.n_hidden, p.n_out), "mm.a.mlp.2.bias": (p.n_out,)}
    if p.boa_eoa:
        shapes.update({"a.boa": (p.n_out,), "a.eoa": (p.n_out,)})
    for i in range(p.n_layer):
        b = f"a.blk.{i}."
        shapes.update({b + "ln1.weight": (d,), b + "ln1.bias": (d,), b + "ln2.weight": (d,), b + "ln2.bias": (d,),
                       b + "attn_q.weight": (d, q), b + "attn_q.bias": (q,), b + "attn_k.weight": (d, kv),
                       b + "attn_v.weight": (d, kv), b + "attn_v.bias": (kv,), b + "attn_out.weight": (q, d),
                       b + "attn_out.bias": (d,), b + "ffn_up.weight": (d, p.n_ff), b + "ffn_up.bias": (p.n_ff,),
                       b + "ffn_down.weight": (p.n_ff, d), b + "ffn_down.bias": (d,)})
        if p.k_bias:
            shapes[b + "attn_k.bias"] = (kv,)
    return shapes


def require_tensor(header, name: str, shape: Optional[tuple[int, ...]], fail: Callable[[str], Exception]):
    """The header's entry of tensor ``name``, shaped ``shape`` (ggml order; None: any), else ``fail``'s exception:
    what both GLM-ASR projector checks (libmtmd's glma, our rotary encoder) ask of each tensor first."""
    t = header.tensors.get(name)
    if t is None:
        raise fail(f"projector lacks tensor {name}")
    if shape is not None and tuple(t.shape) != shape:
        raise fail(f"projector tensor {name} is {list(t.shape)}, expected {list(shape)}")
    return t

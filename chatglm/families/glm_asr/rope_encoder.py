"""GLM-ASR's rotary audio encoder (transformers' ``GlmAsrEncoder``; the remote-code encoder with ``use_rope: true``)
as our own projector type, :data:`PROJECTOR_TYPE`, which libmtmd does not know (so it never loads it as ``glma`` and
computes it wrongly); chatglm/runtime/glmasr/ runs it on our own ggml graph.

The encoder: conv1d (k 3, pad 1) + gelu, conv1d (k 3, stride 2, pad 1) + gelu, pre-norm layers whose queries and
keys are rotated on their first ``rope_dim`` dims (rotate-half pairs, as ``apply_rotary_pos_emb``), a final
LayerNorm, ``stack_factor`` frames stacked, and the adapter (linear, gelu, linear). The remote layout also has the
begin/end-of-audio embeddings placed around the adapter's output (``a.boa`` / ``a.eoa``).

The header keys and the table of tensor names and shapes the runtime checks are in :mod:`.rope_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import gguf
import numpy as np

from chatglm.convert.config_types import shown
from chatglm.convert.family import OutTensor
from chatglm.convert.mmproj import KEY_HAS_AUDIO, KEY_HAS_VISION, Projector
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.families.glm_asr.rope_layout import (KEY_BOA, KEY_EPS, KEY_K_BIAS, KEY_THETA, KEYS, POSITIONS,
                                                  PROJECTOR_TYPE, RopeEncoderParams, expected_tensors)

@dataclass(frozen=True)
class Layout:
    """Where one checkpoint layout keeps each part (``{i}``: the layer)."""

    conv: str
    layer: str
    names: tuple[tuple[str, str], ...]  # (our name in a.blk.{i}., the source module in the layer)
    post_norm: str
    mlp: tuple[str, str]
    boa_eoa: Optional[str]


HF_LAYOUT = Layout("model.audio_tower.", "model.audio_tower.layers.{i}.",
                   (("ln1", "input_layernorm"), ("attn_q", "self_attn.q_proj"), ("attn_k", "self_attn.k_proj"),
                    ("attn_v", "self_attn.v_proj"), ("attn_out", "self_attn.o_proj"),
                    ("ln2", "post_attention_layernorm"), ("ffn_up", "mlp.fc1"), ("ffn_down", "mlp.fc2")),
                   "model.audio_tower.norm", ("model.multi_modal_projector.linear_1",
                                              "model.multi_modal_projector.linear_2"), None)
REMOTE_LAYOUT = Layout("audio_encoder.whisper.", "audio_encoder.whisper.layers.{i}.",
                       (("ln1", "self_attn_layer_norm"), ("attn_q", "self_attn.q_proj"),
                        ("attn_k", "self_attn.k_proj"), ("attn_v", "self_attn.v_proj"),
                        ("attn_out", "self_attn.out_proj"), ("ln2", "final_layer_norm"), ("ffn_up", "fc1"),
                        ("ffn_down", "fc2")),
                       "audio_encoder.layer_norm", ("audio_encoder.adapting.0", "audio_encoder.adapting.2"),
                       "audio_encoder.audio_bos_eos_token.weight")


def _rope_dim(head_dim: int, rope: object, fail) -> tuple[int, float]:
    """(rotated dims, theta) of a ``rope_parameters``-like dict (transformers' defaults: half the head, 10000)."""
    rope = rope if isinstance(rope, dict) else {}
    kind = rope.get("rope_type", "default")
    if kind != "default":
        raise fail(f"audio encoder rope type {shown(kind)} is not supported (only the default rope)")
    factor, theta = rope.get("partial_rotary_factor", 0.5), rope.get("rope_theta", 10000.0)
    for key, v in (("partial_rotary_factor", factor), ("rope_theta", theta)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise fail(f"audio encoder {key} must be a positive number, got {shown(v)}")
    dim = int(head_dim * factor)
    if dim < 2 or dim % 2 or dim > head_dim:
        raise fail(f"audio encoder rotates {dim} of {head_dim} head dims (partial_rotary_factor {factor}): "
                   "it must be even, 2..head_dim")
    return dim, float(theta)


class RopeEncoderProjector(Projector):
    """The rotary encoder and adapter of either layout (``family.layout``)."""

    projector_type = PROJECTOR_TYPE
    f32_tensors = ("a.boa", "a.eoa")

    def __init__(self, family, remote: bool):
        super().__init__(family)
        self.layout = REMOTE_LAYOUT if remote else HF_LAYOUT
        self.params = (self._remote if remote else self._hf)(family.full, family)
        p = self.params
        held = family.held_indices(self.layout.layer.replace(".", r"\.").replace("{i}", r"(\d+)"))
        if len(held) < p.n_layer:
            raise family.bad(f"the audio encoder declares {p.n_layer} layers but the checkpoint holds {len(held)}")
        if remote:  # the learned position table rotary positions replace
            family.ignored_sources = (*family.ignored_sources, r"audio_encoder\.whisper\.embed_positions\.weight")
        k_bias = self.layout.layer.format(i=0) + "self_attn.k_proj.bias"
        if k_bias in self.ckpt.names():
            self.params = p = RopeEncoderParams(**{**p.__dict__, "k_bias": True})

    @staticmethod
    def _ints(cfg: dict, where: str, keys: dict[str, str], family) -> dict[str, int]:
        out = {}
        for field, key in keys.items():
            v = cfg.get(key)
            if type(v) is not int or not 1 <= v <= 1 << 20:
                raise family.bad(f"{where}.{key} must be a positive integer, got {shown(v)}")
            out[field] = v
        return out

    @classmethod
    def _check(cls, family, d: int, n_head: int, n_head_kv: int, acts: dict[str, object]) -> None:
        for key, act in acts.items():
            if act != "gelu":
                raise UnsupportedModelError(f"{key}={shown(act)} is not supported (the encoder graph takes 'gelu')",
                                            family.config_path)
        if d % n_head or n_head % n_head_kv:
            raise family.bad(f"the audio encoder's width {d} / {n_head} heads / {n_head_kv} key-value heads do "
                             "not divide")

    @classmethod
    def _hf(cls, full: dict, family) -> RopeEncoderParams:
        ac = full.get("audio_config")
        if not isinstance(ac, dict):
            raise family.bad("'audio_config' must be an object (the audio encoder's config)")
        n = cls._ints(ac, "audio_config", {"d": "hidden_size", "n_ff": "intermediate_size",
                                           "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                                           "n_mel": "num_mel_bins", "n_pos": "max_position_embeddings"}, family)
        kv = ac.get("num_key_value_heads") or n["n_head"]
        if type(kv) is not int or not 1 <= kv <= n["n_head"]:
            raise family.bad(f"audio_config.num_key_value_heads must be an integer in 1..{n['n_head']}, got "
                             f"{shown(kv)}")
        cls._check(family, n["d"], n["n_head"], kv,
                   {"audio_config.hidden_act": ac.get("hidden_act", "gelu"),
                    "projector_hidden_act": full.get("projector_hidden_act", "gelu")})
        # get_audio_features stacks frames to audio_config.intermediate_size and counts tokens with a factor of 4
        if n["n_ff"] != 4 * n["d"]:
            raise UnsupportedModelError(f"audio_config.intermediate_size {n['n_ff']} is not 4 x hidden_size "
                                        f"{n['d']} (transformers stacks 4 frames to that width)", family.config_path)
        dim, theta = _rope_dim(n["d"] // n["n_head"], ac.get("rope_parameters"), family.bad)
        return RopeEncoderParams(**n, n_head_kv=kv, n_out=family.hp.n_embd, stack=4, rope_dim=dim, theta=theta)

    @classmethod
    def _remote(cls, full: dict, family) -> RopeEncoderParams:
        wc = full.get("whisper_config")
        if not isinstance(wc, dict):
            raise family.bad("'whisper_config' must be an object (the audio encoder's config)")
        n = cls._ints(wc, "whisper_config", {"d": "d_model", "n_ff": "encoder_ffn_dim", "n_layer": "encoder_layers",
                                             "n_head": "encoder_attention_heads", "n_mel": "num_mel_bins",
                                             "n_pos": "max_source_positions"}, family)
        if full.get("adapter_type", "mlp") != "mlp":
            raise UnsupportedModelError(f"adapter_type={shown(full.get('adapter_type'))} is not supported (only "
                                        "'mlp')", family.config_path)
        cls._check(family, n["d"], n["n_head"], n["n_head"],
                   {"whisper_config.activation_function": wc.get("activation_function", "gelu"),
                    "mlp_adapter_act": full.get("mlp_adapter_act", "gelu")})
        stack = full.get("merge_factor", 2)
        if type(stack) is not int or not 1 <= stack <= 64 or POSITIONS % stack:
            raise family.bad(f"'merge_factor' must be an integer in 1..64 dividing {POSITIONS}, got {shown(stack)}")
        # the remote config names no rotary settings: those transformers' port of it defaults to
        dim, theta = _rope_dim(n["d"] // n["n_head"], wc.get("rope_parameters"), family.bad)
        return RopeEncoderParams(**n, n_head_kv=n["n_head"], n_out=family.hp.n_embd, stack=stack, rope_dim=dim,
                                 theta=theta, boa_eoa=True)

    def write_metadata(self, w: gguf.GGUFWriter) -> None:
        p = self.params
        w.add_bool(KEY_HAS_VISION, False)
        w.add_bool(KEY_HAS_AUDIO, True)
        for field, key in KEYS.items():
            w.add_uint32(key, getattr(p, field))
        w.add_float32(KEY_EPS, p.eps)
        w.add_float32(KEY_THETA, p.theta)
        w.add_bool(KEY_K_BIAS, p.k_bias)
        w.add_bool(KEY_BOA, p.boa_eoa)

    def _sources(self) -> dict[str, str]:
        """our name -> source tensor name, for every tensor but the begin/end-of-audio rows."""
        lay, p = self.layout, self.params
        out = {f"a.conv1d.{j}.{s}": f"{lay.conv}conv{j}.{s}" for j in (1, 2) for s in ("weight", "bias")}
        out.update({f"a.post_norm.{s}": f"{lay.post_norm}.{s}" for s in ("weight", "bias")})
        out.update({f"mm.a.mlp.{j}.{s}": f"{lay.mlp[j - 1]}.{s}" for j in (1, 2) for s in ("weight", "bias")})
        for i in range(p.n_layer):
            for ours, theirs in lay.names:
                for s in ("weight", "bias"):
                    out[f"a.blk.{i}.{ours}.{s}"] = lay.layer.format(i=i) + f"{theirs}.{s}"
        return out

    def tensors(self) -> list[OutTensor]:
        shapes = expected_tensors(self.params)
        sources = self._sources()
        plan = [OutTensor(name, tuple(reversed(shape)), (sources[name],)) for name, shape in shapes.items()
                if name in sources]
        if self.layout.boa_eoa:
            table = self.layout.boa_eoa
            plan += [OutTensor("a.boa", (self.params.n_out,), (table,), _row(0)),
                     OutTensor("a.eoa", (self.params.n_out,), (table,), _row(1))]
        return plan

    def check_shapes(self, plan: list[OutTensor]) -> None:
        super().check_shapes(plan)
        table = self.layout.boa_eoa
        if table:
            shape = tuple(self.ckpt.info(table).shape)
            if shape != (2, self.params.n_out):
                raise InputError(f"tensor {table!r} is {shape}, expected (2, {self.params.n_out})",
                                 self.ckpt.file_of(table))


def _row(i: int):
    def build(arrays) -> np.ndarray:
        return np.ascontiguousarray(arrays[0][i])
    return build

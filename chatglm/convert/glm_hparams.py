"""The hyperparameters llama.cpp's GLM architectures (``chatglm``, ``glm4``, ``glm4moe``) read, shared by the
THUDM-layout and transformers-layout converters."""

from __future__ import annotations

import gguf


def write_hparams(w: gguf.GGUFWriter, hp, n_rot: int, n_block: int | None = None) -> None:
    """The hyperparameters llama.cpp's GLM architectures read (RMSNorm, GQA, partial rotary of ``n_rot`` dims);
    ``n_block`` counts MTP layers too (default: ``hp.n_layer``)."""
    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_feed_forward_length(hp.n_ff)
    w.add_block_count(hp.n_layer if n_block is None else n_block)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    if hp.head_dim * hp.n_head != hp.n_embd:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_layer_norm_rms_eps(hp.eps)
    w.add_rope_dimension_count(n_rot)
    w.add_rope_freq_base(hp.rope_base)
    scale = getattr(hp, "rope_scale", 1.0)
    if scale != 1.0:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scale)

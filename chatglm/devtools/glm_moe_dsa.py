"""Tiny GLM-5.x (``GlmMoeDsaForCausalLM``) checkpoints in the published layout (development and tests only).

Built with transformers' own class and seeded random weights (the scales of :mod:`chatglm.devtools.glm4`), then
saved as users get them: per-expert tensors, the MTP layer appended as ``model.layers.{L}`` (the last layer's tensors
plus ``eh_proj``, ``enorm``, ``hnorm``, ``shared_head.norm``, ``embed_tokens``, ``shared_head.head``), sharded
safetensors with ``model.safetensors.index.json``, config.json as transformers writes it (``rope_parameters``,
``mlp_layer_types``, ``indexer_types``), tokenizer.json and tokenizer_config.json from the tiny GLM-4 BPE.

The indexer gets 16 heads: with few heads its ReLU scores often tie at zero, and torch and llama.cpp break such
ties differently. ``index_topk`` is small so that any test sequence longer than it runs the sparse path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from chatglm.devtools.checkpoints import _write_weights
from chatglm.devtools.glm4 import FIXTURE_TEMPLATES, nextn_layer, published_state, randomize, tokenizer_config

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

TINY_DSA: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32,
    "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 8,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5,
    "norm_topk_prob": True, "n_group": 1, "topk_group": 1, "index_topk": 8, "index_head_dim": 64,
    "index_n_heads": 16, "indexer_types": ["full", "shared", "full"], "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "attention_bias": False, "tie_word_embeddings": False, "hidden_act": "silu",
    "pad_token_id": None, "eos_token_id": None, "bos_token_id": None,
}


def tiny_dsa_model(vocab_size: int, seed: int = 0, rope_theta: float = 10000.0, **overrides: Any):
    """A float32 ``GlmMoeDsaForCausalLM`` with seeded random weights (see :func:`chatglm.devtools.glm4.tiny_model`)."""
    import torch
    import transformers

    settings = {**TINY_DSA, **overrides, "vocab_size": vocab_size}
    settings["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    config = transformers.GlmMoeDsaConfig(**settings)
    model = transformers.GlmMoeDsaForCausalLM(config).to(torch.float32).eval()
    randomize(model, seed)
    return model


def save_dsa_checkpoint(model, out_dir: str | Path, tok: "tokenizers.Tokenizer", *, dtype: str = "float32",
                        shards: int = 2, mtp: bool = True, chat_template: Optional[str] = FIXTURE_TEMPLATES["glm45"],
                        seed: int = 1) -> Path:
    """The published layout (see the module docstring); ``dtype`` "bfloat16" stores every tensor as bf16."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = published_state(model)
    if mtp:
        state.update(nextn_layer(model, seed))
    if dtype == "bfloat16":
        state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    _write_weights(state, out, shards)
    cfg = model.config.to_dict()
    for key in ("transformers_version", "output_router_logits"):
        cfg.pop(key, None)
    cfg.update({"architectures": [type(model).__name__], "dtype": dtype,
                "num_nextn_predict_layers": 1 if mtp else 0})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = tokenizer_config(tok, chat_template, tokenizer_class="PreTrainedTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    return out


def build_dsa_checkpoint(out_dir: str | Path, tok: "tokenizers.Tokenizer", *, seed: int = 0, extra_rows: int = 7,
                         dtype: str = "float32", shards: int = 2, mtp: bool = True, **overrides: Any):
    """A tiny GLM-5.x model saved under ``out_dir``; returns (float32 transformers model, folder). With ``dtype``
    "bfloat16" the model's weights are rounded to bf16 too, so it is the reference for the saved file."""
    import torch

    model = tiny_dsa_model(tok.get_vocab_size() + extra_rows, seed=seed, **overrides)
    if dtype == "bfloat16":
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(torch.bfloat16).to(torch.float32))
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(buf.to(torch.bfloat16).to(torch.float32))
    return model, save_dsa_checkpoint(model, out_dir, tok, dtype=dtype, shards=shards, mtp=mtp, seed=seed + 1)

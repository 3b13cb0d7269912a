"""Tiny GLM-4.7-Flash (``Glm4MoeLiteForCausalLM``) checkpoints in the published layout (development and tests only).

The model is built with transformers' own class and seeded random weights (the scales of ``glm4.tiny_model``), then
saved as users download it: per-expert tensors, the multi-token-prediction layer appended as ``model.layers.{L}``
(a copy of the last decoder layer plus ``eh_proj``/``enorm``/``hnorm``/``shared_head.norm``), sharded safetensors
with ``model.safetensors.index.json``, float32 or bfloat16, config.json as transformers saves it (``rope_parameters``,
``mlp_layer_types``) and the tiny GLM-4.5 tokenizer of ``glm4.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from chatglm.devtools.glm4 import FIXTURE_TEMPLATES, nextn_layer, published_state, randomize, tokenizer_config

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers
    import torch

TINY_LITE: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 4, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
    "v_head_dim": 16, "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "routed_scaling_factor": 1.8, "norm_topk_prob": True, "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
    "rope_interleave": True, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
}


def tiny_lite_model(vocab_size: int, seed: int = 0, rope_theta: float = 10000.0, **overrides: Any):
    """A float32 ``Glm4MoeLiteForCausalLM`` with seeded random weights (score-correction biases included)."""
    import torch
    import transformers

    settings = {**TINY_LITE, **overrides, "vocab_size": vocab_size}
    settings["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta}
    config = transformers.Glm4MoeLiteConfig(**settings)
    model = transformers.Glm4MoeLiteForCausalLM(config).to(torch.float32).eval()
    randomize(model, seed)
    return model


def round_to_bf16(model) -> None:
    """Round every parameter to bfloat16 in place (the reference for a checkpoint saved in bf16)."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).to(torch.float32))


def save_sharded(state: dict[str, "torch.Tensor"], out: Path, shards: int) -> None:
    """``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``, as transformers shards."""
    from safetensors.torch import save_file

    names = sorted(state)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for i in range(shards):
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n] for n in names[i * per:(i + 1) * per]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
        total += sum(t.numel() * t.element_size() for t in part.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def save_lite_checkpoint(model, out_dir: str | Path, tok: "tokenizers.Tokenizer", *, bf16: bool = False,
                         mtp: bool = True, shards: int = 2, chat_template: Optional[str] = FIXTURE_TEMPLATES["glm45"],
                         config_overrides: Optional[dict[str, Any]] = None) -> Path:
    """The published GLM-4.7-Flash layout of ``model``: see the module docstring."""
    import torch

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = published_state(model)
    if mtp:
        state.update(nextn_layer(model))
    if bf16:  # the router's score-correction bias stays float32, as in the published files
        state = {k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16) for k, v in state.items()}
    save_sharded(state, out, shards)
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg.update({"num_nextn_predict_layers": 1 if mtp else 0, "dtype": "bfloat16" if bf16 else "float32",
                **(config_overrides or {})})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = tokenizer_config(tok, chat_template, tokenizer_class="PreTrainedTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    return out


def build_lite_checkpoint(out_dir: str | Path, tok: "tokenizers.Tokenizer", *, seed: int = 0, extra_rows: int = 7,
                          bf16: bool = False, mtp: bool = True, **overrides: Any):
    """A tiny GLM-4.7-Flash saved under ``out_dir``; returns (transformers model, folder). With ``bf16`` the model's
    weights are rounded to bfloat16 first, so it stays the exact float32 reference of the saved file."""
    model = tiny_lite_model(tok.get_vocab_size() + extra_rows, seed=seed, **overrides)
    if bf16:
        round_to_bf16(model)
    return model, save_lite_checkpoint(model, out_dir, tok, bf16=bf16, mtp=mtp)

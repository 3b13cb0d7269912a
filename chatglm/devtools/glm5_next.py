"""A tiny GLM-5.3-Flash (``Glm5NextForConditionalGeneration``) checkpoint as users download it (tests only).

Built with transformers' own classes and seeded random weights, saved by ``save_pretrained`` (so the tensor names
and config.json are what transformers writes: ``model.language_model.*``, a nested ``text_config`` with flat
``linear_*`` keys, the vision tower under ``model.visual.*``), sharded, optionally in bfloat16, plus the NextN (MTP)
layer in the published layout (``layers.{L}.`` with ``eh_proj``, ``enorm``, ``hnorm``, ``shared_head.norm`` and a full
latent-attention decoder layer) that transformers leaves out when loading.

The shape: 4 layers (linear, latent with a full indexer, latent sharing that selection, linear), a dense first MLP
then experts, an indexer of 16 heads (fewer make its ReLU scores tie at zero, and torch and llama.cpp break ties
differently), k-pools of 4 and ``index_topk`` 8 (two pools): a test sequence of 80 tokens runs the sparse selection
and more than one 64-token chunk of the linear attention.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from chatglm.devtools.glm4 import _random_like, tokenizer_config
from chatglm.devtools.glm_vision import save_image_processor

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers
    import torch

TEXT: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "routed_scaling_factor": 2.5, "kv_lora_rank": 32, "q_lora_rank": 48,
    "qk_rope_head_dim": 0, "qk_nope_head_dim": 16, "v_head_dim": 16, "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5, "index_topk": 8, "index_kpool": 4, "index_head_dim": 16, "index_n_heads": 16,
    "linear_head_dim": 16, "linear_num_heads": 4, "linear_conv_kernel_dim": 4, "linear_lower_bound": -5.0,
    "swiglu_limit": 3.0, "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6,
    "layer_types": ["linear_attention", "indexed_attention", "indexed_attention", "linear_attention"],
    "indexer_types": ["full", "full", "shared", "full"],
    "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
    "tie_word_embeddings": False, "pad_token_id": None, "eos_token_id": None, "bos_token_id": None,
}
VISION: dict[str, Any] = {
    "depth": 1, "hidden_size": 32, "num_heads": 2, "intermediate_size": 48, "out_hidden_size": 64,
    "projection_intermediate_size": 48, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
}
#: transformers keeps these in float32 whatever the model's dtype (_keep_in_fp32_modules_strict).
FP32_KEPT = ("e_score_correction_bias", "gate.weight", "conv1d", "dt_bias", "A_log", "hc_attn_base", "hc_attn_scale",
             "hc_ffn_base", "hc_ffn_scale")
FIXTURE_TEMPLATE = ("[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_model(vocab_size: int, seed: int = 0, bf16_values: bool = False, *, vision: Optional[dict] = None,
               top: Optional[dict] = None, **text: Any):
    """A float32 ``Glm5NextForConditionalGeneration`` with seeded random weights (``bf16_values``: every weight
    transformers would save in bfloat16 rounded to it, so a bfloat16 checkpoint holds this model exactly);
    ``vision`` overrides vision_config keys, ``top`` sets top-level keys (the image token ids)."""
    import torch
    import transformers

    config = transformers.Glm5NextConfig(text_config={**TEXT, **text, "vocab_size": vocab_size},
                                         vision_config={**VISION, **(vision or {})}, **(top or {}))
    model = transformers.Glm5NextForConditionalGeneration(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = _random_like(name, param, gen)
            if name.endswith(("A_log", "dt_bias")):
                value = 0.5 * torch.randn(param.shape, generator=gen)
            if bf16_values and not _kept_fp32(name):
                value = value.to(torch.bfloat16).to(torch.float32)
            param.copy_(value)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))
    return model


def _kept_fp32(name: str) -> bool:
    published = name.replace("attn_hc.", "hc_attn_").replace("ffn_hc.", "hc_ffn_")
    return any(k in name or k in published for k in FP32_KEPT) or ".mlp.gate.weight" in name


def nextn_layer(model, seed: int = 1) -> dict[str, "torch.Tensor"]:
    """The NextN layer ``layers.{L}.`` in the published layout: layer 1's latent attention (full indexer) and expert
    MLP, its norms, and the MTP projections, all random."""
    import torch

    from chatglm.devtools.glm4 import published_state

    gen = torch.Generator().manual_seed(seed)
    text = model.config.text_config
    n, h, v = text.num_hidden_layers, text.hidden_size, text.vocab_size
    source = "model.language_model.layers.1."
    state = _saved_names(published_state(model))
    out = {k.replace(source, f"model.language_model.layers.{n}."): torch.randn(t.shape, generator=gen) * t.std()
           for k, t in state.items() if k.startswith(source) and ".hc_" not in k}
    extra = {"eh_proj.weight": (h, 2 * h), "enorm.weight": (h,), "hnorm.weight": (h,),
             "shared_head.norm.weight": (h,), "shared_head.head.weight": (v, h)}
    out.update({f"model.language_model.layers.{n}.{k}": torch.randn(shape, generator=gen)
                for k, shape in extra.items()})
    return out


def _saved_names(state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """Module names as save_pretrained writes them (the published names) for the layers copied into NextN."""
    renames = (("attn_hc.", "hc_attn_"), ("ffn_hc.", "hc_ffn_"), ("forget_gate.", ""))
    out = {}
    for name, value in state.items():
        for old, new in renames:
            name = name.replace(old, new)
        out[name] = value
    return out


def save_checkpoint(model, out_dir: str | Path, tok: "tokenizers.Tokenizer", *, bf16: bool = False,
                    shard_size: str = "200KB", nextn: bool = True,
                    chat_template: Optional[str] = FIXTURE_TEMPLATE) -> Path:
    """``save_pretrained`` (sharded), then bfloat16 shards if asked, the NextN layer as one more shard, and the
    tokenizer files."""
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    model.save_pretrained(out, max_shard_size=shard_size)
    index_path = out / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    if bf16:
        for shard in shards:
            state = load_file(out / shard)
            state = {k: v if any(f in k for f in FP32_KEPT) or ".mlp.gate.weight" in k else v.to(torch.bfloat16)
                     for k, v in state.items()}
            save_file(state, str(out / shard), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    if nextn:
        extra = {k: v.contiguous() for k, v in nextn_layer(model).items()}
        if bf16:
            extra = {k: v.to(torch.bfloat16) for k, v in extra.items()}
        name = "model-nextn.safetensors"
        save_file(extra, str(out / name), metadata={"format": "pt"})
        index["weight_map"].update(dict.fromkeys(extra, name))
        index_path.write_text(json.dumps(index, indent=2) + "\n")
        config["text_config"]["num_nextn_predict_layers"] = 1
    config["dtype"] = "bfloat16" if bf16 else "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = tokenizer_config(tok, chat_template, tokenizer_class="PreTrainedTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    save_image_processor(out, model.config.vision_config, "Glm5NextImageProcessor", min_image_tokens=16,
                         max_image_tokens=1024)
    return out


def reference_logits(model, ids) -> "Any":
    """Float32 logits (T, vocab) of the model for one sequence, text only."""
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([list(ids)])).logits[0].float().numpy()


def build_vision_checkpoint(out_dir: str | Path, tok: "tokenizers.Tokenizer", *, seed: int = 0):
    """A tiny GLM-5.3-Flash whose vision tower is exercised (``tok``: ``glm4v.vision_tokenizer()``, image token ids
    in config.json, swiglu_limit 2.0 so the clamps bite, the vision fixture template): (model, folder)."""
    from chatglm.devtools.glm_vision import VISION_TEMPLATE, token_ids

    model = tiny_model(tok.get_vocab_size() + 7, seed=seed, vision={"swiglu_limit": 2.0, "image_size": 112},
                       top=token_ids(tok))
    return model, save_checkpoint(model, out_dir, tok, chat_template=VISION_TEMPLATE, nextn=False)

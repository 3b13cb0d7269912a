"""Tiny ChatGLM2/3 checkpoints in the published Hugging Face layout, built from transformers' ``GlmForCausalLM``.

Development only: nothing in the runtime imports this module. torch, transformers and safetensors are imported inside
the functions that need them.

Layout written by :func:`save_chatglm_checkpoint` (checked against the published ``modeling_chatglm.py`` and
``config.json`` of THUDM/chatglm2-6b and THUDM/chatglm3-6b):

==============================================================  ==========================================
published key                                                   transformers ``GlmForCausalLM`` key
==============================================================  ==========================================
transformer.embedding.word_embeddings.weight                    model.embed_tokens.weight
transformer.rotary_pos_emb.inv_freq                             (computed: base ** -(arange(0, d, 2) / d),
                                                                d = kv_channels // 2)
transformer.encoder.layers.{i}.input_layernorm.weight           model.layers.{i}.input_layernorm.weight
transformer.encoder.layers.{i}.self_attention.query_key_value   q_proj, k_proj, v_proj stacked as row blocks
transformer.encoder.layers.{i}.self_attention.dense.weight      model.layers.{i}.self_attn.o_proj.weight
transformer.encoder.layers.{i}.post_attention_layernorm.weight  model.layers.{i}.post_attention_layernorm.weight
transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight         model.layers.{i}.mlp.gate_up_proj.weight
transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight         model.layers.{i}.mlp.down_proj.weight
transformer.encoder.final_layernorm.weight                      model.norm.weight
transformer.output_layer.weight                                 lm_head.weight
==============================================================  ==========================================
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chatglm.devtools.sptrain import (  # re-exported: one import site for test helpers
    DEFAULT_SP_VOCAB,
    SPECIAL_TOKENS,
    sp_vocab_size,
    special_token_ids,
    train_sentencepiece,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from transformers import GlmConfig, GlmForCausalLM

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SP_VOCAB",
    "SPECIAL_TOKENS",
    "greedy_generate",
    "load_chatglm_checkpoint",
    "reference_logits",
    "save_chatglm_checkpoint",
    "special_token_ids",
    "tiny_glm_config",
    "tiny_glm_model",
    "train_sentencepiece",
]

PUBLISHED_REPO = {"chatglm2": "THUDM/chatglm2-6b", "chatglm3": "THUDM/chatglm3-6b"}
DTYPES = ("float32", "float16", "bfloat16")
ROPE_BASE = 10000.0

_LAYER = "transformer.encoder.layers.{i}."
_HF_LAYER = "model.layers.{i}."
#: published suffix -> transformers suffix, for the per-layer tensors copied unchanged.
_LAYER_DIRECT = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_GLOBAL_DIRECT = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}

TINY_DEFAULTS: dict[str, Any] = {
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "pad_token_id": 0,
    "eos_token_id": 2,
    "bos_token_id": None,
    "attention_bias": True,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
}


# --------------------------------------------------------------------------------------------------- model building


def tiny_glm_config(**overrides: Any) -> GlmConfig:
    """A small ``GlmConfig`` (ChatGLM2/3 shape: partial rotary 0.5, qkv bias, GQA); ``rope_theta=`` and
    ``rope_linear=`` (linear position interpolation) are accepted."""
    from transformers import GlmConfig

    unknown = set(overrides) - set(TINY_DEFAULTS) - {"rope_theta", "rope_linear"}
    if unknown:
        raise TypeError(f"tiny_glm_config: unknown settings {sorted(unknown)}")
    settings = {**TINY_DEFAULTS, **overrides}
    theta = float(settings.pop("rope_theta", ROPE_BASE))
    linear = float(settings.pop("rope_linear", 1.0))  # positions divided by this (ChatGLM2-6B-32K's rope_ratio)
    settings["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": 0.5}
    if linear != 1.0:
        settings["rope_parameters"].update(rope_type="linear", factor=linear)
    return GlmConfig(**settings)


def tiny_glm_model(seed: int = 0, **config: Any) -> GlmForCausalLM:
    """A float32 ``GlmForCausalLM`` with every parameter drawn from a seeded generator.

    Scales keep activations O(1): linear weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), qkv biases ~ N(0, 0.5^2),
    norm weights ~ U(0.5, 1.5), so a wrong row order, a swapped gate/up half or a dropped bias changes the logits.
    """
    import torch
    from transformers import GlmForCausalLM

    model = GlmForCausalLM(tiny_glm_config(**config)).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_random_like(name, param, gen))
    return model


def _random_like(name: str, param: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    import torch

    if name.endswith("norm.weight"):
        return 0.5 + torch.rand(param.shape, generator=gen)
    if name.endswith(".bias"):
        return 0.5 * torch.randn(param.shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(param.shape, generator=gen)
    fan_in = param.shape[-1]
    return torch.randn(param.shape, generator=gen) / math.sqrt(fan_in)


def reference_logits(model: GlmForCausalLM, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Float32 logits of every position, shape (T, vocab) for 1-D ``ids`` or (B, T, vocab) for 2-D."""
    import torch

    arr = np.asarray(ids, dtype=np.int64)
    batch = arr[None, :] if arr.ndim == 1 else arr  # (B, T)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(batch), use_cache=False).logits  # (B, T, V)
    logits = out.to(torch.float32).numpy()
    return logits[0] if arr.ndim == 1 else logits


def greedy_generate(
    model: GlmForCausalLM, prompt: Sequence[int], stop_ids: Sequence[int], max_new_tokens: int = 64
) -> list[int]:
    """Greedy continuation of ``prompt`` (full recompute per token: for tiny models); includes the stop id if hit."""
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits  # (1, T, V)
            nxt = int(logits[0, -1].argmax())
            ids.append(nxt)
            if nxt in stop_ids:
                break
    return ids[len(prompt) :]


# --------------------------------------------------------------------------------------------------- repacking


def _rope_theta(config: GlmConfig) -> float:
    params = config.rope_parameters or {}
    return float(params.get("rope_theta", ROPE_BASE))


def _rope_linear(config: GlmConfig) -> float:
    params = config.rope_parameters or {}
    return float(params.get("factor", 1.0)) if params.get("rope_type") == "linear" else 1.0


def inv_freq(kv_channels: int, rope_theta: float = ROPE_BASE) -> np.ndarray:
    """The published ``rotary_pos_emb.inv_freq``: kv_channels // 4 float32 frequencies."""
    dim = kv_channels // 2
    return (1.0 / rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim)).astype(np.float32)


def to_published_state(model: GlmForCausalLM) -> dict[str, torch.Tensor]:
    """Repack a transformers state dict into published ChatGLM names, in the published key order."""
    import torch

    cfg = model.config
    hf = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    out["transformer.embedding.word_embeddings.weight"] = hf["model.embed_tokens.weight"]
    out["transformer.rotary_pos_emb.inv_freq"] = torch.from_numpy(inv_freq(cfg.head_dim, _rope_theta(cfg)))
    for i in range(cfg.num_hidden_layers):
        src, dst = _HF_LAYER.format(i=i), _LAYER.format(i=i)
        out[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        attn = src + "self_attn."
        # (q_rows + 2 * kv_rows, hidden): q, k, v as consecutive row blocks
        qkv = [hf[attn + p + "_proj.weight"] for p in "qkv"]
        out[dst + "self_attention.query_key_value.weight"] = torch.cat(qkv, dim=0)
        if cfg.attention_bias:
            out[dst + "self_attention.query_key_value.bias"] = torch.cat([hf[attn + p + "_proj.bias"] for p in "qkv"])
        for pub in ("self_attention.dense.weight", "post_attention_layernorm.weight"):
            out[dst + pub] = hf[src + _LAYER_DIRECT[pub]]
        for pub in ("mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.weight"):
            out[dst + pub] = hf[src + _LAYER_DIRECT[pub]]
    out["transformer.encoder.final_layernorm.weight"] = hf["model.norm.weight"]
    out["transformer.output_layer.weight"] = hf["lm_head.weight"]
    return out


def from_published_state(state: Mapping[str, torch.Tensor], config: GlmConfig) -> dict[str, torch.Tensor]:
    """Inverse of :func:`to_published_state`; raises ``KeyError`` listing unused or missing published keys."""
    hf: dict[str, Any] = {}
    used: set[str] = {"transformer.rotary_pos_emb.inv_freq"}
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    for pub, name in _GLOBAL_DIRECT.items():
        hf[name] = state[pub]
        used.add(pub)
    for i in range(config.num_hidden_layers):
        src, dst = _LAYER.format(i=i), _HF_LAYER.format(i=i)
        for pub, name in _LAYER_DIRECT.items():
            hf[dst + name] = state[src + pub]
            used.add(src + pub)
        suffixes = ("weight", "bias") if config.attention_bias else ("weight",)
        for suffix in suffixes:
            key = src + "self_attention.query_key_value." + suffix
            q, k, v = state[key].split([q_rows, kv_rows, kv_rows], dim=0)
            hf[dst + "self_attn.q_proj." + suffix] = q
            hf[dst + "self_attn.k_proj." + suffix] = k
            hf[dst + "self_attn.v_proj." + suffix] = v
            used.add(key)
    leftover = sorted(set(state) - used)
    if leftover:
        raise KeyError(f"unused checkpoint tensors: {leftover}")
    return hf


# --------------------------------------------------------------------------------------------------- config.json

_AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}


def published_config(config: GlmConfig, family: str, dtype: str, name_or_path: str) -> dict[str, Any]:
    """``config.json`` with every key of the published ChatGLM2/3 file, values taken from ``config``."""
    mqa = config.num_key_value_heads != config.num_attention_heads
    out: dict[str, Any] = {
        "_name_or_path": name_or_path,
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": dict(_AUTO_MAP),
        "add_bias_linear": False,
        "add_qkv_bias": bool(config.attention_bias),
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "classifier_dropout": None,
        "eos_token_id": 2,
        "ffn_hidden_size": config.intermediate_size,
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": config.hidden_size,
        "kv_channels": config.head_dim,
        "layernorm_epsilon": config.rms_norm_eps,
        "multi_query_attention": mqa,
        # the published default is 1 and is ignored unless multi_query_attention is true
        "multi_query_group_num": config.num_key_value_heads if mqa else 1,
        "num_attention_heads": config.num_attention_heads,
        "num_layers": config.num_hidden_layers,
        "original_rope": True,
        "pad_token_id": 0,
        "padded_vocab_size": config.vocab_size,
        "post_layer_norm": True,
        "pre_seq_len": None,
        "prefix_projection": False,
        "quantization_bit": 0,
        "rmsnorm": True,
        "seq_length": config.max_position_embeddings,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.30.2" if family == "chatglm3" else "4.27.1",
        "use_cache": True,
        "vocab_size": config.vocab_size,
    }
    theta, linear = _rope_theta(config), _rope_linear(config)
    if theta != ROPE_BASE and linear != 1.0:
        raise ValueError("rope_ratio is either a base multiplier or a position divisor, not both")
    if linear != 1.0:  # ChatGLM2-6B-32K: its modeling code divides the positions by rope_ratio
        if family != "chatglm2":
            raise ValueError("only ChatGLM2's modeling code reads rope_ratio as a position divisor")
        out["rope_ratio"] = linear
    if theta != ROPE_BASE:  # chatglm3-6b-32k and later multiply the base by rope_ratio; the base models omit it
        if family == "chatglm2":
            raise ValueError("ChatGLM2's modeling code reads rope_ratio as a position divisor, not a base multiplier")
        out["rope_ratio"] = theta / ROPE_BASE
    return out


def glm_config_from_published(cfg: Mapping[str, Any], family: str = "chatglm3") -> GlmConfig:
    """The ``GlmConfig`` that :func:`published_config` came from (for reloading a saved checkpoint)."""
    heads = cfg["num_attention_heads"]
    ratio = float(cfg.get("rope_ratio", 1.0))
    return tiny_glm_config(
        vocab_size=cfg["padded_vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["ffn_hidden_size"],
        num_hidden_layers=cfg["num_layers"],
        num_attention_heads=heads,
        num_key_value_heads=cfg["multi_query_group_num"] if cfg["multi_query_attention"] else heads,
        head_dim=cfg["kv_channels"],
        max_position_embeddings=cfg["seq_length"],
        rms_norm_eps=cfg["layernorm_epsilon"],
        attention_bias=cfg["add_qkv_bias"],
        **({"rope_linear": ratio} if family == "chatglm2" else {"rope_theta": ROPE_BASE * ratio}),
    )


#: The chat template later revisions of THUDM/chatglm3-6b ship in tokenizer_config.json (an approximation of the real
#: token-level format; the converter only reads it as evidence that the tokenizer has the role tokens).
CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop{% endif %}<|{{ message['role'] }}|>\n"
    " {{ message['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def published_tokenizer_config(name_or_path: str, family: str) -> dict[str, Any]:
    """``tokenizer_config.json`` as shipped with ChatGLM2/3 (remote-code tokenizer; ChatGLM3 adds a chat template)."""
    extra = {"chat_template": CHATGLM3_TEMPLATE} if family == "chatglm3" else {}
    return {
        **extra,
        "name_or_path": name_or_path,
        "remove_space": False,
        "do_lower_case": False,
        "padding_side": "left",
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }


# --------------------------------------------------------------------------------------------------- save / load


def _check_savable(model: GlmForCausalLM, tokenizer_model: Path, family: str, dtype: str, shards: int) -> None:
    cfg = model.config
    if family not in SPECIAL_TOKENS:
        raise ValueError(f"family must be one of {sorted(SPECIAL_TOKENS)}, not {family!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, not {dtype!r}")
    if shards < 1:
        raise ValueError(f"shards must be >= 1, not {shards}")
    if cfg.tie_word_embeddings or cfg.hidden_act != "silu":
        raise ValueError("ChatGLM2/3 needs untied embeddings and SwiGLU (hidden_act='silu')")
    if (cfg.rope_parameters or {}).get("partial_rotary_factor") != 0.5:
        raise ValueError("ChatGLM2/3 rotates half of each head: partial_rotary_factor must be 0.5")
    needed = sp_vocab_size(tokenizer_model) + len(SPECIAL_TOKENS[family])
    if needed > cfg.vocab_size:
        raise ValueError(f"vocab_size {cfg.vocab_size} < {needed} (SentencePiece pieces + {family} specials)")


def _shard_groups(names: list[str], sizes: list[int], shards: int) -> list[list[str]]:
    """Split ``names`` (in order) into ``shards`` non-empty runs of roughly equal byte size."""
    if shards > len(names):
        raise ValueError(f"cannot split {len(names)} tensors into {shards} shards")
    target = sum(sizes) / shards
    groups: list[list[str]] = [[]]
    done = 0
    for i, (name, size) in enumerate(zip(names, sizes)):
        left_names, left_groups = len(names) - i, shards - len(groups)
        if groups[-1] and left_groups > 0 and (done >= target * len(groups) or left_names <= left_groups):
            groups.append([])
        groups[-1].append(name)
        done += size
    return groups


def _write_weights(state: Mapping[str, torch.Tensor], out_dir: Path, shards: int) -> list[str]:
    from safetensors.torch import save_file

    if shards == 1:
        save_file(dict(state), str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = list(state)
    sizes = [state[n].numel() * state[n].element_size() for n in names]
    weight_map: dict[str, str] = {}
    files = []
    for k, group in enumerate(_shard_groups(names, sizes, shards), start=1):
        fname = f"model-{k:05d}-of-{shards:05d}.safetensors"
        save_file({n: state[n] for n in group}, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
        files.append(fname)
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def save_chatglm_checkpoint(
    model: GlmForCausalLM,
    out_dir: str | Path,
    tokenizer_model: str | Path,
    *,
    family: str = "chatglm3",
    dtype: str = "float32",
    shards: int = 1,
    extra_config: Mapping[str, Any] | None = None,
    drop_config_keys: Sequence[str] = (),
    name_or_path: str | None = None,
) -> Path:
    """Write ``model`` as a published ChatGLM2/3 folder: config.json, safetensors (+ index), tokenizer files.

    ``extra_config`` entries are merged into config.json last and ``drop_config_keys`` removed after that (to build
    variants and broken configs). ``name_or_path`` defaults to the published repository id of ``family``.
    """
    import torch

    tokenizer_model = Path(tokenizer_model)
    _check_savable(model, tokenizer_model, family, dtype, shards)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = getattr(torch, dtype)
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in to_published_state(model).items()}
    files = _write_weights(state, out, shards)
    repo = PUBLISHED_REPO[family] if name_or_path is None else name_or_path
    cfg = published_config(model.config, family, dtype, repo)
    cfg.update(extra_config or {})
    for key in drop_config_keys:
        cfg.pop(key, None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    (out / "tokenizer.model").write_bytes(tokenizer_model.read_bytes())
    tok_cfg = json.dumps(published_tokenizer_config(repo, family), indent=2, ensure_ascii=False)
    (out / "tokenizer_config.json").write_text(tok_cfg + "\n")
    log.info("wrote %s checkpoint (%s, %s) to %s", family, dtype, ", ".join(files), out)
    return out


def read_published_state(folder: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a saved folder (single file or index + shards), in file order."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(str(folder / "model.safetensors"))
    weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    state: dict[str, torch.Tensor] = {}
    for fname in dict.fromkeys(weight_map.values()):
        state.update(load_file(str(folder / fname)))
    return state


def load_chatglm_checkpoint(folder: str | Path, family: str = "chatglm3") -> GlmForCausalLM:
    """Reload a folder written by :func:`save_chatglm_checkpoint` into a float32 ``GlmForCausalLM`` (strict);
    ``family`` says how its ``rope_ratio`` is read (ChatGLM2: a position divisor)."""
    import torch
    from transformers import GlmForCausalLM

    folder = Path(folder)
    config = glm_config_from_published(json.loads((folder / "config.json").read_text()), family)
    state = read_published_state(folder)
    model = GlmForCausalLM(config).to(torch.float32).eval()
    hf = from_published_state(state, config)
    model.load_state_dict({k: v.to(torch.float32) for k, v in hf.items()}, strict=True)
    return model

"""Tiny GLM-4-family tokenizers and checkpoints in the layouts users download (development and tests only).

Tokenizer: a small byte-level BPE trained with the ``tokenizers`` library on GLM-4's pre-tokenizer regex, then written
out twice: as ``tokenizer.json`` (the Hugging Face layouts) and as tiktoken ranks in ``tokenizer.model`` (the THUDM
layout: ``base64(token bytes) rank`` per line, rank = id, the special tokens after the last rank, listed in
``tokenizer_config.json``'s ``added_tokens_decoder`` as the published files do).

Checkpoints, each built with transformers' own class and seeded random weights:

==========================  ==========================  ===========================================================
layout                      transformers class          files
==========================  ==========================  ===========================================================
THUDM glm-4-9b-chat         ``GlmForCausalLM``          ChatGLM names (see checkpoints.py), tiktoken tokenizer.model
glm-4-9b-chat-hf, GLM-Edge  ``GlmForCausalLM``          transformers names, tokenizer.json
GLM-4-0414, GLM-Z1          ``Glm4ForCausalLM``         transformers names, tokenizer.json
GLM-4.5                     ``Glm4MoeForCausalLM``      per-expert tensors, + the next-token-prediction layer
==========================  ==========================  ===========================================================

config.json is written in the published style (``rope_theta``/``partial_rotary_factor`` at the top level).
Nothing in the runtime imports this module; torch, transformers and tokenizers are imported where needed.
"""

from __future__ import annotations

import base64
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from chatglm.convert.vocab_bpe import GLM4_PATTERN, byte_to_unicode

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers
    import torch

#: GLM-4's special tokens, in id order after the last BPE rank (published tokenizer_config.json).
GLM4_SPECIALS: tuple[str, ...] = (
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)
#: GLM-4.5 adds these after GLM-4's (thinking and XML tool-call markers).
GLM45_EXTRA_SPECIALS: tuple[str, ...] = (
    "/nothink", "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
    "</arg_value>", "<tool_response>", "</tool_response>",
)

# Short templates written for the fixtures: the converter only looks for the markers that tell the formats apart.
FIXTURE_TEMPLATES: dict[str, Optional[str]] = {
    "glm4": "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "glm-edge": "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}<|assistant|>",
    "glm4-0414": "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "glm4-z1": "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n{{ m.content.split('</think>')[-1] }}"
               "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n<think>{% endif %}",
    # None: no template in the checkpoint, so GLM-4.5 converts to its family's builder (a template that is not one
    # of the published ones would take the sandboxed Jinja path instead)
    "glm45": None,
}


# --------------------------------------------------------------------------------------------------- tokenizers


def train_glm4_bpe(texts: Optional[Iterable[str]] = None, vocab_size: int = 1200,
                   specials: Sequence[str] = GLM4_SPECIALS,
                   user_defined: Sequence[str] = ()) -> "tokenizers.Tokenizer":
    """A byte-level BPE with GLM-4's pre-tokenizer; ``specials`` (then ``user_defined``, added tokens that are not
    special, as GLM-4.5's ``<think>``/``<tool_call>`` markers are assumed to be) follow the learned tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from chatglm.devtools.corpus import training_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2)
    tok.train_from_iterator(list(training_texts() if texts is None else texts), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    return tok


def special_ids(tok: "tokenizers.Tokenizer") -> dict[str, int]:
    return {t.content: i for i, t in tok.get_added_tokens_decoder().items()}


def write_tiktoken(tok: "tokenizers.Tokenizer", path: str | Path) -> Path:
    """The learned tokens as tiktoken ranks: ``base64(bytes) id`` per line, in id order."""
    unspell = {ch: b for b, ch in enumerate(byte_to_unicode())}
    vocab = tok.get_vocab(with_added_tokens=False)
    lines = []
    for text, token_id in sorted(vocab.items(), key=lambda kv: kv[1]):
        data = bytes(unspell[ch] for ch in text)
        lines.append(f"{base64.b64encode(data).decode('ascii')} {token_id}\n")
    path = Path(path)
    path.write_text("".join(lines), encoding="ascii")
    return path


def tokenizer_config(tok: "tokenizers.Tokenizer", chat_template: Optional[str], **extra: Any) -> dict[str, Any]:
    """``tokenizer_config.json`` with ``added_tokens_decoder`` as transformers writes it."""
    decoder = {
        str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": t.special}
        for i, t in sorted(tok.get_added_tokens_decoder().items())
    }
    out: dict[str, Any] = {"added_tokens_decoder": decoder, "clean_up_tokenization_spaces": False,
                           "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "padding_side": "left"}
    if chat_template is not None:
        out["chat_template"] = chat_template
    out.update(extra)
    return out


def tiktoken_encoding(tokenizer_model: str | Path):
    """A ``tiktoken.Encoding`` built the way the published ChatGLM4Tokenizer builds it (no special tokens)."""
    import tiktoken

    ranks = {}
    for line in Path(tokenizer_model).read_text(encoding="ascii").splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="glm4-fixture", pat_str=GLM4_PATTERN, mergeable_ranks=ranks, special_tokens={})


# --------------------------------------------------------------------------------------------------- models

TINY: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "attention_bias": True, "tie_word_embeddings": False, "hidden_act": "silu", "pad_token_id": None,
    "eos_token_id": None, "bos_token_id": None,
}
TINY_MOE: dict[str, Any] = {
    "num_hidden_layers": 3, "moe_intermediate_size": 32, "n_routed_experts": 8, "num_experts_per_tok": 2,
    "n_shared_experts": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
    "use_qk_norm": True, "n_group": 1, "topk_group": 1,
}
CLASSES = {"glm": ("GlmConfig", "GlmForCausalLM"), "glm4": ("Glm4Config", "Glm4ForCausalLM"),
           "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM")}


def tiny_model(kind: str, vocab_size: int, seed: int = 0, rope_theta: float = 10000.0, **overrides: Any):
    """A float32 transformers model of ``kind`` ("glm", "glm4", "glm4_moe") with seeded random weights.

    Scales keep activations O(1) (linear ~ N(0, 1/fan_in), embeddings N(0, 1), biases N(0, 0.25), norms U(0.5, 1.5)),
    so a wrong row order, norm or expert choice shows in the logits.
    """
    import torch
    import transformers

    config_name, model_name = CLASSES[kind]
    settings = {**TINY, **(TINY_MOE if kind == "glm4_moe" else {}), **overrides, "vocab_size": vocab_size}
    settings["rope_parameters"] = {"rope_type": "default", "rope_theta": rope_theta, "partial_rotary_factor": 0.5}
    config = getattr(transformers, config_name)(**settings)
    model = getattr(transformers, model_name)(config).to(torch.float32).eval()
    randomize(model, seed)
    return model


def randomize(model, seed: int) -> None:
    """Seeded random weights at the scales above, in place (the routers' score-correction biases too)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(_random_like(name, param, gen))
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.3 * torch.randn(buf.shape, generator=gen))


def _random_like(name: str, param: "torch.Tensor", gen: "torch.Generator") -> "torch.Tensor":
    import torch

    if name.endswith("norm.weight"):
        return 0.5 + torch.rand(param.shape, generator=gen)
    if name.endswith(".bias"):
        return 0.5 * torch.randn(param.shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(param.shape, generator=gen)
    return torch.randn(param.shape, generator=gen) / math.sqrt(param.shape[-1])


# --------------------------------------------------------------------------------------------------- layouts


def published_state(model) -> dict[str, "torch.Tensor"]:
    """The state dict under the names of the published HF checkpoints (MoE experts one tensor each)."""
    state: dict[str, torch.Tensor] = {}
    for name, value in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):  # (E, 2 * I, H): gate rows then up rows
            prefix, half = name.removesuffix("gate_up_proj"), value.shape[1] // 2
            for x in range(value.shape[0]):
                state[f"{prefix}{x}.gate_proj.weight"] = value[x, :half]
                state[f"{prefix}{x}.up_proj.weight"] = value[x, half:]
        elif name.endswith("mlp.experts.down_proj"):  # (E, H, I)
            prefix = name.removesuffix("down_proj")
            for x in range(value.shape[0]):
                state[f"{prefix}{x}.down_proj.weight"] = value[x]
        elif not (model.config.tie_word_embeddings and name == "lm_head.weight"):
            state[name] = value
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def nextn_layer(model, seed: int = 1) -> dict[str, "torch.Tensor"]:
    """Random tensors of GLM-4.5's next-token-prediction layer (index num_hidden_layers): to be left out."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    n, h = model.config.num_hidden_layers, model.config.hidden_size
    last = {k.replace(f"model.layers.{n - 1}.", f"model.layers.{n}."): v
            for k, v in published_state(model).items() if k.startswith(f"model.layers.{n - 1}.")}
    extra = {f"model.layers.{n}.eh_proj.weight": (h, 2 * h), f"model.layers.{n}.enorm.weight": (h,),
             f"model.layers.{n}.hnorm.weight": (h,), f"model.layers.{n}.shared_head.norm.weight": (h,),
             f"model.layers.{n}.embed_tokens.weight": (model.config.vocab_size, h),
             f"model.layers.{n}.shared_head.head.weight": (model.config.vocab_size, h)}
    last.update({k: torch.randn(shape, generator=gen) for k, shape in extra.items()})
    return last


def published_config(model, **extra: Any) -> dict[str, Any]:
    """config.json in the style of the published files: rope settings at the top level, no rope_parameters."""
    cfg = model.config.to_dict()
    rope = cfg.pop("rope_parameters", None) or {}
    cfg["rope_theta"] = float(rope.get("rope_theta", 10000.0))
    cfg["partial_rotary_factor"] = float(rope.get("partial_rotary_factor", 0.5))
    for key in ("dtype", "transformers_version", "output_router_logits"):
        cfg.pop(key, None)
    cfg["torch_dtype"] = "float32"
    cfg["architectures"] = [type(model).__name__]
    cfg.update(extra)
    return cfg


def save_hf_checkpoint(model, out_dir: str | Path, tok: "tokenizers.Tokenizer", *, chat_template: Optional[str],
                       extra_tensors: Optional[Mapping[str, "torch.Tensor"]] = None,
                       config_overrides: Optional[Mapping[str, Any]] = None) -> Path:
    """model.safetensors, config.json, tokenizer.json and tokenizer_config.json in the Hugging Face layout."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = published_state(model)
    state.update(extra_tensors or {})
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = published_config(model, **(config_overrides or {}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = tokenizer_config(tok, chat_template, tokenizer_class="PreTrainedTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    return out


def save_thudm_checkpoint(model, out_dir: str | Path, tok: "tokenizers.Tokenizer", *,
                          chat_template: Optional[str] = FIXTURE_TEMPLATES["glm4"],
                          config_overrides: Optional[Mapping[str, Any]] = None) -> Path:
    """A ``GlmForCausalLM`` repacked as THUDM's glm-4-9b-chat: ChatGLM names and config, tiktoken tokenizer.model."""
    from safetensors.torch import save_file

    from chatglm.devtools.checkpoints import published_config as chatglm_config
    from chatglm.devtools.checkpoints import to_published_state

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in to_published_state(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = chatglm_config(model.config, "chatglm3", "float32", "THUDM/glm-4-9b-chat")
    ids = special_ids(tok)
    cfg.update({"eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
                "pad_token_id": ids["<|endoftext|>"], "num_hidden_layers": cfg["num_layers"]})
    cfg.update(config_overrides or {})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_tiktoken(tok, out / "tokenizer.model")
    tok_cfg = tokenizer_config(tok, chat_template, tokenizer_class="ChatGLM4Tokenizer",
                               auto_map={"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]})
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    return out


def reference_logits(model, ids: Sequence[int]) -> np.ndarray:
    """Float32 logits (T, vocab) of a transformers model for one sequence."""
    from chatglm.devtools.checkpoints import reference_logits as _reference

    return _reference(model, ids)


#: fixture name -> (transformers model kind, layout, chat template key)
LAYOUTS: dict[str, tuple[str, str, str]] = {
    "glm4": ("glm", "thudm", "glm4"),
    "glm4-hf": ("glm", "hf", "glm4"),
    "glm-edge": ("glm", "hf", "glm-edge"),
    "glm4-0414": ("glm4", "hf", "glm4-0414"),
    "glm4-z1": ("glm4", "hf", "glm4-z1"),
    "glm45": ("glm4_moe", "hf", "glm45"),
}


def build_checkpoint(layout: str, out_dir: str | Path, tok: "tokenizers.Tokenizer", *, seed: int = 0,
                     extra_rows: int = 7, **overrides: Any):
    """A tiny model for ``layout`` (a key of :data:`LAYOUTS`) saved under ``out_dir``; returns (model, folder).

    The embedding has ``extra_rows`` more rows than the tokenizer has ids (padding, as in the published models).
    GLM-4.5 checkpoints also get the next-token-prediction layer that conversion must leave out.
    """
    kind, where, template = LAYOUTS[layout]
    model = tiny_model(kind, tok.get_vocab_size() + extra_rows, seed=seed, **overrides)
    if where == "thudm":
        return model, save_thudm_checkpoint(model, out_dir, tok, chat_template=FIXTURE_TEMPLATES[template])
    extra = nextn_layer(model, seed + 1) if kind == "glm4_moe" else None
    cfg = {"num_nextn_predict_layers": 1} if kind == "glm4_moe" else None
    folder = save_hf_checkpoint(model, out_dir, tok, chat_template=FIXTURE_TEMPLATES[template], extra_tensors=extra,
                                config_overrides=cfg)
    return model, folder

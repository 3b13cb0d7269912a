"""Tiny GLM vision checkpoints (GLM-4.5V ``Glm4vMoeForConditionalGeneration``, GLM-OCR) in the published layout
(development and tests only).

Built with transformers' own classes and seeded random weights (the scales of ``glm4.tiny_model``), saved as users
download them: ``model.language_model.*`` / ``model.visual.*`` / ``lm_head`` (experts one tensor each), sharded
safetensors, config.json with ``text_config``/``vision_config``, preprocessor_config.json (Glm4vImageProcessor),
the tiny GLM-4 tokenizer with the image tokens, and a chat template that places each image as
``<|begin_of_image|><|image|><|end_of_image|>`` as the published templates do. Fixture images are drawn by code
(PNG, sized in multiples of 28 pixels within the processor's pixel bounds, so neither side resizes them).
"""

from __future__ import annotations

import io
import json
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from chatglm.devtools.glm4 import (GLM4_SPECIALS, GLM45_EXTRA_SPECIALS, published_state, randomize, tokenizer_config,
                                   train_glm4_bpe)
from chatglm.devtools.glm4_moe_lite import save_sharded

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

IMAGE_SPECIALS = ("<|image|>", "<|video|>")
VISION_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for part in m.content %}"
    "{% if part.type == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif part.type == 'text' %}{{ part.text }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
MEAN = [0.48145466, 0.4578275, 0.40821073]  # the published preprocessor_config.json's
STD = [0.26862954, 0.26130258, 0.27577711]

TINY_VISION: dict[str, Any] = {
    "depth": 2, "hidden_size": 32, "intermediate_size": 48, "num_heads": 2, "patch_size": 14, "image_size": 112,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "hidden_act": "silu", "rms_norm_eps": 1e-5,
}
TINY_MOE_TEXT: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 32, "moe_intermediate_size": 32, "n_routed_experts": 4,
    "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1, "routed_scaling_factor": 1.5,
    "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "attention_bias": True, "tie_word_embeddings": False,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                        "partial_rotary_factor": 0.5},
}


def vision_tokenizer() -> "tokenizers.Tokenizer":
    """The tiny GLM-4.5 tokenizer plus ``<|image|>``/``<|video|>``."""
    return train_glm4_bpe(specials=GLM4_SPECIALS + IMAGE_SPECIALS, user_defined=GLM45_EXTRA_SPECIALS)


def token_ids(tok: "tokenizers.Tokenizer") -> dict[str, int]:
    ids = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    return {"image_token_id": ids["<|image|>"], "image_start_token_id": ids["<|begin_of_image|>"],
            "image_end_token_id": ids["<|end_of_image|>"], "video_token_id": ids["<|video|>"],
            "video_start_token_id": ids["<|begin_of_video|>"], "video_end_token_id": ids["<|end_of_video|>"]}


def tiny_glm45v(tok: "tokenizers.Tokenizer", seed: int = 0, extra_rows: int = 7, **vision_overrides: Any):
    """A float32 ``Glm4vMoeForConditionalGeneration`` with seeded random weights."""
    import torch
    import transformers

    text = {**TINY_MOE_TEXT, "vocab_size": tok.get_vocab_size() + extra_rows}
    vision = {**TINY_VISION, "out_hidden_size": text["hidden_size"], **vision_overrides}
    config = transformers.Glm4vMoeConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                         **token_ids(tok))
    model = transformers.Glm4vMoeForConditionalGeneration(config).to(torch.float32).eval()
    randomize(model, seed)
    return model


def save_vision_checkpoint(model, out_dir: str | Path, tok: "tokenizers.Tokenizer", *, shards: int = 2) -> Path:
    """The published layout of a GLM vision model: see the module docstring."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_sharded(published_state(model), out, shards)
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = tokenizer_config(tok, VISION_TEMPLATE, tokenizer_class="PreTrainedTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    save_image_processor(out, model.config.vision_config)
    return out


def save_image_processor(out: Path, vision, kind: str = "Glm4vImageProcessor", **settings: Any) -> None:
    """preprocessor_config.json as the published checkpoints ship it (GLM-4.5V, GLM-OCR: pixel bounds in ``size``;
    GLM-5.3-Flash: ``Glm5NextImageProcessor`` with token bounds)."""
    import transformers

    if kind == "Glm4vImageProcessor":
        settings = {"size": {"shortest_edge": 28 * 28 * 4, "longest_edge": 28 * 28 * 256}, **settings}
    processor = getattr(transformers, kind)(
        patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
        merge_size=vision.spatial_merge_size, image_mean=MEAN, image_std=STD, **settings)
    processor.save_pretrained(out)


def build_glm45v_checkpoint(out_dir: str | Path, tok: "tokenizers.Tokenizer", *, seed: int = 0):
    """A tiny GLM-4.5V under ``out_dir``: (transformers model, folder)."""
    model = tiny_glm45v(tok, seed=seed)
    return model, save_vision_checkpoint(model, out_dir, tok)


def fixture_png(width: int, height: int, seed: int = 0) -> bytes:
    """An RGB PNG drawn by code: gradients and seeded noise (every pixel differs, nothing to resize)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], axis=-1)
    rgb = np.clip(rgb + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def checkpoint_processor(folder: str | Path, processor_class: str = "Glm4vProcessor"):
    """The checkpoint's transformers processor (``AutoProcessor`` builds the same one, but also a video processor
    that needs torchvision, absent here: the class check for that unused part is skipped while constructing)."""
    from unittest import mock

    import transformers
    from transformers.processing_utils import ProcessorMixin

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    images = transformers.AutoImageProcessor.from_pretrained(folder)
    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda *args: None):
        return getattr(transformers, processor_class)(image_processor=images, tokenizer=tokenizer,
                                                      video_processor=None, chat_template=tokenizer.chat_template)


def image_inputs(processor, png: "bytes | list[bytes]", text: str = "<|begin_of_image|><|image|><|end_of_image|>"):
    """The processor's tensors for fixture images (one or a list) and a text holding their placeholders."""
    from PIL import Image

    images = [Image.open(io.BytesIO(x)).convert("RGB") for x in ([png] if isinstance(png, bytes) else png)]
    return processor(text=[text], images=images, return_tensors="pt")


def image_features(model, inputs) -> np.ndarray:
    """transformers' image embeddings (what the projector gives the language model), float32 (tokens, n_embd)."""
    import torch

    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"],
                                             image_grid_thw=inputs["image_grid_thw"])
    out = getattr(out, "pooler_output", out)
    return (torch.cat(list(out)) if isinstance(out, (list, tuple)) else out).numpy()


TINY_OCR_TEXT: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                      "mrope_section": [2, 3, 3]},
}


def tiny_glm_ocr(tok: "tokenizers.Tokenizer", seed: int = 0, extra_rows: int = 7, attention_bias: bool = True):
    """A float32 ``GlmOcrForConditionalGeneration`` with seeded random weights (no learned vision positions)."""
    import torch
    import transformers

    text = {**TINY_OCR_TEXT, "vocab_size": tok.get_vocab_size() + extra_rows}
    vision = {**TINY_VISION, "out_hidden_size": text["hidden_size"], "attention_bias": attention_bias}
    config = transformers.GlmOcrConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                                       **token_ids(tok))
    model = transformers.GlmOcrForConditionalGeneration(config).to(torch.float32).eval()
    randomize(model, seed)
    return model


def build_glm_ocr_checkpoint(out_dir: str | Path, tok: "tokenizers.Tokenizer", *, seed: int = 0):
    """A tiny GLM-OCR under ``out_dir``: (transformers model, folder)."""
    model = tiny_glm_ocr(tok, seed=seed)
    return model, save_vision_checkpoint(model, out_dir, tok)


def bf16_copy(folder: str | Path, dest: str | Path) -> Path:
    """A copy of a checkpoint folder with every safetensors shard in bfloat16 (as the published files are)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    dest = Path(dest)
    shutil.copytree(folder, dest)
    for shard in dest.glob("*.safetensors"):
        state = load_file(shard)
        save_file({k: v.to(torch.bfloat16) for k, v in state.items()}, str(shard), metadata={"format": "pt"})
    return dest


@contextmanager
def ggml_conv_precision(model):
    """Inside the block, ``model``'s vision tower computes its two convolutions (the patch embedding and the patch
    merger's ``downsample``) at the precision libmtmd's glm4v graph does: ``ggml_conv_2d`` (ggml/src/ggml.c) builds
    its im2col in F16 for every kernel type but BF16, and ``ggml_mul_mat`` converts the f32 kernel to that type, so
    the convolution's input and kernel are both rounded to f16 (products summed in f32). docs/vision_precision.md
    has the measurements; the weights are restored on leaving."""
    import torch

    visual = model.model.visual
    convs = [visual.patch_embed.proj, visual.downsample]
    saved = [conv.weight.detach().clone() for conv in convs]
    hooks = [conv.register_forward_pre_hook(lambda _mod, args: (_to_f16(args[0]), *args[1:])) for conv in convs]
    try:
        with torch.no_grad():
            for conv in convs:
                conv.weight.copy_(_to_f16(conv.weight))
        yield model
    finally:
        for hook in hooks:
            hook.remove()
        with torch.no_grad():
            for conv, weight in zip(convs, saved):
                conv.weight.copy_(weight)


def _to_f16(t):
    import torch

    return t.to(torch.float16).to(t.dtype)

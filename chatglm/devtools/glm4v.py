"""Tiny GLM-4.1V checkpoints (``Glm4vForConditionalGeneration``) as users download them (development and tests only).

Built with transformers' own classes (seeded random weights, real config keys, a two-block vision tower) and saved
by ``save_pretrained`` in shards, with the processor's files written by ``Glm4vProcessor.save_pretrained``
(preprocessor_config.json, tokenizer.json, tokenizer_config.json, chat_template.jinja), so AutoProcessor reads the
folder as it reads the published one. Images are drawn by code (PNG bytes, no image library needed to read them
back: libmtmd decodes them) at sizes the processor does not resize.
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np

from chatglm.devtools.glm4 import GLM4_SPECIALS, GLM45_EXTRA_SPECIALS, train_glm4_bpe

#: GLM-4.1V's specials after GLM-4's: the image and video placeholders, then the thinking and tool markers.
GLM4V_SPECIALS = (*GLM4_SPECIALS, "<|image|>", "<|video|>", *GLM45_EXTRA_SPECIALS)

# A GLM-4.1V-style template: transformers' content parts, each image as begin/placeholder/end.
GLM4V_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m.role }}|>\n"
    "{% if m.content is string %}{{ m.content }}{% else %}{% for item in m.content %}"
    "{% if item.type == 'image' %}<|begin_of_image|><|image|><|end_of_image|>"
    "{% elif item.type == 'text' %}{{ item.text }}{% endif %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-5)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=96, num_heads=2, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2, image_size=112, rms_norm_eps=1e-5)


def tiny_tokenizer():
    return train_glm4_bpe(vocab_size=600, specials=GLM4V_SPECIALS)


def tiny_glm4v(tok, seed: int = 0, text: Optional[dict] = None, vision: Optional[dict] = None):
    """A float32 ``Glm4vForConditionalGeneration`` with seeded random weights (activations kept O(1))."""
    import torch
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    ids = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    text_cfg = {**TINY_TEXT, **(text or {}), "vocab_size": tok.get_vocab_size()}
    head_dim = text_cfg["hidden_size"] // text_cfg["num_attention_heads"]
    quarter = head_dim // 4  # half of the rotated half-dims (partial_rotary_factor 0.5), split 2:3:3 as 8:12:12
    text_cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                   "mrope_section": [quarter // 4 or 1, *_split(quarter - (quarter // 4 or 1))]}
    vision_cfg = {**TINY_VISION, **(vision or {}), "out_hidden_size": text_cfg["hidden_size"]}
    config = Glm4vConfig(text_config=text_cfg, vision_config=vision_cfg,
                         image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
                         image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
                         video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"])
    model = Glm4vForConditionalGeneration(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight"):
                param.copy_(0.5 + torch.rand(param.shape, generator=gen))
            elif name.endswith(".bias"):
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
            elif "embed" in name and param.dim() == 2:
                param.copy_(torch.randn(param.shape, generator=gen))
            else:
                fan_in = math.prod(param.shape[1:])
                param.copy_(torch.randn(param.shape, generator=gen) / math.sqrt(fan_in))
    return model


def _split(n: int) -> list[int]:
    return [n // 2, n - n // 2]


def processor_parts(tok, model):
    """The tokenizer and the image processor (PIL backend: no torchvision) of the checkpoint."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    vc = model.config.vision_config
    images = Glm4vImageProcessorPil(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                    temporal_patch_size=vc.temporal_patch_size)
    return tokenizer, images


def save_glm4v_checkpoint(model, tok, out_dir: str | Path, *, shard_bytes: int = 200_000,
                          config_overrides: Optional[dict[str, Any]] = None) -> Path:
    """``save_pretrained`` in shards (as published: bf16-free float32 here, sharded with an index) plus the
    processor's files."""
    import json

    out = Path(out_dir)
    model.save_pretrained(out, max_shard_size=shard_bytes)
    tokenizer, images = processor_parts(tok, model)
    images.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").write_text(GLM4V_TEMPLATE)
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Glm4vProcessor"}, indent=2))
    if config_overrides:
        cfg = json.loads((out / "config.json").read_text())
        cfg.update(config_overrides)
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def png_bytes(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB image (height, width, 3) as PNG bytes (zlib, no filter)."""
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + np.ascontiguousarray(rgb[y], dtype=np.uint8).tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_image(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth colour pattern with noise (height, width, 3) uint8: every patch differs."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([128 + 100 * np.sin(x / 9.0 + c) * np.cos(y / 7.0 - c) for c in range(3)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)

"""Tiny GLM-Edge-V checkpoints (``GlmForCausalLM`` with a ``vision_config``) in the published layout (development and
tests only).

The language model is transformers' ``GlmForCausalLM`` (``glm4.tiny_model``); the tower is transformers' own
``SiglipVisionModel`` (the independent reference for the SigLIP part); the adapter is :class:`EdgeAdapter`, written
here from the published architecture (THUDM/glm-edge-v-2b's remote code; transformers has no class for it): a 2x2
stride-2 convolution, the GLU (bias-free linear, LayerNorm, GELU, SwiGLU of ``gate_proj``/``dense_h_to_4h``,
``dense_4h_to_h``) and the learned ``boi``/``eoi`` rows around the image's embeddings. Saved as users download it:
``model.*``/``lm_head`` for the language model, ``model.vision.vit.model.vision_model.*`` (pooling head included,
unused) and ``model.vision.adapter.*``, one safetensors file; config.json with ``vision_config``, ``boi_token_id`` and
``eoi_token_id``; preprocessor_config.json; the tiny GLM-4 tokenizer; a chat template in the published shape, which
writes each image as one ``<|begin_of_image|>`` per embedding the model puts there.
"""

from __future__ import annotations

import io
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from chatglm.devtools.glm4 import _random_like, save_hf_checkpoint, special_ids, tiny_model

if TYPE_CHECKING:  # pragma: no cover
    import tokenizers

TINY_SIGLIP: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
                               "num_attention_heads": 2, "image_size": 112, "patch_size": 14,
                               "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
MEAN, STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]  # the published preprocessor_config.json's (SigLIP's)


def image_embeddings_per_image(vision: dict[str, Any]) -> int:
    """What the model puts in place of one image: (grid / 2)^2 adapter outputs, boi and eoi."""
    return (vision["image_size"] // vision["patch_size"] // 2) ** 2 + 2


def edge_v_template(n_image: int) -> str:
    """The published template's shape: each image as ``n_image`` ``<|begin_of_image|>`` (578 in the 2B/5B files)."""
    return ("{% for item in messages %}<|{{ item['role'] }}|>\n{% for content in item['content'] %}"
            "{% if content['type'] == 'image' %}{% for _ in range(" + str(n_image) + ") %}<|begin_of_image|>"
            "{% endfor %}{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}\n"
            "{% endfor %}<|assistant|>\n")


def _modules():
    import torch
    from torch import nn

    class EdgeGLU(nn.Module):
        """The adapter's GLU as published: bias-free linear, LayerNorm (torch's default eps), exact GELU, SwiGLU."""

        def __init__(self, width: int, ffn: int):
            super().__init__()
            self.linear_proj = nn.Linear(width, width, bias=False)
            self.norm1 = nn.LayerNorm(width)
            self.dense_h_to_4h = nn.Linear(width, ffn, bias=False)
            self.gate_proj = nn.Linear(width, ffn, bias=False)
            self.dense_4h_to_h = nn.Linear(ffn, width, bias=False)
            self.act = nn.functional.gelu  # exact (erf), torch.nn.GELU's default

        def forward(self, x):  # (B, T, width)
            x = self.act(self.norm1(self.linear_proj(x)))
            return self.dense_4h_to_h(nn.functional.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))

    class EdgeAdapter(nn.Module):
        """SigLIP's patch states -> the language model's image embeddings, boi first and eoi last."""

        def __init__(self, vision_width: int, width: int, ffn: int):
            super().__init__()
            self.conv = nn.Conv2d(vision_width, width, kernel_size=2, stride=2)
            self.linear_proj = EdgeGLU(width, ffn)
            self.boi = nn.Parameter(torch.zeros(1, 1, width))
            self.eoi = nn.Parameter(torch.zeros(1, 1, width))

        def forward(self, states):  # (B, S, E): S patches in rows of sqrt(S)
            b, s, e = states.shape
            grid = math.isqrt(s)
            x = states.view(b, grid, grid, e).permute(0, 3, 1, 2)  # (B, E, grid, grid)
            x = self.conv(x).flatten(2).transpose(1, 2)  # (B, (grid/2)^2, width)
            x = self.linear_proj(x)
            return torch.cat([self.boi.expand(b, -1, -1), x, self.eoi.expand(b, -1, -1)], dim=1)

    return EdgeAdapter


def _randomize(module, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            norm = "norm" in name and name.endswith("weight")
            param.copy_(0.5 + torch.rand(param.shape, generator=gen) if norm else _random_like(name, param, gen))


class TinyEdgeV:
    """A tiny GLM-Edge-V: transformers' language model and SigLIP tower, the adapter written from the published code."""

    def __init__(self, tok: "tokenizers.Tokenizer", seed: int = 0, extra_rows: int = 7,
                 text: Optional[dict[str, Any]] = None, **vision: Any):
        import torch
        import transformers

        self.lm = tiny_model("glm", tok.get_vocab_size() + extra_rows, seed=seed, **(text or {}))
        self.vision_config = {**TINY_SIGLIP, **vision}
        self.vit = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**self.vision_config))
        cfg = self.lm.config
        self.adapter = _modules()(self.vision_config["hidden_size"], cfg.hidden_size, cfg.intermediate_size)
        for i, part in enumerate((self.vit, self.adapter)):
            part.to(torch.float32).eval()
            _randomize(part, seed + 1 + i)
        self.ids = special_ids(tok)

    def state(self) -> dict[str, Any]:
        """The tower's tensors under the published names."""
        # transformers 5 names SiglipVisionModel's tensors without its ``vision_model.`` level; the files have it
        out = {"model.vision.vit.model.vision_model." + k.removeprefix("vision_model."): v
               for k, v in self.vit.state_dict().items()}
        out.update({f"model.vision.adapter.{k}": v for k, v in self.adapter.state_dict().items()})
        return {k: v.detach().contiguous().clone() for k, v in out.items()}

    def pixels(self, png: bytes):
        """The image as the published processor gives it (already image_size square here: no resize)."""
        import torch
        from PIL import Image

        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64) / 255.0
        x = (rgb - np.array(MEAN)) / np.array(STD)  # (H, W, 3)
        return torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))  # (1, 3, H, W)

    def image_embeddings(self, png: bytes) -> np.ndarray:
        """The torch reference: SigLIP's last hidden state (post-layernormed) through the adapter, (T, n_embd)."""
        import torch

        with torch.no_grad():
            states = self.vit(pixel_values=self.pixels(png)).last_hidden_state
            return self.adapter(states)[0].numpy()

    def logits_with_images(self, ids: list[int], images: list[np.ndarray]) -> np.ndarray:
        """transformers' GlmForCausalLM on ``ids`` with each run of ``<|begin_of_image|>`` replaced (in order) by the
        given embeddings (inputs_embeds); the last position's logits."""
        import torch

        boi = self.ids["<|begin_of_image|>"]
        with torch.no_grad():
            embeds = self.lm.get_input_embeddings()(torch.tensor([ids]))
            mask = torch.tensor(ids) == boi
            embeds[0, mask] = torch.from_numpy(np.concatenate(images))
            return self.lm(inputs_embeds=embeds).logits[0, -1].numpy()

    def save(self, out_dir: str | Path, tok: "tokenizers.Tokenizer") -> Path:
        vision = {**self.vit.config.to_dict(), **self.vision_config}
        for key in ("transformers_version", "dtype", "architectures", "id2label", "label2id"):
            vision.pop(key, None)
        folder = save_hf_checkpoint(self.lm, out_dir, tok, chat_template=edge_v_template(
            image_embeddings_per_image(self.vision_config)), extra_tensors=self.state(), config_overrides={
            "vision_config": vision, "boi_token_id": self.ids["<|begin_of_image|>"],
            "eoi_token_id": self.ids["<|end_of_image|>"]})
        pre = {"image_processor_type": "SiglipImageProcessor", "image_mean": MEAN, "image_std": STD,
               "size": {"height": self.vision_config["image_size"], "width": self.vision_config["image_size"]},
               "do_resize": True, "do_normalize": True, "do_rescale": True, "rescale_factor": 1 / 255}
        (folder / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
        return folder


def build_edge_v_checkpoint(out_dir: str | Path, tok: "tokenizers.Tokenizer", *, seed: int = 0,
                            text: Optional[dict[str, Any]] = None, **vision: Any) -> tuple[TinyEdgeV, Path]:
    """A tiny GLM-Edge-V under ``out_dir``: (the reference model, folder); ``text``/``vision``: size overrides."""
    model = TinyEdgeV(tok, seed=seed, text=text, **vision)
    return model, model.save(out_dir, tok)


def ggml_gelu(x):
    """ggml-cpu's GELU (ggml_vec_gelu_f32 with GGML_GELU_FP16, vec.h): the tanh form looked up in an f16 table at
    the input rounded to f16 (0 below -10, x above 10)."""
    import torch

    table = torch.nn.functional.gelu(x.to(torch.float16).to(torch.float32), approximate="tanh")
    out = table.to(torch.float16).to(x.dtype)
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, out))


@contextmanager
def ggml_precision(model: TinyEdgeV):
    """Inside the block the reference computes as libmtmd's GLM_EDGE graph does on CPU: both convolutions (patch
    embedding, adapter) on f16-rounded inputs and kernels (ggml_conv_2d's F16 im2col), and every GELU (the tower's
    MLP and the adapter's) as :func:`ggml_gelu` (the tanh form, where the published adapter has the exact one).
    The modules get instance-level replacements, removed on leaving (no weight is touched)."""
    import torch

    def f16(t):
        return t.to(torch.float16).to(t.dtype)

    def rounded(conv):
        return lambda x: torch.nn.functional.conv2d(f16(x), f16(conv.weight), conv.bias, conv.stride, conv.padding)

    class GgmlGelu(torch.nn.Module):
        def forward(self, x):
            return ggml_gelu(x)

    vit = getattr(model.vit, "vision_model", model.vit)
    convs = [vit.embeddings.patch_embedding, model.adapter.conv]
    mlps = [layer.mlp for layer in vit.encoder.layers]
    acts = [mlp.activation_fn for mlp in mlps]
    try:
        for conv in convs:
            conv.forward = rounded(conv)
        for mlp in mlps:
            mlp.activation_fn = GgmlGelu()
        model.adapter.linear_proj.act = ggml_gelu
        yield model
    finally:
        for conv in convs:
            conv.__dict__.pop("forward", None)
        for mlp, act in zip(mlps, acts):
            mlp.activation_fn = act
        model.adapter.linear_proj.act = torch.nn.functional.gelu

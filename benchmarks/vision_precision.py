#!/usr/bin/env python
"""How far libmtmd's image embeddings (and GLM-5.3-Flash's logits after them) are from transformers', and from
transformers with its two convolutions rounded as ggml_conv_2d rounds them (docs/vision_precision.md).

Tiny devtools checkpoints of GLM-4.5V, GLM-OCR and GLM-5.3-Flash (seed 1), converted to f32 GGUFs and f32
projectors; fixture PNGs at sizes the processors keep. Prints one table of relative max differences.

    python benchmarks/vision_precision.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTION = "What is written here? 你好"


def relative(got, ref) -> float:
    import numpy as np

    return float(np.abs(got - ref).max() / np.abs(ref).max())


def logits_after(model, processor, path, pngs) -> tuple[float, float]:
    """(vs transformers, vs transformers with f16 convolutions) of the logits after ``pngs`` and the question."""
    import torch

    from chatglm.devtools.glm_vision import ggml_conv_precision, image_inputs
    from chatglm.runtime.media import load_media
    from chatglm.runtime.messages import Message
    from chatglm.runtime.model import load

    media = tuple(load_media(p, "image") for p in pngs)
    content = [{"type": "image"}] * len(pngs) + [{"type": "text", "text": QUESTION}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    inputs = image_inputs(processor, pngs, text)
    with load(path, n_ctx=256, n_threads=1, kv_type="f32", flash_attn=False) as m:
        m.media.prefill(m.prompt_ids([Message("user", QUESTION, media=media)]), media)
        got = m.engine.logits().copy()
    with torch.no_grad():
        plain = model(**inputs).logits[0, -1].numpy()
        with ggml_conv_precision(model):
            rounded = model(**inputs).logits[0, -1].numpy()
    return relative(got, plain), relative(got, rounded)


def main() -> int:
    from chatglm.convert.pipeline import convert
    from chatglm.devtools import glm5_next
    from chatglm.devtools.glm_vision import (build_glm45v_checkpoint, build_glm_ocr_checkpoint, checkpoint_processor,
                                            fixture_png, ggml_conv_precision, image_features, image_inputs,
                                            vision_tokenizer)
    from chatglm.runtime.media import load_media
    from chatglm.runtime.model import load

    families = {"GLM-4.5V": (build_glm45v_checkpoint, "Glm4vProcessor"),
                "GLM-OCR": (build_glm_ocr_checkpoint, "Glm46VProcessor"),
                "GLM-5.3-Flash": (glm5_next.build_vision_checkpoint, "Glm5NextProcessor")}
    tok = vision_tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, processor_class) in families.items():
            model, folder = build(Path(tmp) / name, tok, seed=1)
            path = convert(folder, Path(tmp) / f"{name}.gguf", "f32", mmproj_type="f32").path
            processor = checkpoint_processor(folder, processor_class)
            for width, height in ((112, 112), (168, 112)):
                png = fixture_png(width, height, seed=width)
                inputs = image_inputs(processor, png)
                with load(path, n_ctx=256, n_threads=1) as m:
                    got = m.media.embeddings(load_media(png, "image"))
                with ggml_conv_precision(model):
                    rounded = image_features(model, inputs)
                rows.append((name, f"embeddings {width}x{height}", relative(got, image_features(model, inputs)),
                             relative(got, rounded)))
            if name == "GLM-5.3-Flash":
                pngs = [fixture_png(112, 112, seed=9), fixture_png(168, 112, seed=11)]
                for n in (1, 2):
                    rows.append((name, f"logits after {n} image(s)", *logits_after(model, processor, path, pngs[:n])))
    print("| model | what | vs transformers | vs transformers, f16 convolutions |\n|---|---|---|---|")
    for name, what, plain, rounded in rows:
        print(f"| {name} | {what} | {plain:.2e} | {rounded:.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

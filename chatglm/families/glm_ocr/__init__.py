"""``GlmOcrForConditionalGeneration``: GLM-OCR, a GLM-4-0414-style language model reading images.

The language model is llama.cpp's ``glm4`` with multimodal rope (``rope.dimension_sections``, Q/K rows permuted from
transformers' interleaved pairs to the NeoX halves llama.cpp's M-RoPE rotates); the vision tower is libmtmd's
``glm4v`` projector with per-head q/k norms and no learned positions. ``convert.py``: the converter. ``chat.py``: no
formats of its own (the checkpoint's template, through the sandboxed Jinja path).
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect

FAMILY = Descriptor(
    name="glm_ocr",
    title="GLM-OCR",
    arch="glm4",
    engine=ENGINE_LLAMA,
    detect=Detect("glm_ocr", ("GlmOcrForConditionalGeneration",)),
    variants=("glm-ocr",),
    chat_formats=(),
    special_tokens=("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|begin_of_image|>", "<|image|>", "<|end_of_image|>"),
    vocabulary="tokenizer.json (byte-level BPE)",
)

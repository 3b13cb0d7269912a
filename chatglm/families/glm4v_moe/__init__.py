"""``Glm4vMoeForConditionalGeneration``: GLM-4.5V, GLM-4.5's mixture of experts seeing images.

The language model is llama.cpp's ``glm4moe`` with multimodal rope (``rope.dimension_sections``); the vision tower is
libmtmd's ``glm4v`` projector, written beside the model as ``mmproj-<model>.gguf``. ``convert.py``: the converter
(the language model's tensors read from under ``model.language_model.``; the projector by GLM-4.1V's writer,
``chatglm/families/glm4v/vision.py``). ``chat.py``: no formats of its own; the converter names the checkpoint's
template (the sandboxed Jinja path places each image as ``<|begin_of_image|><|image|><|end_of_image|>``).
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect

FAMILY = Descriptor(
    name="glm4v_moe",
    title="GLM-4.5V",
    arch="glm4moe",
    engine=ENGINE_LLAMA,
    detect=Detect("glm4v_moe", ("Glm4vMoeForConditionalGeneration",)),
    variants=("glm4.5v",),
    chat_formats=(),
    special_tokens=("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>", "<think>", "</think>", "<|begin_of_image|>", "<|image|>", "<|end_of_image|>"),
    vocabulary="tokenizer.json (byte-level BPE)",
)

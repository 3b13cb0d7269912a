"""``Glm4vForConditionalGeneration`` (GLM-4.1V-9B-Thinking, GLM-4.6V-Flash) and ``Glm46VForConditionalGeneration``
(GLM-4.6V): one layout, a ``glm4v_text`` language model and a ``glm4v_vision`` tower.

The language model is llama.cpp's ``glm4`` architecture with M-RoPE (``rope.dimension_sections``: the checkpoint's
``mrope_section``, over frequencies) and Q/K rows permuted to NeoX order, so it also loads and chats with text alone;
the vision tower and its merger are the projector beside it, ``mmproj-<model>.gguf``, libmtmd's ``glm4v`` type.
``convert.py``: the converter (its M-RoPE language model is GLM-OCR's too). ``vision.py``: the vision-tower writer
of every GLM vision family (GLM-4.1V, GLM-4.5V, GLM-OCR, GLM-5.3-Flash), planned from ``tower.py``'s table of the
tower's tensors, which the runtime's projector check reads too. ``chat.py``: no builder; the checkpoint's own
template takes the sandboxed Jinja path, which places each image as ``<|begin_of_image|><|image|><|end_of_image|>``;
the projector check.
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect, MediaProjector

FAMILY = Descriptor(
    name="glm4v",
    title="GLM-4.1V-Thinking, GLM-4.6V, GLM-4.6V-Flash",
    arch="glm4",
    engine=ENGINE_LLAMA,
    detect=Detect("glm4v", ("Glm4vForConditionalGeneration", "Glm46VForConditionalGeneration"),
                  other_model_types=("glm46v",)),
    variants=("glm4v",),
    chat_formats=(),
    special_tokens=("<|begin_of_image|>", "<|image|>", "<|end_of_image|>"),
    vocabulary="tokenizer.json (byte-level BPE)",
    projectors=(MediaProjector("glm4v", "image", "mm.down.weight", "<|image|>"),),
)

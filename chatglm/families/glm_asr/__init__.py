"""GLM-ASR (``GlmasrModel``, the remote-code layout of GLM-ASR-Nano; ``GlmAsrForConditionalGeneration``,
transformers' own layout): a Whisper-style audio encoder and MLP adapter before a llama language model. The
language model is llama.cpp's ``llama`` architecture; the encoder is libmtmd's ``glma`` projector
(``mmproj-<model>.gguf``), or, for the encoders that rotate queries and keys (transformers' layout, remote code with
``use_rope: true``), our own ``chatglm_glmasr_rope`` projector that chatglm/runtime/glmasr/ runs.

``convert.py``: the converter (text model and projector). ``chat.py``: no format of its own (the checkpoint's template
takes the sandboxed Jinja path; without one, GLM-Edge's format).
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect, MediaProjector

ROPE_PROJECTOR = "chatglm_glmasr_rope"  # our projector type for the rotary encoders (never libmtmd's)

FAMILY = Descriptor(
    name="glm_asr",
    title="GLM-ASR (speech)",
    arch="llama",
    engine=ENGINE_LLAMA,
    detect=Detect("glmasr", ("GlmasrModel", "GlmAsrForConditionalGeneration")),
    variants=("glm-asr",),
    chat_formats=(),
    special_tokens=("<|begin_of_audio|>", "<|end_of_audio|>", "<|pad|>"),
    vocabulary="tokenizer.json (byte-level BPE)",
    # the chunk libmtmd gives holds the begin- and end-of-audio embeddings around the adapter's output, so the
    # placeholder stands for all of it
    shared_arch=True,  # llama: Llama-3 and the like are not GLM-ASR
    # glma: libmtmd's graph (remote layout, learned positions); chatglm_glmasr_rope: our own graph for the rotary
    # encoders (runtime/glmasr/), one placeholder per embedding as transformers' processor writes
    projectors=(MediaProjector("glma", "audio", "mm.a.mlp.2.weight", "<|pad|>"),
                MediaProjector(ROPE_PROJECTOR, "audio", "mm.a.mlp.2.weight", "<|pad|>")),
)

"""``Glm5NextForConditionalGeneration``: GLM-5.3-Flash, llama.cpp's ``glm5-next`` architecture (text model only).

A hybrid of linear-attention layers (Kimi delta attention, KDA) and nope-only latent attention layers (MLA) whose
sparse selection comes from a DSA indexer over k-pools, with hyper-connection residual streams and a DeepSeek-style
mixture of experts. ``convert.py``: the converter (the NextN layer kept as ``blk.{L}.nextn.*``); ``vision.py``:
the vision tower as libmtmd's ``glm5v`` projector; ``chat.py``: the ``glm53flash`` format (the official template,
token for token).
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect, MediaProjector

FAMILY = Descriptor(
    name="glm5_next",
    title="GLM-5.3-Flash (text model)",
    arch="glm5-next",
    engine=ENGINE_LLAMA,
    detect=Detect("glm5_next", ("Glm5NextForConditionalGeneration",)),
    variants=("glm5.3-flash",),
    chat_formats=("glm53flash",),
    format_guesses=(((), "glm53flash"),),
    special_tokens=("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
                    "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
                    "</arg_value>", "<tool_response>", "</tool_response>", "<|begin_of_image|>", "<|image|>",
                    "<|end_of_image|>", "<|begin_of_video|>", "<|video|>", "<|end_of_video|>", "<|begin_of_audio|>",
                    "<|end_of_audio|>"),
    vocabulary="tokenizer.json (byte-level BPE)",
    projectors=(MediaProjector("glm5v", "image", "mm.down.weight", "<|image|>"),),  # its vision tower
    template_fingerprints=(("0a64db92e9fb50d5", "glm53flash"),  # official, revision 690b7052
                           ("9aa76abe9ddeb8bf", "glm53flash")),  # official, revision 04c4e9e9
)

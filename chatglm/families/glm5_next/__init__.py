"""``Glm5NextForConditionalGeneration``: GLM-5.3-Flash's text model, llama.cpp's ``glm5-next`` architecture (linear
and latent attention layers). The vision tower is left out (issue #19).

``chat.py``: the ``glm53flash`` format (reasoning effort, XML tool calls, results in tool-call order).
"""

from chatglm.families.descriptor import ENGINE_LLAMA, Descriptor, Detect

FAMILY = Descriptor(
    name="glm5_next",
    title="GLM-5.3-Flash",
    arch="glm5-next",
    engine=ENGINE_LLAMA,
    detect=Detect("glm5_next", ("Glm5NextForConditionalGeneration",)),
    variants=("glm5.3-flash",),
    chat_formats=("glm53flash",),
    format_guesses=(((), "glm53flash"),),
    special_tokens=("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                    "<|observation|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>",
                    "</arg_key>", "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>",
                    "<|begin_of_image|>", "<|image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|video|>",
                    "<|end_of_video|>", "<|begin_of_audio|>", "<|end_of_audio|>"),
    vocabulary="tokenizer.json (byte-level BPE)",
    template_fingerprints=(("0a64db92e9fb50d5", "glm53flash"),  # official, revision 690b7052
                           ("9aa76abe9ddeb8bf", "glm53flash")),  # official, revision 04c4e9e9
)

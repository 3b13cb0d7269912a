"""GLM-4.1V/4.6V have no builder of their own: the GGUF carries the checkpoint's template, rendered by the sandboxed
Jinja path (``runtime/jinja_chat.py``), which gives each image the template's content part and so its
``<|begin_of_image|><|image|><|end_of_image|>`` (libmtmd's chunk takes the place of ``<|image|>``)."""

FORMATS = ()

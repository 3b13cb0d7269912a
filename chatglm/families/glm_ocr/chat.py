"""GLM-OCR's chat formats: none of its own. Its GGUFs carry the checkpoint's template, rendered by the sandboxed
Jinja path (``runtime/jinja_chat.py``), which gives each image its content part."""

FORMATS = ()

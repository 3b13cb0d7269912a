"""GLM-ASR defines no chat format: its GGUFs carry the checkpoint's template (sandboxed Jinja path)."""

FORMATS = ()

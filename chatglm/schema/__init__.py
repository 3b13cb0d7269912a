"""The GGUF schema of this project: what a converted file holds beyond llama.cpp's standard keys.

Both sides read it: the converter (:mod:`chatglm.convert`) writes these keys and pieces, the runtime
(:mod:`chatglm.runtime`) reads them back. It imports nothing of either, so the runtime never has to import the
converter to know a key name.

- :mod:`chatglm.schema.keys`: metadata keys of our own (``glm.*`` and the ``chatglm1.*`` keys of the GLM-1 engine).
- :mod:`chatglm.schema.ice`: the ChatGLM-6B ``ice_text`` piece rules (whitespace pieces, special pieces).
"""

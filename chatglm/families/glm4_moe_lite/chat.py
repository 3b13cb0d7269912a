"""GLM-4.7-Flash's chat formats: none of its own yet. Its GGUFs name GLM-4.5's ``glm45`` format (defined by
``chatglm/families/glm4_moe/chat.py``) until the chat work gives GLM-4.7's template a format of its own."""

FORMATS = ()

"""GLM-5.x chat formats: none of its own yet. Its GGUFs name GLM-4.5's ``glm45`` format (defined by
``chatglm/families/glm4_moe/chat.py``); the chat work of issue #18 gives GLM-5's templates their own builders."""

FORMATS = ()

"""Chat formats of the other families register here by importing their modules."""
from chatglm.runtime import prompts_glm4  # noqa: F401,E402  (glm4, glm-edge, glm4-0414, glm4-z1)
from chatglm.runtime import prompts_glm45  # noqa: F401,E402  (glm45)
from chatglm.runtime import prompts_glm1  # noqa: F401,E402  (chatglm1: ChatGLM-6B)

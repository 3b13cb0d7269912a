"""Model families; importing this package registers every one of them."""

from chatglm.convert.families import chatglm  # noqa: F401
from chatglm.convert.families import glm4  # noqa: F401
from chatglm.convert.families import glm_hf  # noqa: F401
from chatglm.convert.families import glm4_moe  # noqa: F401
from chatglm.convert.families import chatglm1  # noqa: F401

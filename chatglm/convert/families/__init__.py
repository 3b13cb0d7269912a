"""Model families; importing this package registers every one of them."""

from chatglm.convert.families import chatglm  # noqa: F401

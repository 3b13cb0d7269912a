"""``chatglm serve``: an OpenAI-compatible HTTP server with a built-in chat page, over one loaded GGUF model.

:func:`create_app` builds the ASGI app from a function that loads the model instances; ``chatglm.cli.serve`` runs it
with uvicorn. FastAPI and uvicorn are imported only when this package is.
"""

from chatglm.server.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]

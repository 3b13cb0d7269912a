"""The bundled demo model: a toy ChatGLM3-architecture checkpoint, converted on first use into the user cache."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from chatglm.errors import ChatGLMError

log = logging.getLogger(__name__)
PROJECT = __name__.partition(".")[0]  # the package's name: its folder in the user's cache
DEMO_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")


def demo_dir() -> Path:
    """The demo checkpoint, shipped inside the package (``chatglm/models/demo``) by every kind of install."""
    path = Path(__file__).resolve().parent / "models" / "demo"
    missing = [name for name in DEMO_FILES if not (path / name).is_file()]
    if missing:
        raise ChatGLMError(f"the bundled demo model is incomplete in this installation ({path} lacks "
                           f"{', '.join(missing)}); reinstall chatglm or give a model path")
    return path


def cache_dir() -> Path:
    base = os.environ.get("CHATGLM_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / PROJECT if not os.environ.get("CHATGLM_CACHE") else Path(base)


def demo_gguf() -> Path:
    """The demo model's GGUF, converted through the normal converter the first time (keyed by the files' hash)."""
    source = demo_dir()
    digest = hashlib.sha256()
    for name in DEMO_FILES:
        if (source / name).is_file():
            digest.update((source / name).read_bytes())
    target = cache_dir() / f"demo-{digest.hexdigest()[:12]}-f16.gguf"
    if not target.is_file():
        from chatglm.convert.pipeline import convert

        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("converting the demo model into %s", target)
        convert(source, target, "f16")
    return target

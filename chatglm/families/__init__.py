"""The model families: the one registry of them, and lazy access to each family's parts.

Each family is a folder ``chatglm/families/<name>/``: ``__init__.py`` (its descriptor ``FAMILY``, a
:class:`~chatglm.families.descriptor.Descriptor`), ``convert.py`` (the converter, ``CONVERTER``: converter side only) and ``chat.py`` (its chat
formats, ``FORMATS``: runtime side only). The converter loads only ``convert`` parts and the runtime only ``chat``
parts, each by module name when first needed, so neither side imports the other.

Adding a family: a new folder, one line in :data:`REGISTRY`, its tests (see docs/architecture.md).
"""

from __future__ import annotations

import importlib
from functools import lru_cache
from types import ModuleType

from chatglm.families.descriptor import Descriptor, MediaProjector

# One line per family, in detection and listing order.
REGISTRY: tuple[str, ...] = (
    "chatglm1",  # ChatGLM-6B (first generation), our own engine
    "chatglm2",  # ChatGLM2-6B, ChatGLM3-6B, CodeGeeX2 (THUDM layout, SentencePiece)
    "glm4",  # GLM-4-9B in the THUDM layout (tiktoken)
    "glm4_hf",  # GLM-4-9B -hf and GLM-Edge (transformers layout)
    "glm4_0414",  # GLM-4-0414 and GLM-Z1
    "glm4_moe",  # GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7
    "glm4_moe_lite",  # GLM-4.7-Flash (MLA: llama.cpp deepseek2)
    "glm_moe_dsa",  # GLM-5, GLM-5.1, GLM-5.2, GLM-5.3
    "glm5_next",  # GLM-5.3-Flash (text model)
    "glm4v",  # GLM-4.1V-Thinking, GLM-4.6V, GLM-4.6V-Flash (vision: mmproj beside the model)
    "glm_asr",  # GLM-ASR (speech: llama text model, libmtmd glma projector)
    "glm4v_moe",  # GLM-4.5V (glm4moe with M-RoPE, the glm4v projector)
    "glm_ocr",  # GLM-OCR (glm4 with M-RoPE, the glm4v projector with q/k norms)
)


@lru_cache(maxsize=None)
def families() -> tuple[Descriptor, ...]:
    """Every family's descriptor, in registry order (only the folders' faces are imported)."""
    found = tuple(part(name, None).FAMILY for name in REGISTRY)
    for name, fam in zip(REGISTRY, found):
        if fam.name != name:
            raise RuntimeError(f"chatglm/families/{name} describes itself as {fam.name!r}")
    return found


def projectors() -> dict[str, "MediaProjector"]:
    """Every libmtmd projector type some family writes, by name."""
    return {p.projector_type: p for f in families() for p in f.projectors}


def projector_owner(projector_type: str) -> str:
    """The family whose descriptor declares a libmtmd projector type (its ``chat`` part may check such files)."""
    return next(f.name for f in families() if any(p.projector_type == projector_type for p in f.projectors))


def part(name: str, which: str | None) -> ModuleType:
    """The module of family ``name``: its face (``which=None``), ``"convert"`` or ``"chat"``."""
    if name not in REGISTRY:
        raise KeyError(f"no family {name!r} (known: {', '.join(REGISTRY)})")
    return importlib.import_module(f"{__name__}.{name}" + (f".{which}" if which else ""))


def of_arch(arch: str) -> tuple[Descriptor, ...]:
    """The families whose GGUFs have this general.architecture (several share llama.cpp's ``chatglm``)."""
    return tuple(f for f in families() if f.arch == arch)


def archs() -> tuple[str, ...]:
    """Every GGUF architecture some family writes, in registry order."""
    return tuple(dict.fromkeys(f.arch for f in families()))


def arch_value(arch: str, attribute: str, default=None):
    """A descriptor attribute that every family of ``arch`` must agree on (engine, causal prefix); ``default`` for
    an arch no family writes."""
    values = {getattr(f, attribute) for f in of_arch(arch)}
    if len(values) > 1:
        raise RuntimeError(f"families of arch {arch!r} disagree on {attribute}: {sorted(map(str, values))}")
    return values.pop() if values else default


def owner_of_format(fmt: str) -> Descriptor | None:
    """The family whose chat.py defines chat format ``fmt``."""
    return next((f for f in families() if fmt in f.chat_formats), None)


def chat_formats() -> tuple[str, ...]:
    return tuple(fmt for f in families() for fmt in f.chat_formats)


def guess_format(arch: str, special: dict[str, int]) -> str | None:
    """The chat format of a GGUF that names none: the most specific guess of its arch's families that fits (ties:
    registry order)."""
    guesses = [(tokens, fmt) for f in of_arch(arch) for tokens, fmt in f.format_guesses]
    fitting = [(len(tokens), -i, fmt) for i, (tokens, fmt) in enumerate(guesses) if all(t in special for t in tokens)]
    return max(fitting)[2] if fitting else None


def template_fingerprint(template: str) -> str:
    """The first 16 hex digits of the sha256 of a chat template's text (CRLF as LF, surrounding whitespace dropped)."""
    import hashlib

    text = template.replace("\r\n", "\n").strip()
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def recognise_template(template: str) -> str | None:
    """The chat format that renders this template token for token, or None (the sandboxed Jinja path)."""
    if not template:
        return None
    print_ = template_fingerprint(template)
    return next((fmt for f in families() for fp, fmt in f.template_fingerprints if fp == print_), None)


def special_tokens() -> frozenset[str]:
    """Every control token some family's chat formats look up by text."""
    return frozenset(t for f in families() for t in (*f.special_tokens, *f.causal_prefix))


__all__ = ["REGISTRY", "Descriptor", "arch_value", "archs", "chat_formats", "families", "guess_format", "of_arch",
           "owner_of_format", "part", "recognise_template", "special_tokens", "template_fingerprint"]

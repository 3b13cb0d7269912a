"""What the rest of the code may know about a model family, as data: the face of ``chatglm/families/<name>/``.

A family folder holds three parts. Its ``__init__.py`` defines ``FAMILY``, one :class:`Descriptor`, and
imports nothing but this module, so both halves of the project can read it. ``convert.py`` (converter side) holds the
checkpoint converter, ``CONVERTER``; ``chat.py`` (runtime side) holds the chat formats, ``FORMATS``. Shared code reads
descriptors through :mod:`chatglm.families`, never by naming a family.
"""

from __future__ import annotations

from dataclasses import dataclass

ENGINE_LLAMA = "llama.cpp"  # llama-cpp-python runs the GGUF
ENGINE_GLM1 = "glm1"  # our own ggml graph (chatglm.runtime.glm1)


@dataclass(frozen=True)
class Detect:
    """How config.json announces the family: ``model_type``, one of ``architectures``, keys it has and lacks.

    The converter may refine a match by the tokenizer files' format (which file exists and parses as what)."""

    model_type: str
    architectures: tuple[str, ...]  # empty: any (ChatGLM-6B is told apart by its keys alone)
    has_keys: tuple[str, ...] = ()
    lacks_keys: tuple[str, ...] = ()
    other_model_types: tuple[str, ...] = ()  # further model_type values of the same layout (GLM-4.6V's glm46v)

    def matches(self, config: dict) -> bool:
        archs = config.get("architectures") or []
        named = not self.architectures or any(a in self.architectures for a in archs)
        return (config.get("model_type") in (self.model_type, *self.other_model_types) and named
                and all(k in config for k in self.has_keys) and not any(k in config for k in self.lacks_keys))

    @property
    def keys(self) -> tuple[str, ...]:
        """The config.json keys this detection looks at."""
        return ("model_type", "architectures", *self.has_keys, *self.lacks_keys)


@dataclass(frozen=True)
class MediaProjector:
    """A libmtmd projector type a family's ``mmproj-*.gguf`` files use, as the runtime checks it before libmtmd: the
    modality, the tensor whose rows (ggml ``ne[1]``) are the width of the embeddings it gives the language model, and
    the token the chat template writes in place of each medium (libmtmd writes the medium's begin/end tokens around
    its chunk only when tokenizing text; here the template's own begin/end tokens stay in the prompt)."""

    projector_type: str  # libmtmd's name (tools/mtmd/clip-impl.h)
    modality: str  # "image" or "audio"
    output: str
    placeholder: str


@dataclass(frozen=True)
class Descriptor:
    """One family folder: its names, how to recognise its checkpoints and GGUFs, and how the runtime treats them."""

    name: str  # the folder under chatglm/families/
    title: str  # the models it covers, for people
    arch: str  # GGUF general.architecture
    engine: str  # ENGINE_LLAMA or ENGINE_GLM1
    detect: Detect
    variants: tuple[str, ...]  # what its GGUFs name as glm.family
    chat_formats: tuple[str, ...]  # formats defined by its chat.py (chat_format names in GGUFs)
    # For a GGUF of this arch without glm.chat_format (files from other converters): (special tokens the vocabulary
    # must hold, format). Across families of one arch the guess naming the most tokens wins.
    format_guesses: tuple[tuple[tuple[str, ...], str], ...] = ()
    special_tokens: tuple[str, ...] = ()  # control tokens its chat formats look up by text
    causal_prefix: tuple[str, ...] = ()  # put before scored text so the model runs causally (perplexity, bench)
    vocabulary: str = ""  # the tokenizer its checkpoints ship, for people ("SentencePiece tokenizer.model", ...)
    # Chat templates its formats reproduce token for token: (the first 16 hex digits of the sha256 of the template
    # text, CRLF as LF, stripped, format). A template not listed takes the sandboxed Jinja path.
    template_fingerprints: tuple[tuple[str, str], ...] = ()
    projectors: tuple[MediaProjector, ...] = ()  # the media projectors its checkpoints carry (mmproj files)
    # The arch is one of llama.cpp's general ones (``llama``), written by non-GLM models too: a GGUF of it is this
    # family's only when ``glm.family`` (written by our converter) names one of its variants.
    shared_arch: bool = False

    def __post_init__(self) -> None:
        if self.engine not in (ENGINE_LLAMA, ENGINE_GLM1):
            raise ValueError(f"{self.name}: unknown engine {self.engine!r}")
        for _, fmt in self.format_guesses:
            if not fmt:
                raise ValueError(f"{self.name}: a format guess names no format")

    @property
    def names(self) -> frozenset[str]:
        """Every identifier this family owns: folder, arch, variants and chat formats."""
        return frozenset((self.name, self.arch, *self.variants, *self.chat_formats))

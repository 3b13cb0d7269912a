"""Images and audio for the multimodal models, checked on their bytes before any native decoder sees them.

libmtmd's helper (``mtmd_helper_bitmap_init_from_buf`` in tools/mtmd/mtmd-helper.cpp) sniffs a buffer: WAV, MP3 or
FLAC by signature go to miniaudio, which decodes the whole file to f32 PCM at the projector's rate; anything else goes
to stb_image (``stbi_load_from_memory``, all of its formats compiled in), and what stb_image refuses goes on to an
outside ``ffmpeg`` process when one is on PATH (the wheel is built with MTMD_VIDEO). So :func:`load_media` takes only
what those decoders handle well, read from the headers without decoding a pixel or a sample:

- images: PNG (the chunk chain walked to IEND, the CRCs checked and the zlib stream inflated in bounded pieces to
  prove it holds exactly the pixel bytes the header promises), JPEG (baseline, extended or progressive 8-bit, as
  stb_image decodes; SOI, a frame header before the first scan, EOI after it), BMP (uncompressed or bitfields; the
  pixel rows inside the file) and GIF (the block chain walked to the trailer; stb_image takes the first frame).
  Width and height come from the header and are bounded (:data:`~chatglm.limits.MAX_IMAGE_SIDE`,
  :data:`~chatglm.limits.MAX_IMAGE_PIXELS`) before anything the size of the image is allocated. WebP and everything
  else is refused: they would reach ffmpeg.
- audio: WAV (PCM, float, A-law or mu-law; the data chunk inside the file), FLAC (STREAMINFO with a known length) and
  MP3 (MPEG 1/2/2.5 frames walked to the end); at most :data:`~chatglm.limits.MAX_AUDIO_SECONDS`.

Every refusal is one :class:`~chatglm.errors.InputError` naming the file (or the request part) and the problem. The
readers of each format are in :mod:`chatglm.runtime.media_formats`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Union

from chatglm import fsutil
from chatglm.errors import InputError
from chatglm.limits import MAX_MEDIA_BYTES
from chatglm.runtime.media_formats import READERS, BadMedia

KINDS = ("image", "audio")
IMAGE_FORMATS = ("png", "jpeg", "bmp", "gif")
AUDIO_FORMATS = ("wav", "mp3", "flac")


@dataclass(frozen=True)
class Media:
    """One image or audio clip that passed :func:`load_media`: its bytes as given, and what its header says."""

    kind: str  # "image" | "audio"
    data: bytes = field(repr=False)
    name: str  # the file, or the request part it came from (for messages)
    format: str  # one of IMAGE_FORMATS or AUDIO_FORMATS
    width: int = 0  # images
    height: int = 0
    sample_rate: int = 0  # audio: the file's rate (libmtmd resamples to the projector's)
    channels: int = 0
    frames: int = 0  # audio samples per channel
    offset: int = 0  # where it stands in its message's text (characters before it): 0 is before the text
    path: str = ""  # the file it was read from (absolute), "" for bytes: a saved conversation names it

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate if self.sample_rate else 0.0


def load_media(source: Union[str, bytes, os.PathLike], kind: str, name: str = "") -> Media:
    """The checked :class:`Media` of a file path or raw bytes; ``kind`` is ``"image"`` or ``"audio"``.

    ``name`` names bytes in messages (a request part, say); a path names itself. Raises one InputError."""
    if kind not in KINDS:
        raise ValueError(f"media kind must be one of {KINDS}, not {kind!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or f"the {kind}"
        if len(data) > MAX_MEDIA_BYTES:
            raise InputError(f"is {len(data)} bytes, more than the {MAX_MEDIA_BYTES} accepted for one {kind}", name)
        path = ""
    else:
        name, path = name or os.fspath(source), os.path.abspath(source)
        data = fsutil.read_bytes(Path(source), max_bytes=MAX_MEDIA_BYTES, what=f"the {kind} file")
    try:
        return replace(_check(data, kind, name), path=path)
    except BadMedia as exc:
        raise InputError(str(exc), name) from None


def _check(data: bytes, kind: str, name: str) -> Media:
    if not data:
        raise BadMedia(f"is empty (0 bytes), not an {kind}" if kind == "image" else "is empty (0 bytes), not audio")
    fmt = sniff(data)
    if fmt in _REFUSED:
        raise BadMedia(_REFUSED[fmt])
    wanted = IMAGE_FORMATS if kind == "image" else AUDIO_FORMATS
    if fmt not in wanted:
        other = "an image" if fmt in IMAGE_FORMATS else "audio" if fmt in AUDIO_FORMATS else None
        what = f"is {other} ({fmt.upper()}), not" if other else "is not"
        shown = ", ".join(f.upper() for f in wanted)
        raise BadMedia(f"{what} {'an image' if kind == 'image' else 'audio'} in a format libmtmd decodes ({shown})")
    return Media(kind, data, name, fmt, **READERS[fmt](data))


def sniff(data: bytes) -> str:
    """The format a file's first bytes announce (``""`` for none we know), as libmtmd's helper tells them apart."""
    head = data[:12]
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if head.startswith(b"BM"):
        return "bmp"
    if head.startswith(b"RIFF") and head[8:12] in (b"WAVE", b"WEBP"):
        return "wav" if head[8:12] == b"WAVE" else "webp"
    if head.startswith(b"fLaC"):
        return "flac"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return ""


_REFUSED = {"webp": "is WebP, which stb_image does not decode (libmtmd would hand it to an outside ffmpeg); "
                    "convert it to PNG or JPEG"}

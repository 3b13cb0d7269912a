"""Images and audio given to a multimodal model, checked before any native decoder sees their bytes.

Minimal version (PNG, JPEG, BMP, GIF images; WAV audio): the full checks (every format libmtmd's decoders take, header
dimensions of each, truncation) replace this module when the media work is merged; the interface stays.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from chatglm.errors import InputError
from chatglm.fsutil import read_bytes

MAX_MEDIA_BYTES = 1 << 28  # 256 MiB
MAX_SIDE = 16384
MAX_PIXELS = 1 << 26
KINDS = ("image", "audio")


@dataclass(frozen=True)
class Media:
    """One image or audio clip: its bytes (as in the file), a name for messages, and what its header says."""

    kind: str
    data: bytes = field(repr=False)
    name: str
    width: int = 0
    height: int = 0
    sample_rate: int = 0


def _png_size(data: bytes) -> Optional[tuple[int, int]]:
    if data[:8] != b"\x89PNG\r\n\x1a\n" or len(data) < 24 or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


def _jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5:i + 9])
            return width, height
        i += 2 + length
    return None


def _bmp_size(data: bytes) -> Optional[tuple[int, int]]:
    if data[:2] != b"BM" or len(data) < 26:
        return None
    width, height = struct.unpack("<ii", data[18:26])
    return abs(width), abs(height)


def _gif_size(data: bytes) -> Optional[tuple[int, int]]:
    if data[:6] not in (b"GIF87a", b"GIF89a") or len(data) < 10:
        return None
    return struct.unpack("<HH", data[6:10])


IMAGE_HEADERS = (("PNG", _png_size), ("JPEG", _jpeg_size), ("BMP", _bmp_size), ("GIF", _gif_size))


def _image(data: bytes, name: str) -> Media:
    for fmt, size_of in IMAGE_HEADERS:
        size = size_of(data)
        if size is None:
            continue
        width, height = size
        if not (0 < width <= MAX_SIDE and 0 < height <= MAX_SIDE) or width * height > MAX_PIXELS:
            raise InputError(f"{fmt} image of {width}x{height} pixels is not supported (at most {MAX_SIDE} per side "
                             f"and {MAX_PIXELS} pixels)", name)
        return Media("image", data, name, width=width, height=height)
    raise InputError("not an image in a format this tool reads (PNG, JPEG, BMP, GIF)", name)


def _audio(data: bytes, name: str) -> Media:
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE" or len(data) < 28:
        raise InputError("not audio in a format this tool reads (WAV)", name)
    return Media("audio", data, name, sample_rate=struct.unpack("<I", data[24:28])[0])


def load_media(source: "str | bytes | os.PathLike", kind: str) -> Media:
    """A checked :class:`Media` of ``kind`` from a path or the bytes themselves (one-line InputError naming it)."""
    if kind not in KINDS:
        raise InputError(f"unknown media kind {kind!r}; expected one of {', '.join(KINDS)}")
    if isinstance(source, (bytes, bytearray)):
        data, name = bytes(source), f"<{kind} bytes>"
    else:
        name = os.fspath(source)
        data = read_bytes(Path(name), max_bytes=MAX_MEDIA_BYTES, what=kind)
    if not data:
        raise InputError(f"the {kind} is empty (0 bytes)", name)
    return _image(data, name) if kind == "image" else _audio(data, name)

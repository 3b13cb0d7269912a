"""Image and audio files made by code, for tests and benchmarks: no fixture files, no image library.

``png(pixels)`` writes any uint8 array (H x W x 3, H x W x 4 or H x W); ``jpeg``, ``bmp`` and ``gif`` write flat
images of a given size in the layouts stb_image decodes; ``wav``, ``flac_header`` and ``mp3`` write audio.
:func:`png_chunk` and :func:`jpeg_segment` let hostile-input tests build broken files piece by piece.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type


def png_chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def png_ihdr(width: int, height: int, depth: int = 8, colour: int = 2, interlace: int = 0) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace))


def png(pixels: np.ndarray) -> bytes:
    """An 8-bit PNG of ``pixels`` (H x W grey, or H x W x 1-4 channels), every row with filter 0."""
    pixels = np.asarray(pixels, dtype=np.uint8)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    height, width, channels = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, -1)], axis=1)
    return (PNG_SIGNATURE + png_ihdr(width, height, 8, PNG_COLOUR[channels])
            + png_chunk(b"IDAT", zlib.compress(rows.tobytes())) + png_chunk(b"IEND", b""))


def jpeg_segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body


def jpeg(width: int, height: int, components: int = 3, frame: int = 0xC0) -> bytes:
    """A flat mid-grey JPEG: one quantisation table, one-code Huffman tables, every block DC 0 and EOB (``frame``
    0xC0 baseline, 0xC1 extended, 0xC2 progressive with a single DC scan)."""
    ids = range(1, components + 1)
    sof = struct.pack(">BHHB", 8, height, width, components) + b"".join(bytes([i, 0x11, 0]) for i in ids)
    one_code = bytes([1] + [0] * 15 + [0])  # one 1-bit code, for symbol 0 (DC category 0 / AC end-of-block)
    progressive = frame == 0xC2  # then one DC-only scan: every AC coefficient stays 0
    sos = bytes([components]) + b"".join(bytes([i, 0x00]) for i in ids) + bytes([0, 0 if progressive else 63, 0])
    blocks = ((width + 7) // 8) * ((height + 7) // 8) * components
    bits = ("0" if progressive else "00") * blocks
    bits += "1" * (-len(bits) % 8)
    scan = bytes(int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)).replace(b"\xff", b"\xff\x00")
    return (b"\xff\xd8" + jpeg_segment(0xDB, bytes([0]) + bytes([1] * 64)) + jpeg_segment(frame, sof)
            + jpeg_segment(0xC4, bytes([0x00]) + one_code) + jpeg_segment(0xC4, bytes([0x10]) + one_code)
            + jpeg_segment(0xDA, sos) + scan + b"\xff\xd9")


def bmp(width: int, height: int, bpp: int = 24, compression: int = 0, header: int = 40) -> bytes:
    """A black uncompressed BMP (bottom-up rows padded to 4 bytes; a grey palette under 16 bits per pixel)."""
    palette = b"".join(bytes([i, i, i, 0]) for i in range(1 << bpp)) if bpp <= 8 else b""
    row = (bpp * width + 31) // 32 * 4
    offset = 14 + header + len(palette)
    dib = struct.pack("<IiiHHIIiiII", header, width, height, 1, bpp, compression, row * height, 2835, 2835, 0, 0)
    dib += bytes(header - len(dib))
    return b"BM" + struct.pack("<IHHI", offset + row * height, 0, 0, offset) + dib + palette + bytes(row * height)


def gif(width: int, height: int) -> bytes:
    """A one-frame two-colour GIF, LZW-coded with a clear code every two pixels so the code width stays 3 bits."""
    codes = []
    for start in range(0, width * height, 2):
        codes += [4] + [1] * min(2, width * height - start)
    codes.append(5)
    value = sum(code << (3 * i) for i, code in enumerate(codes))
    lzw = value.to_bytes((3 * len(codes) + 7) // 8, "little")
    blocks = b"".join(bytes([len(lzw[i:i + 255])]) + lzw[i:i + 255] for i in range(0, len(lzw), 255)) + b"\x00"
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02" + blocks + b"\x3b")


def wav(samples: np.ndarray | int, rate: int = 16000, channels: int = 1, bits: int = 16, tag: int = 1) -> bytes:
    """A WAV of int16 ``samples`` (or that many frames of silence) in PCM (tag 1) or float (tag 3) encoding."""
    if isinstance(samples, int):
        data = bytes(samples * channels * bits // 8)
    else:
        data = np.asarray(samples, dtype=np.int16 if tag == 1 else np.float32).tobytes()
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def flac_header(rate: int = 16000, channels: int = 1, frames: int = 16000, bits: int = 16) -> bytes:
    """FLAC's signature and a last STREAMINFO block, then the sync code of a first frame (no audio after it)."""
    packed = (rate << 44) | ((channels - 1) << 41) | ((bits - 1) << 36) | frames
    info = struct.pack(">HH", 4096, 4096) + bytes(6) + packed.to_bytes(8, "big") + bytes(16)
    return b"fLaC" + bytes([0x80, 0, 0, len(info)]) + info + b"\xff\xf8" + bytes(14)


def mp3(frames: int, tag: bool = True) -> bytes:
    """``frames`` silent MPEG-1 layer III frames at 128 kbit/s, 44.1 kHz mono (417 bytes each), after an ID3v2 tag."""
    header = struct.pack(">I", 0xFFFB90C0)  # sync, MPEG-1, layer III, no CRC, 128 kbit/s, 44100 Hz, mono
    frame = header + bytes(417 - 4)
    return (b"ID3\x04\x00\x00\x00\x00\x00\x00" if tag else b"") + frame * frames

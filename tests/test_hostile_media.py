"""Hostile images and audio: every case made here by code, each refused by :func:`load_media` with one line before
stb_image or miniaudio would see it; valid files of every accepted format pass with the sizes stb_image itself reads
(libmtmd's own helper, ``mtmd_helper_bitmap_init_from_buf``, decodes them here: its image path needs no model).
"""

from __future__ import annotations

import ctypes
import json
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

from chatglm.devtools import media_files as mf
from chatglm.devtools.media_files import PNG_SIGNATURE, jpeg_segment, png_chunk, png_ihdr
from chatglm.errors import InputError
from chatglm.limits import MAX_MEDIA_BYTES
from chatglm.runtime.media import Media, load_media
from hostile import ROOT

PNG_OK = mf.png(np.arange(6 * 4 * 3).reshape(4, 6, 3))
JPEG_OK = mf.jpeg(24, 16)
IEND = png_chunk(b"IEND", b"")


def png_of(ihdr: bytes, idat: bytes = zlib.compress(bytes(10)), *extra: bytes) -> bytes:
    return PNG_SIGNATURE + ihdr + b"".join(extra) + png_chunk(b"IDAT", idat) + IEND


def jpeg_with_frame(precision: int, width: int, height: int, components: int = 1, marker: int = 0xC0) -> bytes:
    sof = struct.pack(">BHHB", precision, height, width, components) + bytes([1, 0x11, 0]) * components
    return b"\xff\xd8" + jpeg_segment(marker, sof) + jpeg_segment(0xDA, bytes([1, 1, 0, 0, 63, 0])) + b"\0\xff\xd9"


def wav_fmt(tag: int, channels: int, rate: int, bits: int, data: bytes = bytes(64), data_size: int = -1) -> bytes:
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * align, align, bits)
    size = len(data) if data_size < 0 else data_size
    body = b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", size) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


MP3_OK = mf.mp3(40)
CASES = {  # name: (bytes, kind, the problem the one line must name)
    "empty image": (b"", "image", "is empty (0 bytes)"),
    "empty audio": (b"", "audio", "is empty (0 bytes)"),
    "text as image": (b"hello, this is not a picture", "image", "is not an image in a format libmtmd decodes"),
    "wav as image": (mf.wav(100), "image", "is audio (WAV), not an image"),
    "png as audio": (PNG_OK, "audio", "is an image (PNG), not audio"),
    "ogg as audio": (b"OggS" + bytes(60), "audio", "is not audio in a format libmtmd decodes (WAV, MP3, FLAC)"),
    "webp": (b"RIFF\x20\0\0\0WEBPVP8 " + bytes(24), "image", "is WebP, which stb_image does not decode"),
    # PNG
    "png cut in half": (PNG_OK[:len(PNG_OK) // 2], "image", "is truncated"),
    "png without IEND": (PNG_OK[:-12], "image", "is truncated: it ends inside a chunk header"),
    "png cut in IHDR": (PNG_OK[:20], "image", "'IHDR' chunk runs past the end"),
    "png bad crc": (PNG_OK[:29] + b"\0\0\0\0" + PNG_OK[33:], "image", "CRC of its 'IHDR' chunk"),
    "png 30000x30000": (png_of(png_ihdr(30000, 30000)), "image", "is 30000x30000 pixels"),
    "png 16385 wide": (png_of(png_ihdr(16385, 1)), "image", "at most 16384 per side"),
    "png zero width": (png_of(png_ihdr(0, 5)), "image", "size of 0x5 pixels"),
    "png zlib bomb": (png_of(png_ihdr(16, 16), zlib.compress(bytes(64 << 20), 9)), "image", "inflates past the 784"),
    "png short pixels": (png_of(png_ihdr(16, 16), zlib.compress(bytes(100))), "image", "holds 100 of the 784"),
    "png bad zlib": (png_of(png_ihdr(4, 4), b"not zlib at all"), "image", "not a valid zlib stream"),
    "png first not IHDR": (PNG_SIGNATURE + png_chunk(b"tEXt", b"a\0b") + PNG_OK[8:], "image",
                           "first chunk is not IHDR"),
    "png two IHDR": (png_of(png_ihdr(2, 2), zlib.compress(bytes(14)), png_ihdr(2, 2)), "image", "repeated IHDR"),
    "png bad depth": (png_of(png_ihdr(2, 2, depth=4, colour=2)), "image", "colour type 2, bit depth 4"),
    "png no IDAT": (PNG_SIGNATURE + png_ihdr(2, 2) + IEND, "image", "no IDAT chunk"),
    "png huge chunk length": (PNG_SIGNATURE + struct.pack(">I", 0xFFFFFFF0) + b"IHDR" + bytes(20), "image",
                              "runs past the end"),
    "png filter type 7": (png_of(png_ihdr(2, 3), zlib.compress(bytes(14) + b"\x07" + bytes(6))), "image",
                          "unknown PNG filter type"),
    # Adam7 of 9x1 grey: rows of 3, 2, 3 and 5 bytes; the third row's filter byte is at 5
    "png interlaced filter 5": (png_of(png_ihdr(9, 1, 8, 0, 1), zlib.compress(bytes(5) + b"\x05" + bytes(7))), "image",
                                "unknown PNG filter type"),
    "png palette without PLTE": (png_of(png_ihdr(2, 2, 8, 3), zlib.compress(bytes(6))), "image",
                                 "without a palette (PLTE)"),
    "png bad PLTE": (png_of(png_ihdr(2, 2, 8, 3), zlib.compress(bytes(6)), png_chunk(b"PLTE", bytes(5))), "image",
                     "a bad PNG palette"),
    "png tRNS on RGBA": (png_of(png_ihdr(1, 1, 8, 6), zlib.compress(bytes(5)), png_chunk(b"tRNS", bytes(2))),
                         "image", "tRNS: 2 bytes where no belong"),
    "png tRNS past palette": (png_of(png_ihdr(1, 1, 8, 3), zlib.compress(bytes(2)), png_chunk(b"PLTE", bytes(6)),
                                     png_chunk(b"tRNS", bytes(3))), "image", "3 bytes where at most 2 belong"),
    "png tRNS after IDAT": (png_of(png_ihdr(1, 1), zlib.compress(bytes(4)))[:-12] + png_chunk(b"tRNS", bytes(6))
                            + IEND, "image", "before the pixels"),
    "png unknown critical chunk": (png_of(png_ihdr(1, 1), zlib.compress(bytes(4)), png_chunk(b"ABCD", b"")), "image",
                                   "critical PNG chunk 'ABCD'"),
    # JPEG
    "jpeg without EOI": (JPEG_OK[:-2], "image", "no end-of-image marker"),
    "jpeg cut in headers": (JPEG_OK[:40], "image", "is truncated"),
    "jpeg SOI only": (b"\xff\xd8\xff", "image", "is truncated"),
    "jpeg arithmetic": (jpeg_with_frame(8, 8, 8, marker=0xC9), "image", "frame type 0xFFC9"),
    "jpeg lossless": (jpeg_with_frame(8, 8, 8, marker=0xC3), "image", "lossless, hierarchical or arithmetic"),
    "jpeg 12-bit": (jpeg_with_frame(12, 8, 8), "image", "12-bit, 1 components"),
    "jpeg 2 components": (jpeg_with_frame(8, 8, 8, 2), "image", "8-bit, 2 components"),
    "jpeg zero height": (jpeg_with_frame(8, 8, 0), "image", "size of 8x0 pixels"),
    "jpeg 30000x30000": (jpeg_with_frame(8, 30000, 30000), "image", "is 30000x30000 pixels"),
    "jpeg scan before frame": (b"\xff\xd8" + jpeg_segment(0xDA, bytes(8)) + b"\xff\xd9", "image", "before any frame"),
    "jpeg EOI first": (b"\xff\xd8\xff\xd9", "image", "ends (EOI) before its image data"),
    "jpeg no marker": (b"\xff\xd8\xff\xe0\x00\x04ab" + b"junk", "image", "a JPEG marker is missing"),
    "jpeg impossible huffman": (JPEG_OK.replace(jpeg_segment(0xC4, bytes([0, 1] + [0] * 16)),
                                                jpeg_segment(0xC4, bytes([0, 3] + [0] * 15 + [0, 1, 2]))), "image",
                                "impossible code lengths"),
    "jpeg DC category 49": (JPEG_OK.replace(bytes([0x00, 1] + [0] * 15 + [0]), bytes([0x00, 1] + [0] * 15 + [49]), 1),
                            "image", "codes a category above 15"),
    "jpeg undefined table": (JPEG_OK.replace(b"\xff\xda\x00\x0c\x03\x01\x00", b"\xff\xda\x00\x0c\x03\x01\x22"),
                             "image", "names a component or Huffman table that is not defined"),
    "jpeg progressive DC and AC": (mf.jpeg(8, 8, 1, 0xC2).replace(b"\x00\x00\x00\x00\x7f", b"\x00\x00\x3f\x00\x7f"),
                                   "image", "spectral range 0-63"),
    "jpeg bad quant table": (JPEG_OK.replace(b"\xff\xdb\x00\x43\x00", b"\xff\xdb\x00\x43\x20"), "image",
                             "bad JPEG quantisation table"),
    "jpeg unexpected segment": (JPEG_OK.replace(b"\xff\xdb", b"\xff\xc8", 1), "image",
                                "unexpected JPEG segment 0xFFC8"),
    "jpeg bad sampling": (jpeg_with_frame(8, 8, 8).replace(b"\x01\x11\x00", b"\x01\x51\x00"), "image",
                          "bad sampling factors"),
    # BMP
    "bmp RLE": (mf.bmp(4, 4, 8, compression=1), "image", "compression 1"),
    "bmp truncated rows": (mf.bmp(16, 16)[:-100], "image", "is truncated: its pixel rows need"),
    "bmp 30000x30000": (mf.bmp(1, 1)[:18] + struct.pack("<ii", 30000, 30000) + mf.bmp(1, 1)[26:], "image",
                        "is 30000x30000 pixels"),
    "bmp unknown header": (mf.bmp(2, 2, header=64), "image", "BMP header of 64 bytes"),
    "bmp cut": (b"BM" + bytes(10), "image", "ends inside the BMP header"),
    # GIF
    "gif without trailer": (mf.gif(4, 4)[:-1], "image", "ends inside a GIF block"),
    "gif cut in data": (mf.gif(30, 30)[:-20], "image", "is truncated"),
    "gif no frames": (mf.gif(4, 4)[:19] + b"\x3b", "image", "a GIF without frames"),
    "gif frame outside": (mf.gif(4, 4)[:20] + struct.pack("<HHHH", 2, 2, 4, 4) + mf.gif(4, 4)[28:], "image",
                          "lies outside its 4x4 screen"),
    "gif 65535x65535": (b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0) + b"\x3b", "image",
                        "is 65535x65535 pixels"),
    "gif unknown block": (mf.gif(2, 2)[:19] + b"\x99", "image", "unknown GIF block 0x99"),
    # audio
    "wav truncated": (wav_fmt(1, 1, 16000, 16, bytes(100), data_size=1 << 30), "audio", "its data chunk says"),
    "wav adpcm": (wav_fmt(2, 1, 16000, 4), "audio", "format tag 2"),
    "wav too long": (mf.wav(601 * 1000, rate=1000, bits=8), "audio", "is 601.0 seconds long; at most 600"),
    "wav no samples": (mf.wav(0), "audio", "holds no audio samples"),
    "wav 0 Hz": (wav_fmt(1, 1, 0, 16), "audio", "1 channels at 0 Hz"),
    "wav 0 channels": (wav_fmt(1, 0, 16000, 16), "audio", "block align 0"),
    "wav data first": (b"RIFF\x40\0\0\0WAVEdata\x04\0\0\0abcd" + bytes(40), "audio", "before its fmt chunk"),
    "wav cut header": (b"RIFF\x40\0\0\0WAVEfm", "audio", "ends inside a WAV chunk header"),
    "flac unknown length": (mf.flac_header(frames=0), "audio", "does not say how many samples"),
    "flac too long": (mf.flac_header(frames=16000 * 601), "audio", "is 601.0 seconds long"),
    "flac cut": (mf.flac_header()[:20], "audio", "FLAC metadata block runs past the end"),
    "flac no frame": (mf.flac_header()[:42] + b"\0\0", "audio", "no FLAC audio frame follows"),
    "flac not streaminfo": (b"fLaC\x84\0\0\x04abcd", "audio", "first metadata block is not STREAMINFO"),
    "mp3 last frame cut": (MP3_OK[:-100], "audio", "its last MP3 frame needs 100 more bytes"),
    "mp3 junk after tag": (b"ID3\x04\0\0\0\0\0\0" + b"junk" * 30, "audio", "no MPEG audio frame header at byte 10"),
    "mp3 tag only": (b"ID3\x04\0\0\0\0\0\0", "audio", "holds no MP3 audio frames"),
    "mp3 too long": (mf.mp3(23000, tag=False), "audio", "is 600.8 seconds long"),
    "mp3 free bitrate": (b"\xff\xfb\x00\xc0" + bytes(400), "audio", "no MPEG audio frame header at byte 0"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_media_is_refused_with_one_line(name):
    data, kind, problem = CASES[name]
    with pytest.raises(InputError) as info:
        load_media(data, kind, name=f"case {name}")
    message = str(info.value)
    assert message.startswith(f"case {name}: ") and "\n" not in message, message
    assert problem in message, message


def test_a_file_is_named_in_the_error(tmp_path):
    bad = tmp_path / "photo.png"
    bad.write_bytes(PNG_OK[:50])
    with pytest.raises(InputError, match=r"photo\.png: is truncated"):
        load_media(bad, "image")
    with pytest.raises(InputError, match=r"missing\.jpg: file not found"):
        load_media(tmp_path / "missing.jpg", "image")
    with pytest.raises(InputError, match=f"{tmp_path}: is a directory"):
        load_media(tmp_path, "audio")
    with pytest.raises(InputError, match="more than the 33554432"):
        load_media(bytes(MAX_MEDIA_BYTES + 1), "image")


# -- valid files: accepted, with the sizes stb_image reads --------------------------------------------------------
def stb_decode(data: bytes) -> tuple[int, int, bytes]:
    """libmtmd's own decoder on ``data``: (width, height, RGB bytes). Its image path does not use the context."""
    import llama_cpp.mtmd_cpp as mtmd

    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    bitmap = mtmd.mtmd_helper_bitmap_init_from_buf_wrapper(None, buf, len(data), False,
                                                         mtmd.mtmd_helper_init_opt_default()).bitmap
    assert bitmap, "stb_image refused a file load_media accepted"
    try:
        nx, ny = mtmd.mtmd_bitmap_get_nx(bitmap), mtmd.mtmd_bitmap_get_ny(bitmap)
        pixels = ctypes.string_at(mtmd.mtmd_bitmap_get_data(bitmap), mtmd.mtmd_bitmap_get_n_bytes(bitmap))
        return nx, ny, pixels
    finally:
        mtmd.mtmd_bitmap_free(bitmap)


def interlaced_png(width: int, height: int) -> bytes:
    passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
    size = sum(h * (1 + w * 3) for w, h in (((width - x + dx - 1) // dx, (height - y + dy - 1) // dy)
                                            for x, y, dx, dy in passes) if w > 0 and h > 0)
    return png_of(png_ihdr(width, height, 8, 2, interlace=1), zlib.compress(bytes(size)))


RNG = np.random.default_rng(19)
VALID = {  # name: (bytes, format, width, height)
    "png rgb": (mf.png(RNG.integers(0, 256, (20, 30, 3))), "png", 30, 20),
    "png grey": (mf.png(RNG.integers(0, 256, (7, 5))), "png", 5, 7),
    "png rgba": (mf.png(RNG.integers(0, 256, (9, 11, 4))), "png", 11, 9),
    "png interlaced": (interlaced_png(13, 11), "png", 13, 11),
    "png palette": (png_of(png_ihdr(3, 2, 8, 3), zlib.compress(bytes(8)), png_chunk(b"PLTE", bytes(range(6))),
                           png_chunk(b"tRNS", b"\x80"), png_chunk(b"tEXt", b"k\0v")), "png", 3, 2),
    "png grey tRNS": (png_of(png_ihdr(2, 2, 16, 0), zlib.compress(bytes(10)), png_chunk(b"tRNS", bytes(2))), "png",
                      2, 2),
    "jpeg colour": (mf.jpeg(33, 17), "jpeg", 33, 17),
    "jpeg grey": (mf.jpeg(8, 8, 1), "jpeg", 8, 8),
    "jpeg extended": (mf.jpeg(16, 24, 3, 0xC1), "jpeg", 16, 24),
    "jpeg progressive": (mf.jpeg(40, 24, 3, 0xC2), "jpeg", 40, 24),
    "bmp 24": (mf.bmp(13, 7), "bmp", 13, 7),
    "bmp 8": (mf.bmp(5, 3, 8), "bmp", 5, 3),
    "bmp 32": (mf.bmp(4, 4, 32), "bmp", 4, 4),
    "bmp 1": (mf.bmp(9, 2, 1), "bmp", 9, 2),
    "bmp v5 header": (mf.bmp(6, 6, 24, header=124), "bmp", 6, 6),
    "gif": (mf.gif(6, 5), "gif", 6, 5),
}


@pytest.mark.parametrize("name", list(VALID))
def test_valid_images_pass_with_the_size_stb_image_reads(name):
    data, fmt, width, height = VALID[name]
    media = load_media(data, "image", name=name)
    assert (media.kind, media.format, media.width, media.height, media.data) == ("image", fmt, width, height, data)
    assert stb_decode(data)[:2] == (width, height)


def test_png_pixels_reach_libmtmd_unchanged(tmp_path):
    pixels = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = tmp_path / "fixture.png"
    path.write_bytes(mf.png(pixels))
    media = load_media(path, "image")
    assert media.name == str(path) and isinstance(media, Media)
    assert stb_decode(media.data)[2] == pixels.tobytes()


def test_valid_audio_passes_with_its_length():
    wav = load_media(mf.wav(RNG.integers(-3000, 3000, 32000), rate=16000), "audio", name="a.wav")
    assert (wav.format, wav.sample_rate, wav.channels, wav.frames, wav.seconds) == ("wav", 16000, 1, 32000, 2.0)
    stereo = load_media(mf.wav(4800, rate=48000, channels=2, bits=32, tag=3), "audio")
    assert (stereo.channels, stereo.frames, stereo.seconds) == (2, 4800, 0.1)
    flac = load_media(mf.flac_header(rate=44100, channels=2, frames=441000), "audio")
    assert (flac.format, flac.sample_rate, flac.channels, flac.seconds) == ("flac", 44100, 2, 10.0)
    mp3 = load_media(MP3_OK, "audio")
    assert (mp3.format, mp3.sample_rate, mp3.channels, mp3.frames) == ("mp3", 44100, 1, 40 * 1152)
    assert load_media(mf.mp3(3, tag=False), "audio").frames == 3 * 1152
    for tail in (b"APETAGEX" + bytes(24), bytes(300), b"TAG" + bytes(125)):
        assert load_media(mf.mp3(2) + tail, "audio").frames == 2 * 1152


# -- nothing the size of the image is ever allocated ----------------------------------------------------------------
RSS_PROBE = """
import json, resource, sys, zlib
from chatglm.devtools.media_files import PNG_SIGNATURE, png_chunk, png_ihdr
from chatglm.errors import InputError
from chatglm.runtime.media import load_media
def png(w, h, raw):
    return PNG_SIGNATURE + png_ihdr(w, h) + png_chunk(b"IDAT", raw) + png_chunk(b"IEND", b"")
cases = {"huge header": png(30000, 30000, zlib.compress(bytes(1000))),
         "bomb": png(16, 16, zlib.compress(bytes(64 << 20), 9)),
         "8192x8192 accepted": png(8192, 8192, zlib.compress(bytes(8192 * (1 + 3 * 8192)), 9))}
out = {}
for name, data in cases.items():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        load_media(data, "image", name=name)
        result = "accepted"
    except InputError as exc:
        result = str(exc)
    out[name] = [result, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024]
print(json.dumps(out))
"""


def test_huge_headers_and_bombs_are_checked_in_small_memory():
    """A 30000x30000 header is refused from 33 bytes; a 64 MiB zlib bomb and a 192 MiB image are inflated 1 MiB
    at a time: the peak RSS of a fresh process grows by a few MiB at most (ru_maxrss, MiB)."""
    r = subprocess.run([sys.executable, "-c", RSS_PROBE], capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert "is 30000x30000 pixels" in out["huge header"][0] and "inflates past" in out["bomb"][0], out
    assert out["8192x8192 accepted"][0] == "accepted", out
    assert all(grown < 16 for _, grown in out.values()), out

"""The header readers behind :func:`chatglm.runtime.media.load_media`: one per format, each walking the file's structure
as the native decoder would (stb_image for images, miniaudio for audio) without decoding a pixel or a sample.

Each reader takes the whole file's bytes and returns what its header says (``width``/``height``, or ``sample_rate``/
``channels``/``frames``), or raises :class:`BadMedia` with the problem; :data:`READERS` maps format names to them.
"""

from __future__ import annotations

import struct
import zlib
from typing import Callable

from chatglm.limits import MAX_AUDIO_SECONDS, MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE

MAX_CHUNKS = 1 << 16  # PNG chunks / JPEG segments / GIF blocks walked (real files have tens)
INFLATE_PIECE = 1 << 20  # bytes of PNG pixel data inflated at a time: the check never holds the image


class BadMedia(Exception):
    """A problem found in the bytes; :func:`~chatglm.runtime.media.load_media` names the source in its InputError."""


def _u(fmt: str, data: bytes, pos: int, what: str) -> tuple:
    """``struct.unpack_from`` that calls a short read truncation."""
    if pos < 0 or pos + struct.calcsize(fmt) > len(data):
        raise BadMedia(f"is truncated: it ends inside {what}")
    return struct.unpack_from(fmt, data, pos)


def _dimensions(width: int, height: int) -> dict:
    if width <= 0 or height <= 0:
        raise BadMedia(f"has an image size of {width}x{height} pixels; both sides must be at least 1")
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > MAX_IMAGE_PIXELS:
        raise BadMedia(f"is {width}x{height} pixels; at most {MAX_IMAGE_SIDE} per side and {MAX_IMAGE_PIXELS} pixels "
                       "in all are accepted")
    return {"width": width, "height": height}


# -- PNG ----------------------------------------------------------------------------------------------------------
PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type -> bit depths
PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))


PNG_TRNS_LENGTHS = {0: 2, 2: 6}  # transparency of grey / RGB images: one sample per channel


def _png(data: bytes) -> dict:
    pos, size, inflater, inflated, seen = 8, {}, zlib.decompressobj(), 0, set()
    rows, colour, palette = (), 0, 0
    for _ in range(MAX_CHUNKS):
        length, ctype = _u(">I4s", data, pos, "a chunk header")
        body = pos + 8
        if length > (1 << 31) - 1 or body + length + 4 > len(data):
            raise BadMedia(f"is truncated: its {ctype.decode('latin-1')!r} chunk runs past the end of the file")
        (crc,) = struct.unpack_from(">I", data, body + length)
        if zlib.crc32(memoryview(data)[pos + 4:body + length]) != crc:
            raise BadMedia(f"is corrupt: the CRC of its {ctype.decode('latin-1')!r} chunk does not match")
        if not seen and ctype != b"IHDR":
            raise BadMedia("is not a valid PNG: its first chunk is not IHDR")
        if ctype == b"IHDR":
            size, rows, colour = _png_header(data, body, length, seen)
        elif ctype == b"IDAT":
            if colour == 3 and not palette:
                raise BadMedia("is corrupt: a palette PNG without a palette (PLTE) before its pixels")
            inflated = _inflate(inflater, memoryview(data)[body:body + length], inflated, rows)
        elif ctype == b"PLTE":
            palette = _png_palette(length, seen)
        elif ctype == b"tRNS":
            _png_transparency(length, colour, palette, seen)
        elif ctype == b"IEND":
            break
        elif not ctype[0] & 0x20:  # an upper-case first letter: a critical chunk, which a decoder must understand
            raise BadMedia(f"has a critical PNG chunk {ctype.decode('latin-1')!r} that stb_image does not know")
        seen.add(ctype)
        pos = body + length + 4
    else:
        raise BadMedia(f"has more than {MAX_CHUNKS} chunks")
    if b"IDAT" not in seen:
        raise BadMedia("has no image data (no IDAT chunk)")
    expected = rows[-1][2] if rows else 0
    if not inflater.eof or inflated != expected:
        raise BadMedia(f"is truncated or corrupt: its pixel data holds {inflated} of the {expected} bytes its header "
                       "promises")
    return size


def _png_palette(length: int, seen: set) -> int:
    if not length or length % 3 or length > 3 * 256 or b"IDAT" in seen:
        raise BadMedia("is corrupt: a bad PNG palette (PLTE)")
    return length // 3


def _png_transparency(length: int, colour: int, palette: int, seen: set) -> None:
    wanted = f"at most {palette}" if colour == 3 else str(PNG_TRNS_LENGTHS.get(colour, "no"))
    if b"IDAT" in seen or (colour == 3 and not 0 < length <= palette) or \
            (colour != 3 and length != PNG_TRNS_LENGTHS.get(colour)):
        raise BadMedia(f"is corrupt: a bad PNG transparency chunk (tRNS: {length} bytes where {wanted} belong, "
                       "before the pixels)")


def _png_header(data: bytes, body: int, length: int, seen: set) -> tuple[dict, tuple, int]:
    """(the size, the rows of each pass as (start, stride, end) in the inflated stream, the colour type)."""
    if length != 13 or seen:
        raise BadMedia("is not a valid PNG: a bad or repeated IHDR chunk")
    width, height, depth, colour, compression, filtering, interlace = struct.unpack_from(">IIBBBBB", data, body)
    size = _dimensions(width, height)
    if depth not in PNG_DEPTHS.get(colour, ()) or compression or filtering or interlace > 1:
        raise BadMedia(f"has a PNG header stb_image refuses (colour type {colour}, bit depth {depth}, interlace "
                       f"{interlace})")
    bits = PNG_CHANNELS[colour] * depth
    rows, start = [], 0
    for x0, y0, dx, dy in ADAM7 if interlace else ((0, 0, 1, 1),):
        w, h = (width - x0 + dx - 1) // dx, (height - y0 + dy - 1) // dy
        if w > 0 and h > 0:
            stride = 1 + (w * bits + 7) // 8  # a filter-type byte, then the row's pixels
            rows.append((start, stride, start + h * stride))
            start += h * stride
    return size, tuple(rows), colour


def _inflate(inflater, piece: memoryview, inflated: int, rows: tuple) -> int:
    """Inflate one IDAT chunk's bytes in bounded pieces, counting and checking each row's filter type; refuse a
    stream longer than the image."""
    expected, pending = rows[-1][2] if rows else 0, bytes(piece)
    while pending and not inflater.eof:
        try:
            out = inflater.decompress(pending, INFLATE_PIECE)
        except zlib.error:
            raise BadMedia("is corrupt: its pixel data is not a valid zlib stream") from None
        if inflated + len(out) > expected:
            raise BadMedia(f"is corrupt: its pixel data inflates past the {expected} bytes its header promises")
        _check_filters(out, inflated, rows)
        inflated += len(out)
        pending = inflater.unconsumed_tail
    return inflated


def _check_filters(out: bytes, at: int, rows: tuple) -> None:
    """The filter-type bytes (0-4) among ``out``, the inflated stream from offset ``at``."""
    end = at + len(out)
    for start, stride, stop in rows:
        lo, hi = max(at, start), min(end, stop)
        first = lo + (start - lo) % stride
        if first < hi and max(out[first - at:hi - at:stride]) > 4:
            raise BadMedia("is corrupt: a row of its pixel data has an unknown PNG filter type")


# -- JPEG ---------------------------------------------------------------------------------------------------------
JPEG_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive"}  # what stb_image decodes
JPEG_SOF_REFUSED = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless, hierarchical, arithmetic
JPEG_SKIPPED = {0xFE, *range(0xE0, 0xF0)}  # comments and APPn segments, which stb_image skips


def _jpeg(data: bytes) -> dict:
    """Walk the segments up to the first scan as stb_image's marker processing does, then look for EOI."""
    pos, frame, tables = 2, None, set()
    for _ in range(MAX_CHUNKS):
        if pos >= len(data) or data[pos] != 0xFF:
            raise BadMedia("is truncated or corrupt: a JPEG marker is missing" if pos < len(data) else
                           "is truncated: it ends before its image data")
        while pos < len(data) and data[pos] == 0xFF:
            pos += 1
        marker = _u("B", data, pos, "a JPEG marker")[0]
        pos += 1
        if marker == 0xD9:
            raise BadMedia("is truncated: it ends (EOI) before its image data")
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            continue
        (length,) = _u(">H", data, pos, "a JPEG segment")
        if length < 2 or pos + length > len(data):
            raise BadMedia(f"is truncated: its segment 0xFF{marker:02X} runs past the end of the file")
        body = memoryview(data)[pos + 2:pos + length]
        if marker in JPEG_SOF_REFUSED:
            raise BadMedia(f"is a JPEG kind stb_image does not decode (frame type 0xFF{marker:02X}: lossless, "
                           "hierarchical or arithmetic-coded); save it as a baseline or progressive JPEG")
        if marker in JPEG_SOF and frame is None:
            frame = (marker == 0xC2, *_jpeg_frame(body))
        elif marker == 0xC4:
            tables |= _jpeg_huffman(body)
        elif marker == 0xDB:
            _jpeg_quant(body)
        elif marker == 0xDA and frame is not None:
            _jpeg_scan(body, frame[0], frame[2], tables)
            if data.find(b"\xff\xd9", pos + length) < 0:
                raise BadMedia("is truncated: its image data has no end-of-image marker (EOI)")
            return frame[1]
        elif marker == 0xDA:
            raise BadMedia("is not a valid JPEG: its image data comes before any frame header (SOF)")
        elif not (marker in JPEG_SKIPPED or (marker == 0xDD and length == 4)):
            raise BadMedia(f"is corrupt: an unexpected JPEG segment 0xFF{marker:02X} before its image data")
        pos += length
    raise BadMedia(f"has more than {MAX_CHUNKS} JPEG segments before its image data")


def _jpeg_frame(body: memoryview) -> tuple[dict, set]:
    """(the size, the component ids) of a frame header (SOF0-2)."""
    precision, height, width, n = _u(">BHHB", body, 0, "the JPEG frame header")
    if precision != 8 or n not in (1, 3, 4):
        raise BadMedia(f"has a JPEG frame stb_image refuses ({precision}-bit, {n} components); 8-bit grey, colour or "
                       "CMYK only")
    if len(body) != 6 + 3 * n:
        raise BadMedia("is corrupt: its JPEG frame header has the wrong length")
    ids = set()
    for k in range(n):
        ident, hv, quant = body[6 + 3 * k:9 + 3 * k]
        if not (1 <= hv >> 4 <= 4 and 1 <= hv & 15 <= 4) or quant > 3:
            raise BadMedia("is corrupt: a JPEG component has bad sampling factors or quantisation table")
        ids.add(ident)
    return _dimensions(width, height), ids


def _jpeg_huffman(body: memoryview) -> set:
    """The (class, id) of each Huffman table a DHT segment defines, checked as stb_image builds them."""
    pos, defined = 0, set()
    while pos < len(body):
        kind, counts = body[pos], body[pos + 1:pos + 17]
        if kind >> 4 > 1 or kind & 15 > 3 or len(counts) < 16 or pos + 17 + sum(counts) > len(body) \
                or sum(counts) > 256:
            raise BadMedia("is corrupt: a bad JPEG Huffman table")
        code = 0
        for bits, count in enumerate(counts, 1):
            code += count
            if code > 1 << bits:
                raise BadMedia("is corrupt: a JPEG Huffman table with impossible code lengths")
            code <<= 1
        if kind >> 4 == 0 and max(body[pos + 17:pos + 17 + sum(counts)], default=0) > 15:
            raise BadMedia("is corrupt: a JPEG DC Huffman table codes a category above 15")
        defined.add((kind >> 4, kind & 15))
        pos += 17 + sum(counts)
    return defined


def _jpeg_quant(body: memoryview) -> None:
    pos = 0
    while pos < len(body):
        if body[pos] >> 4 > 1 or body[pos] & 15 > 3 or pos + 1 + 64 * (1 + (body[pos] >> 4)) > len(body):
            raise BadMedia("is corrupt: a bad JPEG quantisation table")
        pos += 1 + 64 * (1 + (body[pos] >> 4))


def _jpeg_scan(body: memoryview, progressive: bool, ids: set, tables: set) -> None:
    """The first scan header: its components are the frame's, its tables defined, its spectral range decodable."""
    n = body[0] if body else 0
    if not 1 <= n <= len(ids) or len(body) != 4 + 2 * n:
        raise BadMedia("is corrupt: a bad JPEG scan header")
    start, end, approx = body[1 + 2 * n:4 + 2 * n]
    if progressive:
        dc_scan = start == 0
        bad = end > 63 or start > end or approx >> 4 > 13 or approx & 15 > 13 or (dc_scan or n > 1) and end != 0
    else:
        dc_scan, bad = True, start != 0 or approx != 0
    if bad:
        raise BadMedia(f"is corrupt: a JPEG scan stb_image refuses (spectral range {start}-{end}, {n} components)")
    for k in range(n):
        ident, which = body[1 + 2 * k:3 + 2 * k]
        need = ([(0, which >> 4)] if dc_scan and not (progressive and approx >> 4) else []) + \
            ([(1, which & 15)] if not progressive or not dc_scan else [])
        if ident not in ids or any(t not in tables for t in need):
            raise BadMedia("is corrupt: a JPEG scan names a component or Huffman table that is not defined")


# -- BMP and GIF ---------------------------------------------------------------------------------------------------
BMP_HEADERS = (12, 40, 56, 108, 124)  # the DIB header sizes stb_image reads
BMP_DEPTHS = (1, 4, 8, 16, 24, 32)


def _bmp(data: bytes) -> dict:
    offset, header = _u("<8xII", data, 2, "the BMP header")
    if header not in BMP_HEADERS:
        raise BadMedia(f"has a BMP header of {header} bytes, which stb_image does not read")
    if header == 12:
        width, height, planes, bpp = _u("<HHHH", data, 18, "the BMP header")
        compression = 0
    else:
        width, height, planes, bpp, compression = _u("<iiHHI", data, 18, "the BMP header")
    if planes != 1 or bpp not in BMP_DEPTHS or compression not in (0, 3) or (compression == 3 and bpp not in (16, 32)):
        raise BadMedia(f"is a BMP kind stb_image does not decode ({bpp} bits per pixel, compression {compression}); "
                       "uncompressed or bitfields only")
    size = _dimensions(width, abs(height))
    row = (bpp * width + 31) // 32 * 4
    if offset < 14 + header or offset + row * abs(height) > len(data):
        raise BadMedia(f"is truncated: its pixel rows need {offset + row * abs(height)} bytes, the file has "
                       f"{len(data)}")
    return size


def _gif(data: bytes) -> dict:
    width, height, flags = _u("<HHB", data, 6, "the GIF header")
    size = _dimensions(width, height)
    pos, frames = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0), 0
    for _ in range(MAX_CHUNKS):
        block = _u("B", data, pos, "a GIF block")[0]
        if block == 0x3B:
            break
        if block == 0x21:
            pos = _sub_blocks(data, pos + 2)
        elif block == 0x2C:
            left, top, w, h, local = _u("<HHHHB", data, pos + 1, "a GIF image descriptor")
            if left + w > width or top + h > height:
                raise BadMedia(f"is corrupt: a GIF frame of {w}x{h} at ({left}, {top}) lies outside its "
                               f"{width}x{height} screen")
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0)
            if not 2 <= _u("B", data, pos, "a GIF frame")[0] <= 11:
                raise BadMedia("is corrupt: a GIF frame has a bad LZW code size")
            pos, frames = _sub_blocks(data, pos + 1), frames + 1
        else:
            raise BadMedia(f"is corrupt: an unknown GIF block 0x{block:02X}")
    else:
        raise BadMedia(f"has more than {MAX_CHUNKS} GIF blocks")
    if not frames:
        raise BadMedia("has no image in it (a GIF without frames)")
    return size


def _sub_blocks(data: bytes, pos: int) -> int:
    """The position after a GIF data sub-block chain (length-prefixed pieces up to a 0 length)."""
    while True:
        length = _u("B", data, pos, "a GIF data block")[0]
        if length == 0:
            return pos + 1
        pos += 1 + length


# -- audio --------------------------------------------------------------------------------------------------------
WAV_CODECS = {1: "PCM", 3: "float", 6: "A-law", 7: "mu-law"}
WAV_BITS = {1: (8, 16, 24, 32), 3: (32, 64), 6: (8,), 7: (8,)}
MAX_CHANNELS = 32
SAMPLE_RATES = (1000, 384000)


def _audio(sample_rate: int, channels: int, frames: int) -> dict:
    if not SAMPLE_RATES[0] <= sample_rate <= SAMPLE_RATES[1] or not 1 <= channels <= MAX_CHANNELS:
        raise BadMedia(f"has {channels} channels at {sample_rate} Hz; 1-{MAX_CHANNELS} channels at "
                       f"{SAMPLE_RATES[0]}-{SAMPLE_RATES[1]} Hz are accepted")
    if frames <= 0:
        raise BadMedia("holds no audio samples")
    if frames / sample_rate > MAX_AUDIO_SECONDS:
        raise BadMedia(f"is {frames / sample_rate:.1f} seconds long; at most {MAX_AUDIO_SECONDS:.0f} are accepted")
    return {"sample_rate": sample_rate, "channels": channels, "frames": frames}


def _wav(data: bytes) -> dict:
    pos, fmt = 12, None
    for _ in range(MAX_CHUNKS):
        cid, length = _u("<4sI", data, pos, "a WAV chunk header")
        body = pos + 8
        if cid == b"fmt ":
            fmt = _wav_format(data, body, length)
        elif cid == b"data":
            if fmt is None:
                raise BadMedia("is not a valid WAV: its data chunk comes before its fmt chunk")
            if body + length > len(data):
                raise BadMedia(f"is truncated: its data chunk says {length} bytes, the file holds {len(data) - body}")
            rate, channels, align = fmt
            return _audio(rate, channels, length // align)
        pos = body + length + (length & 1)
    raise BadMedia(f"has more than {MAX_CHUNKS} WAV chunks")


def _wav_format(data: bytes, body: int, length: int) -> tuple[int, int, int]:
    if length < 16:
        raise BadMedia("is not a valid WAV: its fmt chunk is too short")
    tag, channels, rate, _, align, bits = _u("<HHIIHH", data, body, "the WAV fmt chunk")
    if tag == 0xFFFE and length >= 40:  # WAVE_FORMAT_EXTENSIBLE: the codec is the sub-format GUID's first two bytes
        (tag,) = _u("<H", data, body + 24, "the WAV fmt chunk")
    if tag not in WAV_CODECS or bits not in WAV_BITS[tag] or align != channels * bits // 8 or not align:
        raise BadMedia(f"is a WAV encoding this server does not take (format tag {tag}, {bits} bits, block align "
                       f"{align}); use PCM, float, A-law or mu-law")
    return rate, channels, align


def _flac(data: bytes) -> dict:
    pos, info = 4, None
    for _ in range(MAX_CHUNKS):
        head, length_hi, length_lo = _u(">BBH", data, pos, "a FLAC metadata block")
        length, body = (length_hi << 16) | length_lo, pos + 4
        if body + length > len(data):
            raise BadMedia("is truncated: a FLAC metadata block runs past the end of the file")
        if info is None and (head & 0x7F != 0 or length != 34):
            raise BadMedia("is not a valid FLAC: its first metadata block is not STREAMINFO")
        if info is None:
            bits = int.from_bytes(data[body + 10:body + 18], "big")
            info = (bits >> 44, ((bits >> 41) & 7) + 1, bits & ((1 << 36) - 1))
        pos = body + length
        if head & 0x80:
            break
    else:
        raise BadMedia(f"has more than {MAX_CHUNKS} FLAC metadata blocks")
    if _u(">H", data, pos, "its first audio frame")[0] & 0xFFFE != 0xFFF8:
        raise BadMedia("is corrupt: no FLAC audio frame follows its metadata")
    rate, channels, frames = info
    if not frames:
        raise BadMedia("does not say how many samples it holds (FLAC STREAMINFO total 0); re-encode it")
    return _audio(rate, channels, frames)


MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # version bits -> Hz
MP3_KBPS = {  # (MPEG-1?, layer) -> kbit/s by bitrate index 1..14
    (True, 1): (32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448),
    (True, 2): (32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384),
    (True, 3): (32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    (False, 1): (32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256),
    (False, 2): (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
MP3_KBPS[(False, 3)] = MP3_KBPS[(False, 2)]


def _mp3(data: bytes) -> dict:
    pos = 0
    if data.startswith(b"ID3"):
        flags, s0, s1, s2, s3 = _u(">BBBBB", data, 5, "the ID3 tag")
        pos = 10 + (s0 << 21 | s1 << 14 | s2 << 7 | s3) + (10 if flags & 0x10 else 0)
    end = len(data) - 128 if data[-128:-125] == b"TAG" else len(data)
    frames = rate = channels = 0
    while pos < end:
        try:
            length, samples, rate_now, chans = _mp3_frame(data, pos)
        except BadMedia:
            if frames and _mp3_trailer(data[pos:end]):
                break
            raise
        if pos + length > end:
            raise BadMedia(f"is truncated: its last MP3 frame needs {pos + length - end} more bytes")
        if rate and rate_now != rate:
            raise BadMedia("is corrupt: its MP3 frames change sample rate")
        pos, frames, rate, channels = pos + length, frames + samples, rate_now, chans
    if not frames:
        raise BadMedia("holds no MP3 audio frames")
    return _audio(rate, channels, frames)


def _mp3_trailer(rest: bytes) -> bool:
    """What may follow the last frame of an MP3 that decoders skip: an APE or Lyrics3 tag, or zero padding."""
    return rest.startswith((b"APETAGEX", b"LYRICSBEGIN")) or not rest.strip(b"\0")


def _mp3_frame(data: bytes, pos: int) -> tuple[int, int, int, int]:
    """(length in bytes, samples, sample rate, channels) of the MPEG audio frame at ``pos``."""
    (head,) = _u(">I", data, pos, "an MP3 frame header")
    version, layer = (head >> 19) & 3, 4 - ((head >> 17) & 3)
    bitrate, rate_index, padding = (head >> 12) & 15, (head >> 10) & 3, (head >> 9) & 1
    if head >> 21 != 0x7FF or version == 1 or layer == 4 or bitrate in (0, 15) or rate_index == 3:
        raise BadMedia(f"is not a valid MP3: no MPEG audio frame header at byte {pos}")
    mpeg1 = version == 3
    rate, kbps = MP3_RATES[version][rate_index], MP3_KBPS[(mpeg1, layer)][bitrate - 1]
    channels = 1 if (head >> 6) & 3 == 3 else 2
    if layer == 1:
        return (12000 * kbps // rate + padding) * 4, 384, rate, channels
    samples = 1152 if layer == 2 or mpeg1 else 576
    return samples // 8 * 1000 * kbps // rate + padding, samples, rate, channels


READERS: dict[str, Callable[[bytes], dict]] = {"png": _png, "jpeg": _jpeg, "bmp": _bmp, "gif": _gif,
                                                "wav": _wav, "flac": _flac, "mp3": _mp3}

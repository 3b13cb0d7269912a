"""The zip container of a PyTorch checkpoint, checked before ``zipfile`` trusts it and before any member is read.

``zipfile`` believes what an archive declares: a central directory of any size, zip64 records, member sizes and
offsets. A checkpoint is checked here against its own file: the central directory is bounded and lies inside the
file, every member is unencrypted, named once, stored or deflated, its local header matches its directory entry, its
data lies inside the file without overlapping another member, and a stored member holds exactly its declared size.
Members are then read with a byte limit, every failure one InputError naming the file.
"""

from __future__ import annotations

import errno
import struct
import zipfile
import zlib
from typing import BinaryIO

from chatglm.errors import InputError

MAX_CENTRAL_DIRECTORY = 32 * 1024 * 1024  # ~500k members; a checkpoint shard has thousands
MAX_COMMENT = 0xFFFF
END = struct.Struct("<4s4H2LH")  # end of central directory: signature, disks, counts, size, offset, comment length
LOCATOR = struct.Struct("<4sLQL")  # zip64 end-of-central-directory locator
END64 = struct.Struct("<4sQ2H2L4Q")  # zip64 end of central directory
LOCAL = struct.Struct("<4s2B4HL2L2H")  # local file header
METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflated"}
CORRUPT = "corrupt PyTorch checkpoint: "
READ_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, struct.error, ValueError,
               NotImplementedError, RuntimeError, OverflowError, UnicodeDecodeError)


def printable(text: str, limit: int = 200) -> str:
    """A name from the file as it may appear in a one-line message: control characters escaped, length bounded."""
    shown = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _read_at(fh: BinaryIO, offset: int, n: int) -> bytes:
    fh.seek(offset)
    return fh.read(n)


def _zip64_directory(fh: BinaryIO, end_at: int, size: int, path) -> tuple[int, int]:
    """(size, position) of the central directory as the zip64 records declare them."""
    locator = _read_at(fh, end_at - LOCATOR.size, LOCATOR.size) if end_at >= LOCATOR.size else b""
    if len(locator) != LOCATOR.size or locator[:4] != b"PK\x06\x07":
        raise InputError(CORRUPT + "the zip archive declares zip64 sizes but has no zip64 locator", path)
    _, _, record_at, _ = LOCATOR.unpack(locator)
    record = _read_at(fh, record_at, END64.size) if record_at + END64.size <= end_at else b""
    if len(record) != END64.size or record[:4] != b"PK\x06\x06":
        raise InputError(CORRUPT + "the zip archive's zip64 end record lies outside the file", path)
    *_, directory_size, _directory_offset = END64.unpack(record)
    return directory_size, record_at


def check_directory(fh: BinaryIO, size: int, path) -> None:
    """Bound the central directory by the file and by :data:`MAX_CENTRAL_DIRECTORY` before ``zipfile`` reads it."""
    tail_at = max(0, size - END.size - MAX_COMMENT)
    tail = _read_at(fh, tail_at, size - tail_at)
    found = tail.rfind(b"PK\x05\x06")
    if found < 0 or found + END.size > len(tail):
        return  # not a zip archive: the caller says what the file is instead
    end_at = tail_at + found
    _, _, _, _, _, directory_size, directory_offset, _ = END.unpack_from(tail, found)
    directory_end = end_at
    if directory_size == 0xFFFFFFFF or directory_offset == 0xFFFFFFFF:
        directory_size, directory_end = _zip64_directory(fh, end_at, size, path)
    if directory_size > directory_end:
        raise InputError(CORRUPT + f"the zip archive's central directory ({directory_size} bytes) is larger than "
                                   "the file before it (truncated download?)", path)
    if directory_size > MAX_CENTRAL_DIRECTORY:
        raise InputError(CORRUPT + f"the zip archive's central directory is {directory_size} bytes, more than the "
                                   f"{MAX_CENTRAL_DIRECTORY} this reader accepts", path)


def open_archive(fh: BinaryIO, path) -> zipfile.ZipFile:
    """``zipfile.ZipFile(fh)`` with every way a damaged archive fails it turned into one InputError."""
    try:
        return zipfile.ZipFile(fh)
    except READ_ERRORS as exc:
        raise InputError(CORRUPT + f"damaged zip archive ({describe(exc)})", path) from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # a seek to an offset the archive made up
            raise InputError(CORRUPT + "damaged zip archive (an offset points outside the file)", path) from None
        raise


def describe(exc: BaseException) -> str:
    text = printable(str(exc), 120)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _local_name(info: zipfile.ZipInfo) -> bytes:
    try:
        return info.orig_filename.encode("utf-8" if info.flag_bits & 0x800 else "cp437")
    except UnicodeEncodeError:
        return info.orig_filename.encode("utf-8", "surrogateescape")


def _data_span(fh: BinaryIO, info: zipfile.ZipInfo, size: int, path) -> tuple[int, int]:
    """Where one member's data lies in the file, checked against its local header and the file's size."""
    name = printable(info.filename)
    if info.header_offset + LOCAL.size > size:
        raise InputError(CORRUPT + f"member {name} lies outside the file (truncated download?)", path)
    header = LOCAL.unpack(_read_at(fh, info.header_offset, LOCAL.size))
    signature, method, name_len, extra_len = header[0], header[4], header[10], header[11]
    if signature != b"PK\x03\x04" or method != info.compress_type:
        raise InputError(CORRUPT + f"member {name}'s local header does not match the zip directory", path)
    if _read_at(fh, info.header_offset + LOCAL.size, name_len) != _local_name(info):
        raise InputError(CORRUPT + f"member {name}'s local header names another file", path)
    start = info.header_offset + LOCAL.size + name_len + extra_len
    if start + info.compress_size > size:
        raise InputError(CORRUPT + f"member {name} lies outside the file (truncated download?)", path)
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise InputError(CORRUPT + f"member {name} is stored uncompressed but declares {info.file_size} bytes "
                                   f"and holds {info.compress_size}", path)
    return start, info.compress_size


def check_members(zf: zipfile.ZipFile, fh: BinaryIO, size: int, path) -> dict[str, tuple[int, int]]:
    """Each member's name -> (data offset, data bytes), after checking the members one by one and together."""
    spans: dict[str, tuple[int, int]] = {}
    for info in zf.infolist():
        name = printable(info.filename)
        if info.filename in spans:
            raise InputError(CORRUPT + f"the zip archive holds member {name} twice", path)
        if info.flag_bits & 0x1:
            raise InputError(f"member {name} is encrypted, which PyTorch never writes", path)
        if info.compress_type not in METHODS:
            raise InputError(f"member {name} is compressed with zip method {info.compress_type}, which PyTorch never "
                             "writes", path)
        spans[info.filename] = _data_span(fh, info, size, path)
    by_start = sorted((zf.getinfo(name).header_offset, start + n, name) for name, (start, n) in spans.items())
    for (_, end, first), (begin, _, second) in zip(by_start, by_start[1:]):
        if begin < end:
            raise InputError(CORRUPT + f"members {printable(first)} and {printable(second)} overlap in the zip "
                                       "archive", path)
    return spans


def read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, path) -> bytes:
    """A member's bytes (decompressed and CRC-checked), refused beyond ``limit`` bytes before and while reading."""
    name = printable(info.filename)
    if info.file_size > limit:
        raise InputError(CORRUPT + f"{name} is {info.file_size} bytes, more than the {limit} it can be", path)
    try:
        with zf.open(info) as member:
            data = member.read(limit + 1)
    except READ_ERRORS as exc:
        raise InputError(CORRUPT + f"{name} cannot be read from the zip archive ({describe(exc)})", path) from None
    if len(data) > limit:
        raise InputError(CORRUPT + f"{name} holds more than the {limit} bytes it can be", path)
    return data

"""Atomic file output: write to a temporary file beside the destination, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

from chatglm.errors import InputError, OutputError


def describe_os_error(exc: OSError) -> str:
    """A short, user-facing description of an OSError (no errno numbers, no paths)."""
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if exc.errno == errno.EROFS:
        return "read-only file system"
    if exc.errno == errno.ENOENT:
        return "no such file or directory"
    if exc.errno == errno.EISDIR:
        return "is a directory"
    return exc.strerror or str(exc)


@contextlib.contextmanager
def atomic_path(dest: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it is fsynced and renamed to ``dest``.

    On any failure (an exception, Ctrl-C) the temporary file is removed and ``dest`` is untouched. The temporary
    name starts with a dot and ends in ``.partial`` so a SIGKILLed run leaves nothing that looks like an output.
    """
    dest = Path(dest)
    directory = dest.parent
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=directory)
        os.close(fd)
    except OSError as exc:
        raise OutputError(f"cannot write here: {describe_os_error(exc)}", dest) from None
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"write failed: {describe_os_error(exc)}", dest) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output(dest: os.PathLike | str, mode: str = "wb") -> Iterator[BinaryIO]:
    """Like :func:`atomic_path`, but yields an open file object."""
    with atomic_path(dest) as tmp:
        with open(tmp, mode) as fh:
            yield fh


@contextlib.contextmanager
def reading(path: os.PathLike | str) -> Iterator[None]:
    """Reading a user-given file: an OSError inside becomes one InputError naming the file."""
    try:
        yield
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a file", path) from None
    except OSError as exc:
        raise InputError(f"cannot read the file ({describe_os_error(exc)})", path) from None


def read_text(path: os.PathLike | str) -> str:
    """A user-given UTF-8 file's text; every problem is one InputError naming the file."""
    with reading(path):
        data = Path(path).read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start})", path) from None

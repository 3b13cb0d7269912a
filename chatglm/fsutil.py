"""Atomic file output: write to a temporary file beside the destination, fsync, rename."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

import numpy as np

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


# ------------------------------------------------------------------------------------------ reading user files
# The one way user files are read: checked to be regular files before they are opened (a FIFO never blocks), every
# OSError mapped to one InputError naming the file, JSON bounded in size and depth before it is parsed.

MAX_JSON_BYTES = 64 * 1024 * 1024  # the largest published tokenizer.json is about 20 MB
MAX_JSON_DEPTH = 100  # published configs and tokenizers nest under 10 levels; tools schemas a few more
MAX_INT_DIGITS = 100  # no count, id or size in a published file has more digits

_FILE_KINDS = {  # os.stat mode test -> what the user is told the path is
    stat.S_ISDIR: "is a directory, not a file",
    stat.S_ISFIFO: "is not a regular file (a FIFO)",
    stat.S_ISSOCK: "is not a regular file (a socket)",
    stat.S_ISCHR: "is not a regular file (a character device)",
    stat.S_ISBLK: "is not a regular file (a block device)",
}


def _not_regular(mode: int) -> Optional[str]:
    if stat.S_ISREG(mode):
        return None
    return next((problem for test, problem in _FILE_KINDS.items() if test(mode)), "is not a regular file")


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


def check_regular(path: os.PathLike | str, *, missing: str = "file not found") -> os.stat_result:
    """``path``'s stat if it is a regular file (symlinks followed); otherwise one InputError saying what it is
    (``missing`` when there is nothing at ``path``)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InputError(missing, path) from None
    except OSError as exc:
        raise InputError(f"cannot read the file ({describe_os_error(exc)})", path) from None
    problem = _not_regular(st.st_mode)
    if problem:
        raise InputError(problem, path)
    return st


def open_regular(path: os.PathLike | str, *, missing: str = "file not found") -> BinaryIO:
    """Open a user-given file for binary reading, refusing anything but a regular file without ever blocking.

    The path is checked before it is opened (so no device is opened at all) and the descriptor again after (so a path
    swapped in between is caught); ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer.
    """
    check_regular(path, missing=missing)
    with reading(path):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        problem = _not_regular(os.fstat(fd).st_mode)
        if problem:
            raise InputError(problem, path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: os.PathLike | str, *, max_bytes: Optional[int] = None, what: str = "file",
               missing: str = "file not found") -> bytes:
    """A user-given regular file's bytes, refused before reading when it is larger than ``max_bytes``."""
    with open_regular(path, missing=missing) as fh, reading(path):
        size = os.fstat(fh.fileno()).st_size
        if max_bytes is None:
            return fh.read()
        data = fh.read(max_bytes + 1) if size <= max_bytes else b""
        if size > max_bytes or len(data) > max_bytes:  # (a file growing while it is read is caught too)
            raise InputError(f"{what} is {max(size, len(data))} bytes, more than the {max_bytes} this tool reads",
                             path)
        return data


def read_text(path: os.PathLike | str, *, max_bytes: Optional[int] = None) -> str:
    """A user-given UTF-8 file's text; every problem is one InputError naming the file."""
    data = read_bytes(path, max_bytes=max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.start})", path) from None


# --------------------------------------------------------------------------------------------- bounded JSON

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


class _Refused(ValueError):
    """A JSON value that is well-formed but refused (NaN, an out-of-range number)."""


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in ``text``, found without recursion (strings are skipped; an
    unterminated string counts as text, which can only overstate the depth of a document that is invalid anyway)."""
    outside = np.frombuffer(_STRING.sub('""', text).encode("utf-8", "surrogatepass"), dtype=np.uint8)
    steps = np.zeros(outside.shape, dtype=np.int8)
    steps[(outside == ord("[")) | (outside == ord("{"))] = 1
    steps[(outside == ord("]")) | (outside == ord("}"))] = -1
    moves = steps[np.flatnonzero(steps)].astype(np.int64)
    return int(np.cumsum(moves).max()) if moves.size else 0


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _check_surrogates(value: Any) -> None:
    """Refuse a string holding a lone UTF-16 surrogate (``"\\ud800"``): it is no text, and encoding it fails later."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _Refused(f"a string holds a lone UTF-16 surrogate (\\u{ord(exc.object[exc.start]):04x})") from None


def _constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _number(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise _Refused(f"number {text[:40]} is out of range")
    return value


def _integer(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _Refused(f"an integer of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def parse_json(text: str | bytes, path: os.PathLike | str, *, what: str = "JSON", max_depth: int = MAX_JSON_DEPTH,
               object_pairs_hook: Optional[Callable[[list], Any]] = None) -> Any:
    """``text`` parsed as strict JSON (RFC 8259: no NaN or Infinity) nested at most ``max_depth`` deep; every problem is
    one InputError naming ``path`` (syntax errors with their line and column)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"not valid {what}: not UTF-8 text (byte {exc.start})", path) from None
    if json_depth(text) > max_depth:
        raise InputError(f"not valid {what}: nested more than {max_depth} levels deep", path)
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_number, parse_int=_integer,
                           object_pairs_hook=object_pairs_hook)
        if _SURROGATE_ESCAPE.search(text):  # rare: only then is every string checked (the depth is bounded)
            _check_surrogates(value)
        return value
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid {what}: {exc.msg} at line {exc.lineno} column {exc.colno}", path) from None
    except _Refused as exc:
        raise InputError(f"not valid {what}: {exc}", path) from None
    except RecursionError:  # unreachable after the depth check; kept so no Python version can leak a traceback
        raise InputError(f"not valid {what}: nested too deeply", path) from None


def read_json(path: os.PathLike | str, *, what: str = "JSON", max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A user-given JSON file, bounded in size and depth; see :func:`parse_json`."""
    return parse_json(read_bytes(path, max_bytes=max_bytes, what=what), path, what=what, max_depth=max_depth)

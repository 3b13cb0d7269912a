"""User files: atomic output (a temporary file beside the destination, fsynced and renamed) and checked reading."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import stat
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional

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


# -- writing: one way for every output file -------------------------------------------------------------------
#
# The data goes to an unnamed file (O_TMPFILE) in the destination's folder, linked to a hidden name and renamed over
# the destination once complete and fsynced: a process killed before the end leaves nothing to see. Where the file
# system has no O_TMPFILE the temporary file is named from the start (``.NAME.xxxxxxxx.partial``); the next write
# to the same destination removes such partials once their writer is gone (its lock on the file is released when the
# process dies, even by SIGKILL). Files follow the umask (created 0666 & ~umask), like any file the user writes.

PARTIAL_SUFFIX = ".partial"
_TOKEN_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"  # tempfile.mkstemp's alphabet: older partials match too
_TOKEN_LEN = 8
_STARTED = time.time()  # partials younger than this process are never removed by it
USE_UNNAMED = hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")
_NO_UNNAMED = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)  # the kernel or the file system lacks O_TMPFILE
_NOT_REGULAR = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))
_SOURCE_DEPTH = 2  # folders given as sources are searched this deep (a checkpoint folder and one level below)

log = logging.getLogger(__name__)


def check_destination(dest: os.PathLike | str, sources: Iterable[os.PathLike | str | None] = ()) -> None:
    """Refuse, before anything is written, a destination that exists and is not a regular file (a folder, a device,
    a FIFO: renaming over it would replace it) or that is the same file (device and inode: hard and symbolic links
    included) as one of ``sources`` (files, or folders searched for their files)."""
    try:
        st = os.stat(dest)
    except OSError:
        return  # nothing there (or its folder is unusable, which creating the temporary file reports)
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _NOT_REGULAR if test(st.st_mode)), "a special file")
        raise InputError(f"the output path exists and is {kind}, not a regular file; give a file path", dest)
    same = _same_file(dest, (st.st_dev, st.st_ino), sources)
    if same is not None:
        which = "an input" if os.path.abspath(same) == os.path.abspath(dest) else f"the input {same}"
        raise InputError(f"is the same file as {which}: writing it would destroy that input", dest)


def _same_file(dest: os.PathLike | str, key: tuple[int, int],
               sources: Iterable[os.PathLike | str | None]) -> Optional[str]:
    """The first source file with inode ``key``, named by another path than ``dest`` where there is one."""
    found = [path for source in sources if source is not None
             for path in _files_of(os.fspath(source), _SOURCE_DEPTH) if _inode(path) == key]
    others = [p for p in found if os.path.abspath(p) != os.path.abspath(dest)]
    return (others or found or [None])[0]


def _inode(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _files_of(path: str, depth: int) -> Iterator[str]:
    """``path`` itself, and when it is a folder its entries ``depth`` levels down (symlinked folders not entered)."""
    yield path
    if depth <= 0 or os.path.islink(path) or not os.path.isdir(path):
        return
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        yield from _files_of(entry.path, depth - 1)


def _partial_name(dest: Path) -> Path:
    token = "".join(secrets.choice(_TOKEN_CHARS) for _ in range(_TOKEN_LEN))
    return dest.with_name(f".{dest.name}.{token}{PARTIAL_SUFFIX}")


def remove_stale_partials(dest: os.PathLike | str) -> list[Path]:
    """Remove this tool's abandoned temporary files for ``dest``: our exact naming, regular files of this user
    older than this process, whose writer no longer holds its lock. Returns what was removed."""
    dest = Path(dest)
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.[{_TOKEN_CHARS}]{{{_TOKEN_LEN}}}{re.escape(PARTIAL_SUFFIX)}")
    try:
        names = [e.name for e in os.scandir(dest.parent) if pattern.fullmatch(e.name)]
    except OSError:
        return []
    removed = [dest.parent / n for n in names if _remove_if_abandoned(dest.parent / n)]
    for path in removed:
        log.info("removed %s, left by an interrupted run", path)
    return removed


def _remove_if_abandoned(path: Path) -> bool:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mtime >= _STARTED:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # fails while its writer runs
        if os.stat(path, follow_symlinks=False).st_ino != os.fstat(fd).st_ino:
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


class _Temporary:
    """The file being written: an open, locked descriptor, and the hidden name it has (none while unnamed)."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.name: Optional[Path] = None
        self.fd = self._open_unnamed() if USE_UNNAMED else None
        if self.fd is None:
            self.fd, self.name = self._open_named()
        with contextlib.suppress(OSError):  # a fresh file, so nobody holds it; without locks only the age check is left
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    @property
    def path(self) -> Path:
        """A path to open the file by (``/proc/self/fd/N`` while it has no name)."""
        return self.name if self.name is not None else Path(f"/proc/self/fd/{self.fd}")

    def _open_unnamed(self) -> Optional[int]:
        try:
            return os.open(self.dest.parent, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            if exc.errno in _NO_UNNAMED:
                return None
            raise

    def _open_named(self) -> tuple[int, Path]:
        for _ in range(100):
            name = _partial_name(self.dest)
            try:
                return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666), name
            except FileExistsError:
                continue
        raise FileExistsError(errno.EEXIST, "no free temporary name")

    def commit(self) -> None:
        """fsync, give the file its hidden name if it has none, and rename it over the destination."""
        os.fsync(self.fd)
        folder = os.open(self.dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            while self.name is None:
                self.name = self._link(folder)
            os.replace(self.name, self.dest)
            self.name = None
            with contextlib.suppress(OSError):
                os.fsync(folder)  # the rename itself is durable too
        finally:
            os.close(folder)

    def _link(self, folder: int) -> Optional[Path]:
        """Name the unnamed file (linkat with AT_SYMLINK_FOLLOW through /proc, which needs no privilege; a folder
        descriptor makes os.link call linkat rather than link, which would link the /proc entry itself)."""
        name = _partial_name(self.dest)
        try:
            os.link(f"/proc/self/fd/{self.fd}", name.name, dst_dir_fd=folder, follow_symlinks=True)
        except FileExistsError:
            return None
        return name

    def discard(self) -> None:
        if self.name is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.name)
            self.name = None
        os.close(self.fd)


@contextlib.contextmanager
def atomic_path(dest: os.PathLike | str, sources: Iterable[os.PathLike | str | None] = ()) -> Iterator[Path]:
    """Yield a path to write ``dest``'s new content to; on success it is fsynced and renamed to ``dest``.

    Before anything is written, :func:`check_destination` refuses a destination that is not a regular file or is the
    same file as one of ``sources``, and this tool's abandoned partials of ``dest`` are removed. On any failure (an
    exception, Ctrl-C, SIGKILL) ``dest`` is untouched and nothing is left beside it.
    """
    dest = Path(dest)
    check_destination(dest, sources)
    remove_stale_partials(dest)
    try:
        temp = _Temporary(dest)
    except OSError as exc:
        raise OutputError(f"cannot write here: {describe_os_error(exc)}", dest) from None
    try:
        yield temp.path
        check_destination(dest, sources)  # again: a long run gives time for something else to appear there
        temp.commit()
    except OSError as exc:
        raise OutputError(f"write failed: {describe_os_error(exc)}", dest) from None
    finally:
        temp.discard()


@contextlib.contextmanager
def atomic_output(dest: os.PathLike | str, mode: str = "wb",
                  sources: Iterable[os.PathLike | str | None] = ()) -> Iterator[BinaryIO]:
    """Like :func:`atomic_path`, but yields an open file object."""
    with atomic_path(dest, sources) as tmp:
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
def reading(path: os.PathLike | str, what: str = "the file", *, missing: str = "file not found") -> Iterator[None]:
    """Reading a user-given file: an OSError inside becomes one InputError naming the file, "cannot read ``what``
    (the reason)" (``missing`` when the file is not there). Every read of a user's file goes through it."""
    try:
        yield
    except FileNotFoundError:
        raise InputError(missing, path) from None
    except IsADirectoryError:
        raise InputError("is a directory, not a file", path) from None
    except OSError as exc:
        raise InputError(f"cannot read {what} ({describe_os_error(exc)})", path) from None


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

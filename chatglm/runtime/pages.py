"""Give back the resident pages of a mapped model file whose tensors were copied elsewhere.

On the CPU, llama.cpp (and our GLM-1 engine) repack most quantized weights into a buffer of their own for faster
matrix kernels. The copy is read out of the memory-mapped GGUF, and the mapped pages it was read from stay resident
afterwards although nothing reads them again: the weights count twice in the process's memory (llama.cpp issue
#16761). ``madvise(MADV_DONTNEED)`` on those ranges drops them from this process; the mapping stays valid and a page
that is touched again is simply read back from the file. Linux only; elsewhere these are no-ops.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import sys
from typing import Iterable, Optional

log = logging.getLogger(__name__)

PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # linux/mman.h


def inner_pages(start: int, length: int, page: int = PAGE) -> Optional[tuple[int, int]]:
    """The whole pages inside ``[start, start + length)``: (aligned start, length), or None if there are none."""
    first = -(-start // page) * page
    last = (start + length) // page * page
    return (first, last - first) if last > first else None


def file_mappings(path: os.PathLike | str, maps_text: Optional[str] = None) -> list[tuple[int, int, int]]:
    """This process's mappings of ``path``: (start address, end address, file offset) for each one."""
    target = os.path.realpath(path)
    if maps_text is None:
        try:
            with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
                maps_text = fh.read()
        except OSError:
            return []
    found = []
    for line in maps_text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            found.append((lo, hi, int(fields[2], 16)))
    return found


def release_mapped_ranges(path: os.PathLike | str, ranges: Iterable[tuple[int, int]],
                          maps: Optional[list[tuple[int, int, int]]] = None) -> int:
    """Drop this process's resident pages of the file ranges ``(offset, length)`` of ``path`` wherever it is mapped
    (by any library in the process). Returns the bytes released; 0 where this is not supported."""
    if not sys.platform.startswith("linux"):
        return 0
    maps = file_mappings(path) if maps is None else maps
    if not maps:
        return 0
    madvise = _libc_madvise()
    released = 0
    for offset, length in ranges:
        for lo, hi, file_off in maps:
            # the part of this range that the mapping holds, as addresses
            a = max(lo, lo + offset - file_off)
            b = min(hi, lo + offset + length - file_off)
            pages = inner_pages(a, b - a) if b > a else None
            if pages and madvise(pages[0], pages[1], _MADV_DONTNEED) == 0:
                released += pages[1]
    return released


def _libc_madvise():
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


class TensorPageReleaser:
    """Releases the mapped pages of named tensors of a GGUF as their copies are made (call it with the names done so
    far, as often as wanted), so that the copies never sit beside their source: the peak stays near the file size."""

    def __init__(self, header) -> None:
        self.header = header
        self.released = 0
        self._maps: Optional[list[tuple[int, int, int]]] = None

    def __call__(self, names: Iterable[str]) -> None:
        tensors = self.header.tensors
        ranges = [(self.header.data_offset + tensors[n].offset, tensors[n].nbytes) for n in names if n in tensors]
        if not ranges:
            return
        if not self._maps:
            self._maps = file_mappings(self.header.path)
        self.released += release_mapped_ranges(self.header.path, ranges, self._maps)


def release_mmap_range(mm: mmap.mmap, offset: int, length: int) -> int:
    """The same for a Python ``mmap`` object we own: drop the whole pages inside ``[offset, offset + length)``."""
    pages = inner_pages(offset, length)
    if pages is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    try:
        mm.madvise(mmap.MADV_DONTNEED, pages[0], pages[1])
    except (OSError, ValueError):
        return 0
    return pages[1]

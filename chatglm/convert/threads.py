"""How many threads conversion and quantization use: every CPU this process may run on, unless told otherwise."""

from __future__ import annotations

import os
from typing import Optional

from chatglm.errors import InputError


def usable_cpus() -> int:
    """The CPUs in this process's affinity mask (a container's or ``taskset``'s limit), ``os.cpu_count()`` where
    the platform has no mask."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def quant_threads(threads: Optional[int]) -> int:
    """``threads`` when given, else :func:`usable_cpus`."""
    if threads is None:
        return usable_cpus()
    if type(threads) is not int or threads < 1:
        raise InputError(f"the thread count must be a positive integer, got {threads!r}")
    return threads

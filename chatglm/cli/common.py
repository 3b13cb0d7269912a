"""Shared CLI plumbing: error mapping, option types, progress display."""

from __future__ import annotations

import functools
import logging
import os
import sys
from typing import Callable, Optional

import typer

from chatglm.errors import ChatGLMError

DEBUG_ENV = "CHATGLM_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(func: Callable) -> Callable:
    """Map the package's errors to one line on stderr and their exit code (CHATGLM_DEBUG=1 keeps tracebacks)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ChatGLMError as exc:
            if debug_enabled():
                raise
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            raise fail("interrupted", 130) from None
        except MemoryError:
            raise fail("out of memory", 1) from None

    return wrapper


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from chatglm.runtime.llama_native import set_native_verbose

    set_native_verbose(verbose)


class ByteProgress:
    """A progress bar with bytes and ETA on a terminal; silent otherwise."""

    def __init__(self, label: str, enabled: Optional[bool] = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None
        self._task = None
        self.label = label

    def __enter__(self) -> "ByteProgress":
        if self.enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int, name: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total,
                                  description=f"{self.label} {name}"[:60])

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

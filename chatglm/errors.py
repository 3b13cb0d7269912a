"""One exception hierarchy for the whole package.

The CLI maps every :class:`ChatGLMError` to one line on stderr and its ``exit_code``; anything else is a bug and keeps
its traceback. Messages name the file and the problem: ``"{path}: {problem}"``.
"""

from __future__ import annotations

import os
from typing import Optional


class ChatGLMError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code = 1

    def __init__(self, message: str, path: Optional[os.PathLike | str] = None):
        self.path = None if path is None else os.fspath(path)
        self.problem = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(ChatGLMError):
    """A file or value given by the user is missing, malformed or unsupported (exit code 2)."""

    exit_code = 2


class UnsupportedModelError(InputError):
    """The checkpoint or GGUF is well-formed but of an architecture we do not handle."""


class OutputError(ChatGLMError):
    """Writing an output failed (disk full, permission denied, ...)."""

    exit_code = 3


class ModelRuntimeError(ChatGLMError):
    """The engine failed while evaluating (context overflow, native error code, ...)."""


class ContextOverflowError(ModelRuntimeError):
    """A prompt does not fit in the context window."""

    exit_code = 2


class Cancelled(ChatGLMError):
    """A generation or conversion was cancelled by the caller."""

    exit_code = 130


class BackendUnavailableError(ChatGLMError):
    """A remote backend (an RPC server) is down, busy or not one: try again once it is back (``serve``: 503)."""

    exit_code = 2


class EngineLostError(BackendUnavailableError):
    """The engine's worker process ended mid-call (an RPC server went away); the next call starts a new one."""

    exit_code = 1

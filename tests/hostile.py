"""The hostile-input corpus's one promise, checked the same way for every case.

Bad input gets exactly one ``error:`` line naming the file and the problem, a non-zero exit, no traceback, nothing at
the destination (no partial files either) and every source byte-identical. Cases that once killed the process run in
a child process (``isolated=True``): an abort there fails the test instead of taking pytest down with it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


def cli(args: Sequence[str], *, isolated: bool = False, timeout: float = 120, env: Optional[dict] = None,
        input: Optional[str] = None) -> Outcome:
    """``chatglm ARGS``: in this process through Typer's runner, or in a child process when ``isolated``."""
    args = [str(a) for a in args]
    if isolated:
        full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    **(env or {})}
        full_env.pop("CHATGLM_DEBUG", None)
        r = subprocess.run([sys.executable, "-m", "chatglm.cli", *args], capture_output=True, text=True,
                           timeout=timeout, env=full_env, input=input, stdin=None if input else subprocess.DEVNULL)
        return Outcome(r.returncode, r.stdout, r.stderr)
    from chatglm.cli.app import app

    r = CliRunner().invoke(app, args, input=input, env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return Outcome(r.exit_code, r.stdout, r.stderr if hasattr(r, "stderr") else "")


def digest(paths: Iterable[os.PathLike | str]) -> dict[str, str]:
    """sha256 of every file under the given files and folders (to prove sources unchanged)."""
    out = {}
    for p in map(Path, paths):
        files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def assert_refused(outcome: Outcome, names: str | os.PathLike, *, code: int | None = 2, problem: str = "",
                   dest: Optional[os.PathLike | str] = None, sources: Optional[dict[str, str]] = None) -> None:
    """The promise on bad input. ``names`` must appear in the error line (a path, or part of one); ``problem`` too
    when given. ``code`` None accepts any non-zero exit. ``sources`` is a :func:`digest` taken before the run."""
    text = outcome.text
    assert "Traceback" not in text, text
    assert outcome.code != 0 and (code is None or outcome.code == code), (outcome.code, text)
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text
    assert str(names) in errors[0], (str(names), errors[0])
    assert problem in errors[0], (problem, errors[0])
    if dest is not None:
        assert_nothing_at(dest)
    if sources is not None:
        assert digest(sources) == sources, "a source file changed"


def assert_nothing_at(dest: os.PathLike | str) -> None:
    """No file at ``dest`` and no temporary file of this tool beside it."""
    dest = Path(dest)
    assert not dest.exists(), f"{dest} was written"
    if dest.parent.is_dir():
        partials = [p.name for p in dest.parent.iterdir() if p.name.startswith(f".{dest.name}.")]
        assert not partials, partials


@contextlib.contextmanager
def deadline(seconds: int, what: str = "still running"):
    """In-process guard for what once hung or blocked in a system call: SIGALRM raises TimeoutError after
    ``seconds`` (main thread only)."""
    def expire(*_):
        raise TimeoutError(f"{what} after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)

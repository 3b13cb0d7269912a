"""Coverage-guided fuzzing of one target with atheris (``pip install atheris``).

    python tests/fuzz/run_atheris.py TARGET [--stats FILE] [--findings DIR] [libFuzzer args, corpus dirs]

The chatglm package is instrumented (edge coverage), the target is run once on each of its seeds (so every module
on its path is imported, and instrumented, before fuzzing starts), then libFuzzer mutates. A Python exception from
the target is a finding: its input is saved under ``--findings`` (``<kind>-<sha1>`` plus a ``.txt`` one-line
summary with the traceback), once per distinct place it was raised, and fuzzing goes on. Hangs (``-timeout``),
memory blow-ups (``-rss_limit_mb``) and signals stop the process; libFuzzer saves those inputs itself
(``-artifact_prefix``). ``--stats`` receives {"executions", "seconds" (of fuzzing), "findings" (one line each)} as
JSON about twice a second.
benchmarks/fuzz.py drives this script for every target.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
with atheris.instrument_imports(include=["chatglm"]):
    import targets  # noqa: E402
import jsonmut  # noqa: E402

targets.silence_logs()


def _short(filename: str) -> str:
    """A source path relative to the repository root, or a library file's name."""
    root = str(Path(__file__).resolve().parents[2]) + os.sep
    return filename[len(root):] if filename.startswith(root) else Path(filename).name


def json_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    """Half of the mutations of a JSON target replace one value of the document (jsonmut); the rest are libFuzzer's."""
    rng = random.Random(seed)
    if len(data) > 1 and rng.random() < 0.5:
        out = jsonmut.mutate(data[1:], rng, max_size - 1)
        if out is not None:
            return data[:1] + out
    return atheris.Mutate(data, max_size)


class Recorder:
    """Counts executions and saves each distinct Python exception's first input."""

    def __init__(self, run, stats: Path | None, findings: Path | None):
        self.run, self.stats, self.findings = run, stats, findings
        self.executions, self.seen, self.last_write = 0, set(), 0.0
        self.found: list[str] = []  # "summary (input file)" per distinct finding
        self.started: float | None = None  # the first execution (start-up and seed replay not counted)

    def __call__(self, data: bytes) -> None:
        if self.started is None:
            self.started = time.monotonic()
        self.executions += 1
        self.write_stats()
        try:
            self.run(data)
        except Exception as exc:  # noqa: BLE001  (any exception is what we are looking for)
            self.record(data, exc)

    def record(self, data: bytes, exc: Exception) -> None:
        frames = traceback.extract_tb(exc.__traceback__)
        where = f"{_short(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
        ours = [f for f in frames if "chatglm" + os.sep in f.filename and "tests" + os.sep not in f.filename]
        if ours and ours[-1] is not frames[-1]:
            where += f", from {_short(ours[-1].filename)}:{ours[-1].lineno}"
        key = (type(exc).__name__, where)
        if key in self.seen:
            return
        self.seen.add(key)
        summary = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''} (at {where})"
        print(f"FINDING {summary}", file=sys.stderr, flush=True)
        saved = "not saved"
        if self.findings is not None:
            self.findings.mkdir(parents=True, exist_ok=True)
            saved = str(self.findings / f"exception-{hashlib.sha1(data).hexdigest()}")
            Path(saved).write_bytes(data)
            text = "".join(traceback.format_exception(exc))
            Path(saved + ".txt").write_text(f"{summary}\n\n{text}", encoding="utf-8")
        self.found.append(f"{summary} ({_short(saved)})")
        self.write_stats(force=True)

    def write_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.stats is None or (not force and now - self.last_write < 0.5):
            return
        self.last_write = now
        tmp = self.stats.with_suffix(".tmp")
        seconds = now - self.started if self.started is not None else 0.0
        tmp.write_text(json.dumps({"executions": self.executions, "seconds": round(seconds, 3),
                                   "findings": self.found}))
        os.replace(tmp, self.stats)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("target", choices=sorted(targets.TARGETS))
    parser.add_argument("--stats", type=Path)
    parser.add_argument("--findings", type=Path)
    args, rest = parser.parse_known_args(argv[1:])
    target = targets.TARGETS[args.target]
    with atheris.instrument_imports(include=["chatglm"]):
        for data in target.seeds():  # imports (and instruments) every module on the target's path
            try:
                target.run(data)
            except Exception:  # noqa: BLE001  (reported when libFuzzer replays the seed)
                pass
    recorder = Recorder(target.run, args.stats, args.findings)
    recorder.write_stats(force=True)
    atheris.Setup([argv[0], *rest], recorder, custom_mutator=json_mutator if target.json else None)
    try:
        atheris.Fuzz()
    finally:
        recorder.write_stats(force=True)


if __name__ == "__main__":
    main(sys.argv)

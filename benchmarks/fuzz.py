"""Coverage-guided fuzzing of every reader of untrusted input, for a given time per target, with atheris.

    python benchmarks/fuzz.py --seconds 60 [--targets gguf_validate,server] [--jobs 2] [--json out.json]

Each target (tests/fuzz/targets.py) runs in its own child process (tests/fuzz/run_atheris.py), ``--jobs`` at a time,
for ``--seconds``. Seeds are built once (tests/fuzz/seeds.py) under benchmarks/.cache/fuzz/seeds; each target keeps
its corpus in benchmarks/.cache/fuzz/corpus/<target> (it grows from run to run) and its findings in
benchmarks/.cache/fuzz/findings/<target>: the input, and for Python exceptions a ``.txt`` with the traceback. A child
stopped by a hang, a memory blow-up or a signal is started again for the rest of its time.

Prints one row per target: wall seconds (child start-up included), executions, exec/s (per second spent executing
inputs), coverage (libFuzzer's edges ``cov`` and features ``ft``), findings with a one-line summary each. Exit status 1 when anything was found, 2 when atheris is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ_DIR = ROOT / "tests" / "fuzz"
CACHE = ROOT / "benchmarks" / ".cache" / "fuzz"
STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+)", re.M)
ARTIFACT = re.compile(r"Test unit written to (\S+)")
EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")
JSON_MAX_LEN = 1 << 16  # room for deeply nested documents in the JSON targets
CAUSES = (  # (libFuzzer's words on stderr, one-line summary)
    ("ERROR: libFuzzer: timeout", "hang: one execution ran past the time limit"),
    ("ERROR: libFuzzer: out-of-memory", "memory: the process grew past the RSS limit"),
    ("ERROR: libFuzzer: malloc", "memory: one allocation past the malloc limit"),
    ("ERROR: libFuzzer: deadly signal", "crash: the process was killed by a signal"),
    ("Uncaught Python exception", "exception outside the target"),
)

sys.path.insert(0, str(FUZZ_DIR))


@dataclass
class Row:
    target: str
    seconds: float = 0.0  # wall time, start-up of the children included
    fuzz_seconds: float = 0.0  # time spent executing inputs
    executions: int = 0
    cov: int = 0
    ft: int = 0
    starts: int = 0
    findings: list[str] = field(default_factory=list)  # "summary (file)"

    @property
    def exec_per_s(self) -> float:
        return self.executions / self.fuzz_seconds if self.fuzz_seconds else 0.0


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(FUZZ_DIR), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "CHATGLM_FUZZ_SEEDS": str(CACHE / "seeds")}


def prepare(names: list[str]) -> None:
    """Build the seeds once and put each target's seed inputs into its corpus folder."""
    os.environ["CHATGLM_FUZZ_SEEDS"] = str(CACHE / "seeds")
    import seeds
    import targets

    seeds.build(CACHE / "seeds")
    for name in names:
        corpus = CACHE / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(targets.TARGETS[name].seeds()):
            (corpus / f"seed-{i}").write_bytes(data)
    targets.close()


def _child(name: str, seconds: int, args: argparse.Namespace, log) -> subprocess.Popen:
    import targets

    findings = CACHE / "findings" / name
    findings.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(FUZZ_DIR / "run_atheris.py"), name, "--stats", str(CACHE / f"{name}.stats.json"),
           "--findings", str(findings), str(CACHE / "corpus" / name), f"-max_total_time={seconds}",
           f"-timeout={args.exec_timeout}", f"-rss_limit_mb={args.rss_limit_mb}", f"-artifact_prefix={findings}/",
           "-print_final_stats=1"] + ([f"-max_len={JSON_MAX_LEN}"] if targets.TARGETS[name].json else [])
    return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=log)


def _stats(name: str) -> dict:
    try:
        return json.loads((CACHE / f"{name}.stats.json").read_text())
    except (OSError, ValueError):
        return {}


def fuzz_target(name: str, args: argparse.Namespace) -> Row:
    """Run one target for ``args.seconds``, restarting it after a hang, memory blow-up or crash."""
    row = Row(name)
    start = time.monotonic()
    while (left := args.seconds - (time.monotonic() - start)) > 3 and row.starts < args.max_starts:
        (CACHE / f"{name}.stats.json").unlink(missing_ok=True)
        log_path = CACHE / f"{name}.log"  # libFuzzer's stderr, kept on disk: long runs write a lot of it
        with open(log_path, "wb") as log:
            code = _child(name, int(left), args, log).wait()
        err = _tail(log_path)
        row.starts += 1
        stats, executed = _stats(name), EXECUTED.findall(err)
        row.executions += max(int(stats.get("executions", 0)), int(executed[-1]) if executed else 0)
        row.fuzz_seconds += float(stats.get("seconds", 0.0))
        row.findings += [f for f in stats.get("findings", []) if f not in row.findings]
        found = STATUS.findall(err)
        if found:
            row.cov, row.ft = max(row.cov, int(found[-1][1])), max(row.ft, int(found[-1][2]))
        if code != 0:
            row.findings.append(_stopped(err, code))
    row.seconds = time.monotonic() - start
    return row


def _tail(path: Path, size: int = 1 << 20) -> str:
    """The last ``size`` bytes of a log, as text."""
    with open(path, "rb") as fh:
        fh.seek(max(0, fh.seek(0, os.SEEK_END) - size))
        return fh.read().decode("utf-8", "replace")


def _stopped(err: str, code: int) -> str:
    cause = next((text for marker, text in CAUSES if marker in err), f"the fuzzer exited with status {code}")
    artifact = ARTIFACT.findall(err)
    where = Path(artifact[-1]).relative_to(ROOT) if artifact and Path(artifact[-1]).is_absolute() else "?"
    last = [ln for ln in err.splitlines() if ln and not ln.startswith(("==", "MS:", "SUMMARY", "INFO", "#", "0x"))]
    return f"{cause}{': ' + last[-1][:120] if last and cause.startswith('exception') else ''} ({where})"


def table(rows: list[Row]) -> str:
    lines = ["| target | seconds | executions | exec/s | cov | ft | findings |",
             "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        found = "<br>".join(r.findings) if r.findings else "none"
        lines.append(f"| {r.target} | {r.seconds:.0f} | {r.executions:,} | {r.exec_per_s:,.0f} | {r.cov} | {r.ft} | "
                     f"{found} |")
    total = sum(r.executions for r in rows)
    lines.append(f"| **total** | {sum(r.seconds for r in rows):.0f} | {total:,} | | | | "
                 f"{sum(len(r.findings) for r in rows)} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=int, required=True, help="time per target")
    p.add_argument("--targets", default="", help="comma-separated target names (default: all)")
    p.add_argument("--jobs", type=int, default=2, help="targets fuzzed at the same time (default 2)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--exec-timeout", type=int, default=10, help="seconds one execution may take (default 10)")
    p.add_argument("--rss-limit-mb", type=int, default=2048, help="memory limit of a child (default 2048)")
    p.add_argument("--max-starts", type=int, default=20, help="restarts of a target after crashes (default 20)")
    args = p.parse_args(argv)
    if args.seconds < 5 or args.jobs < 1:
        p.error("--seconds must be at least 5 and --jobs at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("error: atheris is not installed: pip install atheris (Linux x86-64 and macOS wheels exist)",
              file=sys.stderr)
        return 2
    import targets

    names = [n for n in args.targets.split(",") if n] or list(targets.TARGETS)
    unknown = sorted(set(names) - set(targets.TARGETS))
    if unknown:
        print(f"error: unknown targets {', '.join(unknown)}; choose from {', '.join(targets.TARGETS)}",
              file=sys.stderr)
        return 2
    prepare(names)
    done: list[Row] = []
    lock = threading.Lock()

    def one(name: str) -> Row:
        row = fuzz_target(name, args)
        with lock:
            done.append(row)
            print(f"{name}: {row.executions:,} executions, {len(row.findings)} findings", file=sys.stderr, flush=True)
        return row

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(one, names))
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps([{**asdict(r), "exec_per_s": round(r.exec_per_s, 1)} for r in rows],
                                        indent=2), encoding="utf-8")
    return 1 if any(r.findings for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

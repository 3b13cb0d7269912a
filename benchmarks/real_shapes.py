#!/usr/bin/env python
"""GLM-4.7, GLM-4.7-Flash, GLM-5.3 and GLM-5.3-Flash at their real widths: ours vs llama.cpp on the same GGUF.

Each row of shapes.py (published config keys and tensor shapes, cut to fewer layers and experts, random weights; the
cut is printed with the row) is built as our converter writes it (bench_models.build_gguf, cached), then measured
three ways in one run, interleaved (each test runs on every side in turn, the order rotating every repetition, so
load drift on a shared machine hits all alike):

- **ours**: our engine (``chatglm.runtime.loader.open_engine``), timed as ``chatglm bench`` times it;
- **llama-cpp-python**: its low-level loop on the same file (python_overhead.BareLoop: a prepared batch,
  ``llama_decode``, ``llama_synchronize``), same threads, context, batch and KV type;
- **llama-bench**: the native tool (``--llama-bench PATH`` or on PATH; "not available" otherwise), one repetition
  per call and test, its JSON read back.

ours and llama-cpp-python each run in a worker process of their own, so each one's resident size (its peak, VmHWM)
is its own; llama-bench's is its ``wait4`` peak. pp = N random tokens prefilled into an empty cache; tg = M
single-token steps. Tokens/s are medians; ratios are medians of per-repetition ratios. A row whose family is not
registered yet prints "family not merged yet".

    python benchmarks/real_shapes.py                                 # every row, q4_k_m, pp128 tg32, 3 repetitions
    python benchmarks/real_shapes.py --models GLM-4.7 -r 5 --llama-bench /work/native/bin/llama-bench
    python benchmarks/real_shapes.py --shape small -r 2              # tiny widths: the same code paths in seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import CACHE, NotMerged, build_gguf, machine, size  # noqa: E402
from shapes import NEW, NEW_SMALL  # noqa: E402

log = logging.getLogger("real_shapes")
SIDES = ("ours", "llama-cpp-python", "llama-bench")


# ------------------------------------------------------------------------------------------------ workers
def worker(kind: str, path: Path, n_ctx: int, threads: int) -> int:
    """Serve timing requests on stdin (one JSON object a line), answer on stdout: {"test": "pp"|"tg", "tokens": [...]}
    -> {"seconds": s}; {"test": "rss"} -> {"hwm": bytes}."""
    from chatglm.runtime.bench import time_decode, time_prefill

    if kind == "ours":
        from chatglm.runtime.loader import open_engine

        engine = open_engine(path, n_ctx=n_ctx, n_threads=threads, kv_type="f16")
        run = {"pp": lambda t: time_prefill(engine, t), "tg": lambda t: time_decode(engine, [], t)}
    else:
        from python_overhead import BareLoop

        bare = BareLoop(path, n_ctx=n_ctx, n_batch=512, n_threads=threads)
        run = {"pp": bare.prefill, "tg": bare.decode}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request["test"] == "rss":
            reply = {"hwm": status_bytes("VmHWM")}
        else:
            reply = {"seconds": run[request["test"]](request["tokens"])}
        print(json.dumps(reply), flush=True)
    return 0


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class Worker:
    def __init__(self, kind: str, path: Path, args: argparse.Namespace):
        cmd = [sys.executable, __file__, "--worker", kind, str(path), "--ctx", str(args.ctx), "-t", str(args.threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.ask_raw()  # {"ready": true} once loaded

    def ask_raw(self, request: Optional[dict] = None) -> dict:
        if request is not None:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with code {self.proc.wait()}")
        return json.loads(line)

    def time(self, test: str, tokens: list[int]) -> float:
        return self.ask_raw({"test": test, "tokens": tokens})["seconds"]

    def close(self) -> int:
        hwm = self.ask_raw({"test": "rss"})["hwm"]
        self.proc.stdin.close()
        self.proc.wait()
        return hwm


# ------------------------------------------------------------------------------------------------ llama-bench
def llama_bench(tool: str, path: Path, test: str, args: argparse.Namespace) -> tuple[float, int]:
    """One repetition of ``test`` ("pp" or "tg") by the native tool (after its own warm-up): (seconds, its peak
    RSS)."""
    n_prompt, n_gen = (args.n_prompt, 0) if test == "pp" else (0, args.n_gen)
    cmd = [tool, "-m", str(path), "-p", str(n_prompt), "-n", str(n_gen), "-r", "1", "-t", str(args.threads),
           "-b", "512", "-ub", "512", "-o", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"llama-bench failed: {' '.join(cmd)}")
    (result,) = json.loads(out)
    return (n_prompt or n_gen) / result["avg_ts"], usage.ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------ one row
def measure(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Every side's pp/tg seconds per repetition and resident size, interleaved."""
    import numpy as np

    rng = np.random.default_rng(1234)
    prompt = [int(t) for t in rng.integers(16, 1000, args.n_prompt)]  # learned tokens of the tiny vocabulary
    gen = [int(t) for t in rng.integers(16, 1000, args.n_gen)]
    workers = {"ours": Worker("ours", path, args), "llama-cpp-python": Worker("bare", path, args)}
    samples: dict[str, dict[str, list[float]]] = {s: {"pp": [], "tg": []} for s in SIDES}
    rss: dict[str, int] = {}
    try:
        for w in workers.values():  # warm-up: every page touched, buffers allocated
            w.time("pp", prompt)
            w.time("tg", gen[:2])
        for rep in range(args.repetitions):
            order = SIDES[rep % 3:] + SIDES[:rep % 3]
            for test, tokens in (("pp", prompt), ("tg", gen)):  # each test alternates over the sides
                for side in order:
                    if side in workers:
                        samples[side][test].append(workers[side].time(test, tokens))
                    elif args.llama_bench:
                        seconds, peak = llama_bench(args.llama_bench, path, test, args)
                        samples[side][test].append(seconds)
                        rss[side] = max(rss.get(side, 0), peak)
            log.info("repetition %d/%d: %s", rep + 1, args.repetitions, ", ".join(
                f"{s} tg {args.n_gen / samples[s]['tg'][-1]:.2f} t/s" for s in SIDES if samples[s]["tg"]))
    finally:
        for side, w in workers.items():
            rss[side] = w.close()
    return {"samples": samples, "rss": rss, "size_bytes": path.stat().st_size}


def rows_of(name: str, cut: str, result: dict[str, Any], args: argparse.Namespace) -> list[list[str]]:
    samples, n = result["samples"], {"pp": args.n_prompt, "tg": args.n_gen}
    out = []
    for side in SIDES:
        s = samples[side]
        if not s["tg"]:
            out.append(["", side, "not available", "-", "-", "-", "-"])
            continue
        tps = {t: f"{statistics.median(n[t] / x for x in s[t]):.2f}" for t in ("pp", "tg")}
        out.append([f"{name} ({cut}; {size(result['size_bytes'])})" if side == "ours" else "", side, tps["pp"],
                    tps["tg"], ratio(s, samples["llama-cpp-python"]), ratio(s, samples["llama-bench"]),
                    size(result["rss"].get(side, 0))])
    return out


def ratio(side: dict[str, list[float]], base: dict[str, list[float]]) -> str:
    """pp / tg speed of ``side`` over ``base``: the median of per-repetition ratios (> 1: faster)."""
    if not side["tg"] or not base["tg"]:
        return "-"
    r = {t: statistics.median(b / x for x, b in zip(side[t], base[t], strict=True)) for t in ("pp", "tg")}
    return f"{r['pp']:.3f} / {r['tg']:.3f}"


def table(rows: list[list[str]], args: argparse.Namespace) -> str:
    head = ["model (cut; file)", "engine", f"pp{args.n_prompt} t/s", f"tg{args.n_gen} t/s",
            "pp / tg vs llama-cpp-python", "pp / tg vs llama-bench", "resident (peak)"]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in rows])


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("real", "small"), default="real")
    p.add_argument("--models", default=",".join(NEW), help="comma-separated: " + ", ".join(NEW))
    p.add_argument("--types", default="q4_k_m", help="comma-separated GGUF types")
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("-c", "--ctx", type=int, default=512)
    p.add_argument("--llama-bench", default=shutil.which("llama-bench"), help="the native tool (default: on PATH)")
    p.add_argument("--json", type=Path, help="also write the samples here")
    p.add_argument("--worker", nargs=2, metavar=("KIND", "GGUF"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker[0], Path(args.worker[1]), args.ctx, args.threads)
    shapes = NEW if args.shape == "real" else NEW_SMALL
    rows, results, failed = [], {}, False
    for name in args.models.split(","):
        shape = shapes[name]
        for qtype in args.types.split(","):
            try:
                path = build_gguf(shape, qtype, CACHE / args.shape)
            except NotMerged:
                rows.append([f"{name} {qtype}", "family not merged yet", "-", "-", "-", "-", "-"])
                continue
            except Exception as exc:  # one line per row that cannot be built
                log.exception("could not build %s %s", name, qtype)
                rows.append([f"{name} {qtype}", f"build failed: {exc}", "-", "-", "-", "-", "-"])
                failed = True
                continue
            results[f"{name} {qtype}"] = result = measure(path, args)
            rows += rows_of(f"{name} {qtype}", shape.cut_text(), result, args)
    print(f"{machine()}; threads {args.threads}; ctx {args.ctx}; f16 KV cache; {args.repetitions} interleaved "
          f"repetitions after a warm-up (t/s: median; ratios: median of per-repetition speed ratios, > 1: faster); load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(table(rows, args))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Side by side, same GGUF, same settings: `chatglm bench`, llama-cpp-python's own low-level loop, native llama-bench.

Three sides measure the same tests (llama-bench's pp / tg / pg phases) with the same threads, batch, micro-batch,
KV cache types and flash-attention setting, interleaved over R rounds (the order of the sides rotates every round,
so load drift on a shared machine hits all alike):

- **chatglm bench**: ``chatglm.runtime.bench.run_bench`` on the engine ``chatglm bench`` opens, in this process
  (one engine for all rounds, as one ``chatglm bench`` call uses one);
- **llama-cpp-python**: its bindings (``llama_cpp.llama_cpp``) driven as llama-bench drives llama.cpp, in this
  process: one context per test sized n_prompt + n_gen, ``llama_batch_get_one`` batches of -b tokens,
  ``llama_decode``, ``llama_synchronize``; no chatglm code inside the timed span;
- **llama-bench**: the native tool (``--llama-bench PATH`` or on PATH), one call per round with all tests, its
  ``-o json`` read back; "not found" rows otherwise (README, Performance: how to build it from the vendored source).

Each side runs llama-bench's warm-up and -r repetitions per round; a round's figure is their mean (llama-bench's
avg_ts). The table gives each run with the machine's load beside it: the 1-minute load average when it started and
the share of all CPUs' time that other processes were busy during it (/proc/stat busy time less this run's own CPU
time). The summary gives medians over rounds and the median of per-round ratios chatglm bench / side (> 1: ours
faster).

    python benchmarks/compare.py                                  # ~1.3B ChatGLM3 shape, q4_0 (built and cached)
    python benchmarks/compare.py --gguf model.gguf -p 512 -n 128 -pg 512,128 -R 5 -t 2
    python benchmarks/compare.py --shape small -R 3 --llama-bench ~/native/bin/llama-bench
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import CACHE, CHATGLM3_1B, SMALL, build_gguf, machine  # noqa: E402

from chatglm.cli.bench import parse_pg  # noqa: E402
from chatglm.runtime import llama_native as native  # noqa: E402
from chatglm.runtime.bench import BenchSettings, BenchSpec, BenchTest, open_for_bench, run_bench  # noqa: E402
from chatglm.runtime.kv_types import KV_TYPES  # noqa: E402

log = logging.getLogger("compare")
SIDES = ("chatglm bench", "llama-cpp-python", "llama-bench")
FA_TEXT = {None: "auto", True: "on", False: "off"}


# ------------------------------------------------------------------------------------------------ machine load
def _cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs so far, from /proc/stat's "cpu" line ((0, 0) where there is none)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            values = [int(v) for v in fh.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return 0, 0
    return sum(values) - values[3] - values[4], sum(values)


@dataclass
class Load:
    """The machine's load around one run."""

    load1: float  # 1-minute load average when the run started
    others: Optional[float]  # share of all CPUs' time other processes were busy during the run (None: unknown)

    def text(self) -> str:
        return f"{self.load1:.2f}, " + ("-" if self.others is None else f"{self.others:.0%}")


class LoadProbe:
    """Measures a run's Load: ``stop(own_cpu_seconds)`` after it, with the CPU time the run itself used."""

    def __init__(self) -> None:
        self.load1 = os.getloadavg()[0]
        self.busy, self.total = _cpu_jiffies()

    def stop(self, own_seconds: float) -> Load:
        busy, total = _cpu_jiffies()
        if total <= self.total:
            return Load(self.load1, None)
        hz = os.sysconf("SC_CLK_TCK")
        others = ((busy - self.busy) / hz - own_seconds) / ((total - self.total) / hz)
        return Load(self.load1, min(1.0, max(0.0, others)))


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------------------------------------ the sides
class Ours:
    """`chatglm bench`'s path: the engine it opens and ``run_bench``."""

    def __init__(self, path: Path, spec: BenchSpec, s: BenchSettings):
        self.spec = spec
        self.engine = open_for_bench(path, spec, s)

    def run(self) -> dict[str, float]:
        return {m.name: m.mean_tps for m in run_bench(self.engine, self.spec)}

    def close(self) -> None:
        self.engine.close()


class LowLevel:
    """llama-cpp-python's bindings, driven as llama-bench's test_prompt / test_gen drive llama.cpp."""

    def __init__(self, path: Path, spec: BenchSpec, s: BenchSettings):
        ll = self.ll = native.lib()  # the bindings module (llama.cpp's log routed to logging)
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = s.n_gpu_layers
        self.model = ll.llama_model_load_from_file(os.fsencode(path), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab, self.bos = ll.llama_vocab_n_tokens(vocab), ll.llama_vocab_bos(vocab)
        self.add_bos = bool(ll.llama_vocab_get_add_bos(vocab))
        self.spec, self.s = spec, s
        self.rng = np.random.default_rng(spec.seed)

    def _context(self, test: BenchTest):
        ll, s = self.ll, self.s
        cp = ll.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = test.n_tokens, s.n_batch, s.n_ubatch
        cp.type_k, cp.type_v = KV_TYPES[s.type_k].ggml_type, KV_TYPES[s.type_v].ggml_type
        cp.flash_attn_type = s.flash_attn_type
        cp.n_threads = cp.n_threads_batch = s.n_threads
        ctx = ll.llama_init_from_model(self.model, cp)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        return ctx

    def _tokens(self, n: int) -> Any:
        toks = self.rng.integers(0, self.n_vocab, n)
        if self.add_bos and n:
            toks[0] = self.bos
        return (self.ll.llama_token * max(n, 1))(*toks.tolist())

    def _timed(self, ctx, test: BenchTest) -> int:
        """Nanoseconds of one repetition: the prompt in batches of -b, then -n single-token steps."""
        ll, n_batch = self.ll, self.s.n_batch
        prompt, gen = self._tokens(test.n_prompt), self._tokens(test.n_gen)
        size = ctypes.sizeof(ll.llama_token)
        ptr = lambda arr, i: ctypes.cast(ctypes.addressof(arr) + i * size, ctypes.POINTER(ll.llama_token))  # noqa
        batches = [ll.llama_batch_get_one(ptr(prompt, i), min(n_batch, test.n_prompt - i))
                   for i in range(0, test.n_prompt, n_batch)]
        steps = [ll.llama_batch_get_one(ptr(gen, i), 1) for i in range(test.n_gen)]
        decode, sync = ll.llama_decode, ll.llama_synchronize
        start = time.perf_counter_ns()
        for b in batches:
            if decode(ctx, b):
                raise RuntimeError("llama_decode failed on a prompt batch")
        if batches:
            sync(ctx)
        for b in steps:
            if decode(ctx, b):
                raise RuntimeError("llama_decode failed on a generation step")
            sync(ctx)
        return time.perf_counter_ns() - start

    def run(self) -> dict[str, float]:
        out = {}
        for test in self.spec.tests():
            ctx = self._context(test)
            mem = self.ll.llama_get_memory(ctx)
            try:
                if self.spec.warmup:  # the whole prompt, then one token
                    self._timed(ctx, BenchTest(test.n_prompt, min(test.n_gen, 1)))
                tps = []
                for _ in range(self.spec.repetitions):
                    self.ll.llama_memory_clear(mem, False)
                    tps.append(1e9 * test.n_tokens / self._timed(ctx, test))
                out[test.name] = statistics.fmean(tps)
            finally:
                self.ll.llama_free(ctx)
        return out

    def close(self) -> None:
        self.ll.llama_model_free(self.model)


def llama_bench_cmd(tool: str, path: Path, spec: BenchSpec, s: BenchSettings) -> list[str]:
    """The llama-bench call measuring ``spec`` with settings ``s``."""
    tests = spec.tests()
    pp = [str(t.n_prompt) for t in tests if t.n_gen == 0]
    tg = [str(t.n_gen) for t in tests if t.n_prompt == 0]
    cmd = [tool, "-m", str(path), "-p", ",".join(pp) or "0", "-n", ",".join(tg) or "0",
           "-r", str(spec.repetitions), "-t", str(s.n_threads), "-b", str(s.n_batch), "-ub", str(s.n_ubatch),
           "-ctk", s.type_k, "-ctv", s.type_v, "-fa", FA_TEXT[s.flash_attn], "-ngl", str(s.n_gpu_layers),
           "-o", "json"]
    cmd += [x for t in tests if t.n_prompt and t.n_gen for x in ("-pg", f"{t.n_prompt},{t.n_gen}")]
    return cmd + ([] if spec.warmup else ["--no-warmup"])


def run_llama_bench(cmd: list[str]) -> tuple[dict[str, float], float]:
    """(test name -> avg_ts, the child's CPU seconds)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"llama-bench failed: {' '.join(cmd)}")
    return ({BenchTest(r["n_prompt"], r["n_gen"]).name: r["avg_ts"] for r in json.loads(out)},
            usage.ru_utime + usage.ru_stime)


# ------------------------------------------------------------------------------------------------ rounds
@dataclass
class Run:
    side: str
    round: int
    tps: dict[str, float] = field(default_factory=dict)
    load: Optional[Load] = None
    note: str = ""  # why the side did not run


def in_process(fn: Callable[[], dict[str, float]]) -> tuple[dict[str, float], float]:
    before = own_cpu_seconds()
    tps = fn()
    return tps, own_cpu_seconds() - before


def rounds(runners: dict[str, Callable[[], tuple[dict[str, float], float]]], notes: dict[str, str],
           n_rounds: int) -> list[Run]:
    runs = []
    for r in range(n_rounds):
        for side in SIDES[r % 3:] + SIDES[:r % 3]:
            if side not in runners:
                runs.append(Run(side, r + 1, note=notes[side]))
                continue
            probe = LoadProbe()
            tps, own = runners[side]()
            runs.append(Run(side, r + 1, tps, probe.stop(own)))
            log.info("round %d/%d, %s: %s t/s; load %s", r + 1, n_rounds, side,
                     ", ".join(f"{t} {v:.2f}" for t, v in tps.items()), runs[-1].load.text())
    return runs


def per_run_table(runs: list[Run], tests: list[str]) -> str:
    head = ["round", "side", *(f"{t} t/s" for t in tests), "load avg, others' CPU"]
    rows = []
    for x in runs:
        cells = [f"{x.tps[t]:.2f}" for t in tests] if x.tps else [x.note] + [""] * (len(tests) - 1)
        rows.append([str(x.round), x.side, *cells, x.load.text() if x.load else "-"])
    return _table(head, rows)


def summary_table(runs: list[Run], tests: list[str]) -> str:
    head = ["side", *(f"{t} t/s (median)" for t in tests), *(f"{t}: ours / side" for t in tests)]
    ours = {x.round: x.tps for x in runs if x.side == SIDES[0] and x.tps}
    rows = []
    for side in SIDES:
        mine = [x for x in runs if x.side == side and x.tps]
        if not mine:
            rows.append([side, next(x.note for x in runs if x.side == side)] + [""] * (2 * len(tests) - 1))
            continue
        medians = [f"{statistics.median(x.tps[t] for x in mine):.2f}" for t in tests]
        ratios = [f"{statistics.median(ours[x.round][t] / x.tps[t] for x in mine if x.round in ours):.3f}"
                  if ours else "-" for t in tests]
        rows.append([side, *medians, *ratios])
    return _table(head, rows)


def _table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in rows])


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="measure this GGUF instead of a synthetic one")
    p.add_argument("--shape", choices=("1.3b", "small"), default="1.3b")
    p.add_argument("--type", default="q4_0", help="type of the synthetic GGUF")
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-pg", type=parse_pg, action="append", default=[], metavar="PP,TG")
    p.add_argument("-R", "--rounds", type=int, default=5)
    p.add_argument("-r", "--repetitions", type=int, default=1, help="repetitions per side and round")
    p.add_argument("-t", "--threads", type=int, default=native.physical_cores())
    p.add_argument("-b", "--batch-size", type=int, default=2048)
    p.add_argument("-ub", "--ubatch-size", type=int, default=512)
    p.add_argument("-ctk", "--cache-type-k", default="f16", choices=list(KV_TYPES))
    p.add_argument("-fa", "--flash-attn", default="auto", choices=list(FA_TEXT.values()))
    p.add_argument("-ngl", "--n-gpu-layers", type=int, default=0)
    p.add_argument("--llama-bench", default=shutil.which("llama-bench"), help="the native tool (default: on PATH)")
    p.add_argument("--json", type=Path, help="also write every run here")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    logging.getLogger("chatglm.runtime.bench").setLevel(logging.WARNING)
    args = parse_args(argv)
    shape = CHATGLM3_1B if args.shape == "1.3b" else SMALL["chatglm3-6b"]
    path = args.gguf or build_gguf(shape, args.type, CACHE / ("overhead" if args.shape == "1.3b" else "small"))
    spec = BenchSpec(n_prompt=(args.n_prompt,), n_gen=(args.n_gen,), n_pg=tuple(args.pg),
                     repetitions=args.repetitions)
    fa = {v: k for k, v in FA_TEXT.items()}[args.flash_attn]
    s = BenchSettings(n_threads=args.threads, n_batch=args.batch_size, n_ubatch=args.ubatch_size,
                      type_k=args.cache_type_k, type_v=args.cache_type_k, n_gpu_layers=args.n_gpu_layers,
                      flash_attn=fa)
    ours = Ours(path, spec, s)
    runners = {SIDES[0]: lambda: in_process(ours.run)}
    notes = {SIDES[1]: "not available (not a llama.cpp architecture)", SIDES[2]: "not found"}
    low = None
    if getattr(ours.engine, "native_model", None) is not None:  # a llama.cpp architecture
        low = LowLevel(path, spec, s)
        runners[SIDES[1]] = lambda: in_process(low.run)
        if args.llama_bench:
            cmd = llama_bench_cmd(args.llama_bench, path, spec, s)
            runners[SIDES[2]] = lambda: run_llama_bench(cmd)
    else:
        notes[SIDES[2]] = notes[SIDES[1]]
    try:
        runs = rounds(runners, notes, args.rounds)
    finally:
        ours.close()
        if low is not None:
            low.close()
    tests = [t.name for t in spec.tests()]
    print(f"{path.name} ({ours.engine.info.description}); {machine()}; threads {s.n_threads}, -b {s.n_batch}, "
          f"-ub {s.n_ubatch}, KV {s.type_k}, fa {args.flash_attn}; {args.rounds} rounds x {args.repetitions} "
          "repetitions after a warm-up per side and round; load: 1-minute average at the start, other processes' "
          "share of all CPUs during the run\n")
    print(per_run_table(runs, tests) + "\n\n" + summary_table(runs, tests))
    if args.json:
        args.json.write_text(json.dumps([{"side": x.side, "round": x.round, "tps": x.tps, "note": x.note,
                                          "load": x.load and vars(x.load)} for x in runs], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

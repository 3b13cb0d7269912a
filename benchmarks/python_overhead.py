#!/usr/bin/env python
"""What the Python layer costs: our engine's pp/tg tokens/s against a bare llama-cpp-python decode loop.

Same GGUF, same threads, same context settings, one process. The bare loop is written here against the low-level
API only: a prepared ``llama_batch``, ``llama_decode`` and ``llama_synchronize`` (what llama-bench times), no Python
sampling, no checks. Our side is ``chatglm.runtime.bench`` on an Engine (prefill / step / logits read), and, for
decode, the user-facing ``Model.generate`` loop (sampling, stop checks, UTF-8 decoding) greedy and with the default
sampler. Runs are interleaved (A B B A ...) so load drift on a shared machine hits both sides alike; the ratio is the
median of per-repetition ratios. Target: engine/bare >= 0.97.

    python benchmarks/python_overhead.py                          # ~1.3B ChatGLM3 shape, q4_0 (built and cached)
    python benchmarks/python_overhead.py --gguf model.gguf -t 2 -p 512 -n 128 -r 5
    python benchmarks/python_overhead.py --shape small            # tiny model: the per-token cost in microseconds
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import CACHE, CHATGLM3_1B, SMALL, build_gguf, machine  # noqa: E402

from chatglm.runtime import llama_native as native  # noqa: E402
from chatglm.runtime.bench import BenchSpec, random_tokens, time_decode, time_prefill  # noqa: E402
from chatglm.runtime.model import Model  # noqa: E402


class BareLoop:
    """llama_model + llama_context + llama_batch, driven the way llama-bench drives them."""

    def __init__(self, path: Path, *, n_ctx: int, n_batch: int, n_threads: int, load_mode: int = 1):
        ll = self.ll = native.lib()
        params = ll.llama_model_default_params()
        params.n_gpu_layers = 0
        params.load_mode = load_mode  # mmap: llama-bench's default (--mmap 1) and the engine's (the default is auto)
        self.model = ll.llama_model_load_from_file(os.fsencode(path), params)
        cparams = ll.llama_context_default_params()
        cparams.n_ctx, cparams.n_batch, cparams.n_ubatch, cparams.n_seq_max = n_ctx, n_batch, n_batch, 1
        cparams.n_threads = cparams.n_threads_batch = n_threads
        cparams.flash_attn_type = -1  # auto, as the engine's default
        cparams.type_k = cparams.type_v = 1  # f16, as the engine's default
        cparams.no_perf = True
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.model or not self.ctx:
            raise RuntimeError("llama.cpp could not load the model")
        self.mem = ll.llama_get_memory(self.ctx)
        self.batch = ll.llama_batch_init(n_batch, 0, 1)
        self.n_batch = n_batch
        self._noop_abort = native.ABORT_CALLBACK(lambda _data: False)
        self._no_abort = ctypes.cast(None, native.ABORT_CALLBACK)

    def _fill(self, tokens: list[int], pos0: int) -> None:
        b = self.batch
        b.n_tokens = len(tokens)
        for i, tok in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos0 + i, 1, False
            b.seq_id[i][0] = 0
        b.logits[len(tokens) - 1] = True

    def prefill(self, tokens: list[int]) -> float:
        ll = self.ll
        ll.llama_memory_clear(self.mem, True)
        chunks = [tokens[i:i + self.n_batch] for i in range(0, len(tokens), self.n_batch)]
        self._fill(chunks[0], 0)
        start = time.perf_counter()
        for k, chunk in enumerate(chunks):
            if k:
                self._fill(chunk, k * self.n_batch)
            if ll.llama_decode(self.ctx, self.batch) != 0:
                raise RuntimeError("llama_decode failed")
        ll.llama_synchronize(self.ctx)
        return time.perf_counter() - start

    def decode(self, tokens: list[int], abort_callback: bool = False) -> float:
        """Seconds for one decode per token; ``abort_callback``: with a no-op Python abort callback installed (ggml
        calls it after every graph node), as the engine installs one to make prefill cancellable."""
        ll, b, ctx = self.ll, self.batch, self.ctx
        ll.llama_set_abort_callback(ctx, self._noop_abort if abort_callback else self._no_abort, None)
        ll.llama_memory_clear(self.mem, True)
        self._fill(tokens[:1], 0)
        decode, sync = ll.llama_decode, ll.llama_synchronize
        start = time.perf_counter()
        for pos, tok in enumerate(tokens):
            b.token[0], b.pos[0] = tok, pos
            decode(ctx, b)
            sync(ctx)
        return time.perf_counter() - start

    def close(self) -> None:
        self.ll.llama_batch_free(self.batch)
        self.ll.llama_free(self.ctx)
        self.ll.llama_model_free(self.model)


def generate_seconds(model: Model, n_gen: int, temperature: float) -> float:
    """Seconds of Model.generate's decode loop for ``n_gen`` steps (n_gen + 1 tokens sampled: the last sampled
    token is never evaluated), after a short prompt."""
    model.stop_ids = set()  # random weights: never stop early
    model.engine.reset()
    model.generate("Hello, 你好", temperature=temperature, max_tokens=n_gen + 1, seed=0)
    if model.last_stats.generated_tokens != n_gen + 1:
        raise RuntimeError(f"generated {model.last_stats.generated_tokens} tokens, expected {n_gen + 1}")
    return model.last_stats.decode_seconds


def python_cost_us(fn: Callable[[], float], n: int) -> float:
    """Microseconds per token of ``fn`` with ``llama_decode`` replaced by a no-op: what the Python layer itself
    costs per token (the logits read then returns the last real step's logits)."""
    ll = native.lib()
    real = ll.llama_decode
    ll.llama_decode = lambda _ctx, _batch: 0
    try:
        fn()
        return statistics.median(fn() for _ in range(5)) / n * 1e6
    finally:
        ll.llama_decode = real


def callback_nodes(bare: "BareLoop") -> int:
    """How often ggml calls an abort callback during one single-token decode (once per graph node)."""
    calls = [0]

    def count(_data) -> bool:
        calls[0] += 1
        return False

    counter = native.ABORT_CALLBACK(count)
    bare.ll.llama_set_abort_callback(bare.ctx, counter, None)
    bare.ll.llama_memory_clear(bare.mem, True)
    bare._fill([1], 0)
    bare.ll.llama_decode(bare.ctx, bare.batch)
    bare.ll.llama_set_abort_callback(bare.ctx, bare._no_abort, None)
    return calls[0]


def callback_call_us(n: int = 200_000) -> float:
    """Microseconds per call of a no-op Python callback called from C (libc qsort's comparator, all elements equal
    so every call returns at once): the price of one abort-callback check."""
    libc = ctypes.CDLL(None)
    cmp_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)
    calls = [0]

    def counting(_a, _b) -> int:
        calls[0] += 1
        return 0

    libc.qsort.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, cmp_type]
    libc.qsort.restype = None
    data = (ctypes.c_int * n)()
    libc.qsort(data, n, ctypes.sizeof(ctypes.c_int), cmp_type(counting))  # count the comparisons once
    noop = cmp_type(lambda _a, _b: 0)
    start = time.perf_counter()
    libc.qsort(data, n, ctypes.sizeof(ctypes.c_int), noop)
    return (time.perf_counter() - start) / calls[0] * 1e6


def cost_report(engine, model: Model, bare: "BareLoop", gen: list[int], bare_tpt_us: float) -> str:
    """The Python layer's cost per token measured without the noise of the decode itself."""
    n = len(gen)
    rows = [("bare loop (batch slot + llama_decode + sync calls)", python_cost_us(lambda: bare.decode(gen), n)),
            ("engine step + logits read", python_cost_us(lambda: time_decode(engine, [], gen), n)),
            ("Model.generate greedy (whole loop)", python_cost_us(lambda: generate_seconds(model, n, 0.0), n)),
            ("Model.generate sampled t=0.8", python_cost_us(lambda: generate_seconds(model, n, 0.8), n))]
    nodes, per_call = callback_nodes(bare), callback_call_us()
    armed = getattr(engine, "_abort_armed", True)  # the engine installs it only while a prompt can be cancelled
    rows.append((f"abort callback: {nodes} nodes x {per_call:.2f} us{'' if armed else ', not installed for steps'}",
                 nodes * per_call if armed else 0.0))
    engine_total = rows[1][1] - rows[0][1] + rows[-1][1]
    lines = [f"Python cost per token, llama_decode stubbed out (bare decode: {bare_tpt_us:.0f} us/token):", ""]
    lines += [f"  {label:<52} {us:9.1f} us" for label, us in rows]
    lines += ["", f"  engine tg vs bare, expected from these costs: {bare_tpt_us / (bare_tpt_us + engine_total):.4f}"]
    return "\n".join(lines)


def interleaved(pairs: dict[str, tuple[Callable[[], float], Callable[[], float]]], reps: int) -> dict:
    """Per test: seconds of ours and bare per repetition, alternating which side runs first."""
    out = {name: ([], []) for name in pairs}
    for rep in range(reps + 1):  # repetition 0 is the warm-up
        for name, (ours, bare) in pairs.items():
            order = [(0, ours), (1, bare)] if rep % 2 else [(1, bare), (0, ours)]
            for side, fn in order:
                seconds = fn()
                if rep:
                    out[name][side].append(seconds)
        logging.info("repetition %d/%d done", rep, reps)
    return out


def report(results: dict, n_tokens: dict[str, int]) -> str:
    head = f"| {'test':<28} | {'ours t/s':>10} | {'bare t/s':>10} | {'ours/bare':>9} | {'Δ µs/token':>10} |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for name, (ours, bare) in results.items():
        n = n_tokens[name]
        ratio = statistics.median(b / o for o, b in zip(ours, bare, strict=True))  # tokens/s ratio = inverse time ratio
        delta_us = (statistics.median(ours) - statistics.median(bare)) / n * 1e6
        lines.append(f"| {name:<28} | {n / statistics.median(ours):>10.2f} | {n / statistics.median(bare):>10.2f} | "
                     f"{ratio:>9.4f} | {delta_us:>10.1f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="measure this GGUF instead of a synthetic one")
    p.add_argument("--shape", choices=("1.3b", "small"), default="1.3b")
    p.add_argument("--type", default="q4_0")
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("-t", "--threads", type=int, default=native.physical_cores())
    p.add_argument("--no-generate", action="store_true", help="skip the Model.generate rows")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    args = parse_args(argv)
    shape = CHATGLM3_1B if args.shape == "1.3b" else SMALL["chatglm3-6b"]
    path = args.gguf or build_gguf(shape, args.type, CACHE / ("overhead" if args.shape == "1.3b" else "small"))
    n_ctx = args.n_prompt + args.n_gen + 8
    from chatglm.runtime.loader import open_engine

    engine = open_engine(path, n_ctx=n_ctx, n_threads=args.threads)
    model = Model(engine)
    bare = BareLoop(path, n_ctx=n_ctx, n_batch=engine.n_batch, n_threads=args.threads)
    rng = np.random.default_rng(BenchSpec().seed)
    prompt = random_tokens(engine.info, args.n_prompt, rng)
    gen = random_tokens(engine.info, args.n_gen, rng)
    pp, tg = f"pp{args.n_prompt}", f"tg{args.n_gen}"
    pairs = {pp: (lambda: time_prefill(engine, prompt), lambda: bare.prefill(prompt)),
             tg: (lambda: time_decode(engine, [], gen), lambda: bare.decode(gen))}
    n_tokens = {pp: args.n_prompt, tg: args.n_gen}
    aa = f"{tg} bare vs bare (noise)"
    pairs[aa] = (lambda: bare.decode(gen), lambda: bare.decode(gen))
    n_tokens[aa] = args.n_gen
    cb = f"{tg} bare+abort callback"
    pairs[cb] = (lambda: bare.decode(gen, abort_callback=True), lambda: bare.decode(gen))
    n_tokens[cb] = args.n_gen
    if not args.no_generate:
        for label, temp in (("greedy", 0.0), ("sampled", 0.8)):
            name = f"{tg} Model.generate {label}"
            pairs[name] = (lambda t=temp: generate_seconds(model, args.n_gen, t),
                           lambda: bare.decode(gen))
            n_tokens[name] = args.n_gen
    results = interleaved(pairs, args.repetitions)
    print(f"{path.name} ({engine.info.description}); {machine()}; threads {args.threads}; "
          f"{args.repetitions} interleaved repetitions after one warm-up; load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(report(results, n_tokens))
    print()
    print(cost_report(engine, model, bare, gen, statistics.median(results[tg][1]) / args.n_gen * 1e6))
    bare.close()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

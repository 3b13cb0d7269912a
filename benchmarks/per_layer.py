#!/usr/bin/env python
"""Decode tokens/s of the three user-facing paths against a bare llama-cpp-python decode loop, and what each Python
layer between two tokens costs (issue #21).

The paths: (1) ``chatglm run -p`` printing the streamed answer to a pipe (a child process; this one reads the pipe),
(2) the Python API (``chatglm.load()``, ``session.send(..., stream=True)``, in this process), (3) ``chatglm serve``
(a child process) answering a streamed OpenAI chat completion read here over HTTP. Each is run greedy and with the
default sampler (seeded), interleaved with the bare loop (``llama_batch`` + ``llama_decode`` + ``llama_synchronize``
on its own context of the same GGUF and threads: what llama-bench times) as A B B A ...; the ratio is the median of
per-round ratios of tokens/s. Random weights never stop by themselves: the children run with the end-of-generation
ids cleared (``--child``), so every reply has exactly the tokens asked for.

Per path, the seconds per decode token are: (1) the child's ``last_stats.decode_seconds`` (the generator's loop,
the consumer's writes to the pipe included) over the steps; (2) the same in process; (3) measured by the client:
(time of a reply of n+1 tokens - time of a reply of 1 token) / n, so the prompt and the request cost cancel.

The per-layer table runs on the tiny model with ``llama_decode`` replaced by a no-op (in the children too): what is
left is the Python (and C sampler) work per token, layer by layer, cumulative.

    python benchmarks/per_layer.py                      # ~1.3B ChatGLM3 shape, q4_0 (built and cached), ~4 min
    python benchmarks/per_layer.py --gguf model.gguf -t 2 -n 128 -r 5
    python benchmarks/per_layer.py --layers-only        # the per-layer table only (tiny model, ~40 s)
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_models import CACHE, CHATGLM3_1B, SMALL, build_gguf, machine  # noqa: E402
from python_overhead import BareLoop, callback_call_us, callback_nodes  # noqa: E402

from chatglm.runtime import llama_native as native  # noqa: E402
from chatglm.runtime.bench import random_tokens  # noqa: E402

log = logging.getLogger("per_layer")
PROMPT = "Hello, 你好"
GREEDY = {"temperature": 0.0}
DEFAULT = {"seed": 0}  # the default sampler (temperature 0.8, top-p 0.8), seeded
SAMPLERS = {"greedy": GREEDY, "default": DEFAULT}


# ---------------------------------------------------------------------------------------------------- children
def child_main(argv: list[str]) -> int:
    """``--child [--stub] [--stats FILE] -- CLI ARGS``: run the CLI with stop ids cleared (and llama_decode a no-op
    with --stub), writing the last generation's stats to FILE at exit."""
    p = argparse.ArgumentParser()
    p.add_argument("--stub", action="store_true")
    p.add_argument("--stats", type=Path)
    args, rest = p.parse_known_args(argv)
    from chatglm.runtime import model as model_mod

    made = []
    original = model_mod.Model.__init__

    def init(self, *a, **k):
        original(self, *a, **k)
        self.stop_ids = frozenset()
        made.append(self)

    model_mod.Model.__init__ = init
    if args.stub:
        native.lib().llama_decode = stub_of(native.lib().llama_decode)
    if args.stats is not None:
        def write_stats() -> None:
            s = made[-1].last_stats
            args.stats.write_text(json.dumps({"decode_seconds": s.decode_seconds, "tokens": s.generated_tokens}))

        atexit.register(write_stats)
    from chatglm.cli.app import app

    sys.argv = ["chatglm", *[a for a in rest if a != "--"]]
    app()
    return 0


def stub_of(real: Callable) -> Callable:
    """llama_decode for single-token batches a no-op (the logits read then gives the last real ones); prompts (more
    than one token) still evaluated, so that there are logits to read."""
    return lambda ctx, batch: real(ctx, batch) if batch.n_tokens > 1 else 0


def child_cmd(*cli: str, stub: bool = False, stats: Optional[Path] = None) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--child", *(["--stub"] if stub else []),
            *(["--stats", str(stats)] if stats else []), "--", *cli]


def sampler_flags(sampling: dict) -> list[str]:
    return [*(["--temp", str(sampling["temperature"])] if "temperature" in sampling else []),
            *(["--seed", str(sampling["seed"])] if "seed" in sampling else [])]


class RunPath:
    """``chatglm run PATH -p PROMPT`` in a child process, its stdout a pipe read here."""

    def __init__(self, path: Path, n_ctx: int, threads: int, stub: bool = False):
        self.path, self.n_ctx, self.threads, self.stub = path, n_ctx, threads, stub
        self.stats = Path(f"/tmp/per_layer_{os.getpid()}.json")

    def seconds(self, n_gen: int, sampling: dict) -> float:
        cmd = child_cmd("run", str(self.path), "-p", PROMPT, "-n", str(n_gen + 1), "-c", str(self.n_ctx),
                        "-t", str(self.threads), *sampler_flags(sampling), stub=self.stub, stats=self.stats)
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
        if proc.returncode != 0:
            raise RuntimeError(f"chatglm run failed: {proc.stderr.decode(errors='replace')[-400:]}")
        stats = json.loads(self.stats.read_text())
        if stats["tokens"] != n_gen + 1:
            raise RuntimeError(f"chatglm run generated {stats['tokens']} tokens, expected {n_gen + 1}")
        return stats["decode_seconds"]

    def close(self) -> None:
        self.stats.unlink(missing_ok=True)


def child_env() -> dict:
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServePath:
    """``chatglm serve PATH`` in a child process; streamed chat completions read here."""

    def __init__(self, path: Path, n_ctx: int, threads: int, stub: bool = False):
        self.port = free_port()
        cmd = child_cmd("serve", str(path), "--port", str(self.port), "-c", str(n_ctx), "-t", str(threads),
                        stub=stub)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=child_env())
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chatglm serve did not start: {self.proc.stderr.read().decode()[-400:]}")
            time.sleep(0.2)
        self.request_seconds(2, GREEDY)  # the first request pays for imports and the prompt

    def _healthy(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/health")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def request_seconds(self, n_tokens: int, sampling: dict) -> float:
        """Seconds from sending a streamed chat request to reading its end; checks it had ``n_tokens`` tokens."""
        body = json.dumps({"model": "m", "stream": True, "max_tokens": n_tokens, "stream_options":
                           {"include_usage": True}, "messages": [{"role": "user", "content": PROMPT}], **sampling})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        start = time.perf_counter()
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        usage = None
        for line in resp:
            if line.startswith(b"data: {") and b'"usage"' in line:
                usage = json.loads(line[6:]).get("usage") or usage
        elapsed = time.perf_counter() - start
        conn.close()
        if resp.status != 200 or not usage or usage["completion_tokens"] != n_tokens:
            raise RuntimeError(f"serve answered {resp.status} with usage {usage}, expected {n_tokens} tokens")
        return elapsed

    def seconds(self, n_gen: int, sampling: dict) -> float:
        one = statistics.median(self.request_seconds(1, sampling) for _ in range(3))
        return self.request_seconds(n_gen + 1, sampling) - one

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class ApiPath:
    """``chatglm.load()`` in this process; a new session per reply, streamed with ``send``."""

    def __init__(self, path: Path, n_ctx: int, threads: int):
        import chatglm

        self.model = chatglm.load(path, n_ctx=n_ctx, n_threads=threads)
        self.model.stop_ids = frozenset()

    def seconds(self, n_gen: int, sampling: dict) -> float:
        for _ in self.model.session().send(PROMPT, stream=True, max_tokens=n_gen + 1, **sampling):
            pass
        s = self.model.last_stats
        if s.generated_tokens != n_gen + 1:
            raise RuntimeError(f"generated {s.generated_tokens} tokens, expected {n_gen + 1}")
        return s.decode_seconds

    def close(self) -> None:
        self.model.close()


# ------------------------------------------------------------------------------------------------- interleaving
def interleaved(tests: dict[str, Callable[[], float]], bare: Callable[[], float], rounds: int) -> dict:
    """Per test: (ours, bare) seconds per round. A round runs the bare loop, every test, the bare loop again (the
    tests in reverse order every other round); a test's bare time is the mean of its round's two. Round 0 warms up."""
    out = {name: ([], []) for name in tests}
    for r in range(rounds + 1):
        first = bare()
        names = list(tests) if r % 2 else list(tests)[::-1]
        times = {name: tests[name]() for name in names}
        base = (first + bare()) / 2
        if r:
            for name, seconds in times.items():
                out[name][0].append(seconds)
                out[name][1].append(base)
        log.info("round %d/%d done; load %s", r, rounds, load_text())
    return out


def load_text() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def ratio_table(results: dict, n_gen: int, chain_name: str) -> str:
    """ours/bare per test (median of per-round ratios), and for the default sampler's rows ours/(bare + llama.cpp's
    chain): the sampler is llama.cpp's own in both, so that ratio is what the Python layer adds."""
    chain = results[chain_name][0]
    head = (f"| {'path':<24} | {'ours t/s':>9} | {'bare t/s':>9} | {'ratio':>6} | {'per round':<34} | "
            f"{'Δ µs/tok':>8} | {'vs bare+chain':>13} |")
    lines = [head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    for name, (ours, bare) in results.items():
        ratios = [b / o for o, b in zip(ours, bare, strict=True)]
        delta = (statistics.median(ours) - statistics.median(bare)) / n_gen * 1e6
        vs_chain = f"{statistics.median(c / o for o, c in zip(ours, chain, strict=True)):.4f}" \
            if "default" in name else ""
        lines.append(f"| {name:<24} | {n_gen / statistics.median(ours):>9.2f} | {n_gen / statistics.median(bare):>9.2f}"
                     f" | {statistics.median(ratios):>6.4f} | {' '.join(f'{x:.3f}' for x in ratios):<34} |"
                     f" {delta:>8.1f} | {vs_chain:>13} |")
    return "\n".join(lines)


def bare_loop(bare: BareLoop, prefix: list[int], gen: list[int], sampled: bool = False) -> float:
    """Seconds of the bare loop over ``gen`` after ``prefix`` (untimed: the paths' prompt, so that both sides decode
    at the same positions); ``sampled``: llama.cpp's default sampler chain (seeded) draws after every decode, as
    llama-cli does."""
    from chatglm.runtime.sampling import SamplingParams

    ll = bare.ll
    vocab = ll.llama_model_get_vocab(bare.model)
    chain = native.NativeSampler(bare.ctx, vocab, ll.llama_vocab_n_tokens(vocab), SamplingParams(seed=0), []) \
        if sampled else None
    bare.prefill(prefix)
    bare._fill(gen[:1], len(prefix))
    b, ctx, decode, sync = bare.batch, bare.ctx, ll.llama_decode, ll.llama_synchronize
    start = time.perf_counter()
    for pos, tok in enumerate(gen, len(prefix)):
        b.token[0], b.pos[0] = tok, pos
        decode(ctx, b)
        sync(ctx)
        if chain is not None:
            chain()
    elapsed = time.perf_counter() - start
    if chain is not None:
        chain.close()
    return elapsed


def sampler_rows(model, n: int) -> str:
    """What one sampler call costs at this model's vocabulary (llama_decode stubbed out)."""
    from chatglm.runtime.sampling import SamplingParams

    gen = random_tokens(model.info, n + 2, np.random.default_rng(1))
    step = stubbed(lambda: engine_loop(model.engine, gen, None), 3)
    lines = [f"Sampler per token at this model's vocabulary ({model.info.n_vocab}), llama_decode stubbed out:"]
    for kind, s in SAMPLERS.items():
        with_sampler = stubbed(lambda p=SamplingParams().updated(**s): engine_loop(model.engine, gen, p), 3)
        lines.append(f"  {kind:<8} {(with_sampler - step) / n * 1e6:9.1f} µs")
    return "\n".join(lines)


def paths_report(path: Path, args: argparse.Namespace) -> str:
    n_ctx = 2 * (args.n_gen + 64)
    bare = BareLoop(path, n_ctx=n_ctx, n_batch=512, n_threads=args.threads)
    api = ApiPath(path, n_ctx, args.threads)
    gen = random_tokens(api.model.info, args.n_gen, np.random.default_rng(0))
    run = RunPath(path, n_ctx, args.threads)
    serve = ServePath(path, n_ctx, args.threads)
    try:
        tests = {f"{label} {kind}": (lambda p=p, s=s: p.seconds(args.n_gen, s))
                 for label, p in (("run -p (pipe)", run), ("API send(stream)", api), ("serve SSE", serve))
                 for kind, s in SAMPLERS.items()}
        prefix = api.model.prompt_ids(PROMPT)
        chain_name = "bare + llama.cpp chain"
        tests[chain_name] = lambda: bare_loop(bare, prefix, gen, sampled=True)
        before = load_text()
        results = interleaved(tests, lambda: bare_loop(bare, prefix, gen), args.rounds)
        head = (f"{path.name}; {machine()}; threads {args.threads}; tg{args.n_gen}; {args.rounds} interleaved rounds "
                f"after a warm-up (the bare loop decodes at the paths' positions, after their {len(prefix)}-token "
                f"prompt); load average before {before}, after {load_text()}")
        return "\n\n".join([head, ratio_table(results, args.n_gen, chain_name), sampler_rows(api.model, 32)])
    finally:
        serve.close()
        run.close()
        api.close()
        bare.close()


# ------------------------------------------------------------------------------------------------- per layer
def stubbed(fn: Callable[[], float], repeats: int = 5) -> float:
    """Median seconds of ``fn`` with llama_decode a no-op in this process."""
    ll = native.lib()
    real = ll.llama_decode
    ll.llama_decode = stub_of(real)
    try:
        fn()
        return statistics.median(fn() for _ in range(repeats))
    finally:
        ll.llama_decode = real


def engine_loop(engine, gen: list[int], params) -> float:
    """engine.step per token, sampling each (``params``) or not (None)."""
    engine.reset()
    engine.prefill(gen[:2])
    sample = engine.sampler(params) if params is not None else None
    start = time.perf_counter()
    for tok in gen[2:]:
        if sample is not None:
            sample()
        engine.step(tok)
    elapsed = time.perf_counter() - start
    if sample is not None:
        sample.close()
    return elapsed


def layer_rows(path: Path, n: int, threads: int) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """Cumulative µs per token per layer, greedy, llama_decode stubbed out; and the default sampler chain's cost."""
    from chatglm.runtime.sampling import SamplingParams

    n_ctx = 2 * (n + 64)
    bare = BareLoop(path, n_ctx=n_ctx, n_batch=512, n_threads=threads)
    api = ApiPath(path, n_ctx, threads)
    m = api.model
    gen = random_tokens(m.info, n + 2, np.random.default_rng(0))
    us = 1e6 / n
    rows: list[tuple[str, float]] = []
    greedy = SamplingParams().updated(**GREEDY)
    try:
        rows.append(("bare loop (batch slot, decode, sync)", stubbed(lambda: bare.decode(gen[2:])) * us))
        step = stubbed(lambda: engine_loop(m.engine, gen, None)) * us
        rows.append(("engine.step", step))
        rows.append(("+ sampler", stubbed(lambda: engine_loop(m.engine, gen, greedy)) * us))
        rows.append(("+ Model.generate (stop ids, UTF-8)", stubbed(
            lambda: (m.engine.reset(), m.generate(PROMPT, max_tokens=n + 1, **GREEDY),
                     m.last_stats.decode_seconds)[-1]) * us))
        rows.append(("+ session stream (chat format)", stubbed(lambda: api.seconds(n, GREEDY), 9) * us))
        chain = {k: stubbed(lambda s=s: engine_loop(m.engine, gen, SamplingParams().updated(**s))) * us - step
                 for k, s in SAMPLERS.items()}
        armed = getattr(m.engine, "_abort_armed", True)  # before the fix the callback was always installed
    finally:
        api.close()
        nodes, per_call = callback_nodes(bare), callback_call_us()
        bare.close()
    run = RunPath(path, n_ctx, threads, stub=True)
    rows.append(("chatglm run -p to a pipe (child)", statistics.median(run.seconds(n, GREEDY) for _ in range(5)) * us))
    run.close()
    serve = ServePath(path, 16 * n + 128, threads, stub=True)
    try:
        rows.append(("chatglm serve, SSE read here", statistics.median(
            serve.seconds(16 * n, GREEDY) for _ in range(7)) * 1e6 / (16 * n)))
    finally:
        serve.close()
    chain["abort"] = nodes * per_call if armed else 0.0
    chain["abort_text"] = f"{nodes} nodes x {per_call:.2f} µs, {'installed' if armed else 'not installed'} for steps"
    return rows, chain


def layer_table(rows: list[tuple[str, float]], extra: dict, title: str) -> str:
    head = f"| {'layer (cumulative, greedy)':<40} | {'µs/token':>8} | {'+Δ µs':>7} |"
    lines = [title, "", head, "|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|"]
    prev = None
    for label, v in rows:
        lines.append(f"| {label:<40} | {v:>8.1f} | {'' if prev is None else f'{v - prev:+.1f}':>7} |")
        if not label.startswith("chatglm"):
            prev = v
    lines += ["", "(+Δ of the run and serve rows: over the session stream row; serve is measured by the client, the "
              "request cost cancelled by a 1-token request)",
              f"sampler call alone: greedy {extra['greedy']:.1f} µs, default chain {extra['default']:.1f} µs (the "
              "chain's top-p sorts the whole nucleus: the whole vocabulary on random weights' flat logits)",
              f"abort callback per decode step: {extra['abort']:.1f} µs ({extra['abort_text']}; not seen with "
              "llama_decode stubbed)"]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, help="measure the paths on this GGUF instead of the synthetic ~1.3B")
    p.add_argument("-n", "--n-gen", type=int, default=64)
    p.add_argument("-r", "--rounds", type=int, default=5)
    p.add_argument("-t", "--threads", type=int, default=native.physical_cores())
    p.add_argument("--layer-tokens", type=int, default=128, help="tokens per loop in the per-layer table")
    p.add_argument("--layers-only", action="store_true", help="only the per-layer table (tiny model)")
    p.add_argument("--paths-only", action="store_true", help="only the ratios table")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    args = parse_args(argv)
    if not args.layers_only:
        path = args.gguf or build_gguf(CHATGLM3_1B, "q4_0", CACHE / "overhead")
        print(paths_report(path, args), flush=True)
        print()
    if not args.paths_only:
        tiny = build_gguf(SMALL["chatglm3-6b"], "q4_0", CACHE / "small")
        rows, extra = layer_rows(tiny, args.layer_tokens, args.threads)
        print(layer_table(rows, extra, f"Per-token cost per layer, {tiny.name} (tiny), llama_decode stubbed out, "
                                f"n={args.layer_tokens}; load average {load_text()}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

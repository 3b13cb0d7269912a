"""Prefill (pp) and decode (tg) throughput of an :class:`~chatglm.runtime.engine.Engine`, measured as llama-bench does.

``ppN``: N random tokens prefilled into an empty cache (the engine batches them as it would a prompt).
``tgM``: M single-token steps from an empty cache, each followed by a logits read (that read is what makes a GPU
backend finish the step, as ``llama_synchronize`` does in llama-bench).
Every repetition starts from a cleared cache; cache clearing and token drawing stay outside the timed span. One warm-up
run of each test (the full prompt; one generated token) comes first unless disabled. Results give every sample, the
median and the spread (sample standard deviation, min and max) in tokens per second.

Only the public Engine API is used, so every engine (llama.cpp's and the GLM-1 graph) is measured the same way.
"""

from __future__ import annotations

import logging
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from chatglm.errors import InputError
from chatglm.runtime.engine import Engine, ModelInfo
from chatglm.runtime.perplexity import causal_prefix

log = logging.getLogger(__name__)

BenchProgress = Callable[[str, int, int], None]  # (test name, repetition done, repetitions)


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: each prompt length is one pp test, each generation length one tg test (0 skips)."""

    n_prompt: Sequence[int] = (512,)
    n_gen: Sequence[int] = (128,)
    repetitions: int = 5
    warmup: bool = True
    seed: int = 1234


@dataclass
class Measurement:
    """One test's samples: wall seconds per repetition for ``n_tokens`` tokens."""

    test: str  # "pp512", "tg128"
    n_tokens: int
    seconds: list[float] = field(default_factory=list)

    @property
    def tps(self) -> list[float]:
        return [self.n_tokens / s for s in self.seconds]

    @property
    def median_tps(self) -> float:
        return statistics.median(self.tps)

    @property
    def mean_tps(self) -> float:
        return statistics.fmean(self.tps)

    @property
    def stdev_tps(self) -> float:
        return statistics.stdev(self.tps) if len(self.seconds) > 1 else 0.0

    def to_dict(self) -> dict:
        tps = self.tps
        return {"test": self.test, "n_tokens": self.n_tokens, "repetitions": len(self.seconds),
                "median_tps": self.median_tps, "mean_tps": self.mean_tps, "stdev_tps": self.stdev_tps,
                "min_tps": min(tps), "max_tps": max(tps), "samples_tps": tps, "samples_s": list(self.seconds)}


def check_spec(spec: BenchSpec, n_ctx: Optional[int] = None, n_prefix: int = 0) -> None:
    """Raise InputError for a spec that cannot run (in a context of ``n_ctx`` tokens, when given)."""
    if spec.repetitions < 1:
        raise InputError(f"repetitions must be at least 1, got {spec.repetitions}")
    lengths = list(spec.n_prompt) + list(spec.n_gen)
    if any(n < 0 for n in lengths):
        raise InputError(f"prompt and generation lengths must not be negative, got {lengths}")
    if not any(n > 0 for n in lengths):
        raise InputError("nothing to measure: every prompt and generation length is 0")
    if n_ctx is None:
        return
    for n in spec.n_prompt:
        if 0 < n < n_prefix:
            raise InputError(f"a prompt must be at least {n_prefix} tokens for this model (its generation prefix)")
        if n > n_ctx:
            raise InputError(f"a prompt of {n} tokens is longer than the context of {n_ctx} tokens "
                             "(raise --ctx or lower --n-prompt)")
    for n in spec.n_gen:
        if n + n_prefix > n_ctx:
            raise InputError(f"generating {n} tokens (after {n_prefix} prefix tokens) overflows the context of "
                             f"{n_ctx} tokens (raise --ctx or lower --n-gen)")


def tests_of(spec: BenchSpec) -> list[str]:
    return [f"pp{n}" for n in spec.n_prompt if n > 0] + [f"tg{n}" for n in spec.n_gen if n > 0]


def random_tokens(info: ModelInfo, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` ids drawn uniformly from the vocabulary, the family's special tokens left out."""
    special = np.array(sorted(set(info.special.values())), dtype=np.int64)
    allowed = np.setdiff1d(np.arange(info.n_vocab, dtype=np.int64), special)
    return [int(t) for t in rng.choice(allowed, size=n)]


def time_prefill(engine: Engine, tokens: Sequence[int]) -> float:
    """Seconds to prefill ``tokens`` into a cleared cache (logits of the last one read)."""
    engine.reset()
    start = time.perf_counter()
    engine.prefill(tokens)
    engine.logits()
    return time.perf_counter() - start


def time_decode(engine: Engine, prefix: Sequence[int], tokens: Sequence[int]) -> float:
    """Seconds for one step per token of ``tokens`` after a cleared cache holding only ``prefix`` (untimed)."""
    engine.reset()
    if prefix:
        engine.prefill(prefix)
    step, logits = engine.step, engine.logits
    start = time.perf_counter()
    for tok in tokens:
        step(tok)
        logits()
    return time.perf_counter() - start


def _measure(engine: Engine, test: str, spec: BenchSpec, rng: np.random.Generator, prefix: list[int],
             progress: Optional[BenchProgress]) -> Measurement:
    kind, n = test[:2], int(test[2:])
    info = engine.info

    def once(n_tokens: int) -> float:
        if kind == "pp":
            return time_prefill(engine, random_tokens(info, n_tokens - len(prefix), rng) + prefix)
        return time_decode(engine, prefix, random_tokens(info, n_tokens, rng))

    if spec.warmup:
        once(n if kind == "pp" else 1)
    result = Measurement(test, n)
    for rep in range(spec.repetitions):
        result.seconds.append(once(n))
        if progress:
            progress(test, rep + 1, spec.repetitions)
    log.info("%s: median %.2f t/s over %d repetitions", test, result.median_tps, spec.repetitions)
    return result


def run_bench(engine: Engine, spec: BenchSpec, progress: Optional[BenchProgress] = None) -> list[Measurement]:
    """Every test of ``spec`` on ``engine``; the engine's cache is left cleared."""
    prefix = causal_prefix(engine.info)
    check_spec(spec, engine.info.n_ctx, len(prefix))
    rng = np.random.default_rng(spec.seed)
    with engine.lock:
        try:
            return [_measure(engine, test, spec, rng, prefix, progress) for test in tests_of(spec)]
        finally:
            engine.reset()


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (mapped model pages that were touched included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024

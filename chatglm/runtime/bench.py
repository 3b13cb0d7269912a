"""Prefill (pp), decode (tg) and prompt-then-generate (pg) throughput of an Engine, timed as llama-bench times them.

The phases are llama-bench's (``tools/llama-bench/llama-bench.cpp``, ``test_prompt`` / ``test_gen``):

- ``ppN``: N random tokens prefilled into an empty cache (in chunks of the engine's batch);
- ``tgM``: M single-token steps after no prompt, each one finished before the next (the logits read is what makes
  a GPU backend finish the step, as ``llama_synchronize`` does);
- ``ppN+tgM``: the prompt, then the M steps, in one timed span; its tokens/s counts N + M tokens.

Every repetition starts from a cleared cache; clearing and drawing the tokens stay outside the timed span. Before the
repetitions comes llama-bench's warm-up: the whole prompt (when the test has one), then one generated token (when it
has some). A model whose generation needs a prefix (ChatGLM-6B's ``[gMASK] <sop>``) gets it: at the end of each
prompt, or prefilled untimed before a tg test. Samples are nanoseconds; the figures are llama-bench's (mean and sample
standard deviation of the per-repetition tokens/s), with the median beside them.

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
from chatglm.runtime.perplexity import CAUSAL_PREFIX, causal_prefix

log = logging.getLogger(__name__)

BenchProgress = Callable[[str, int, int], None]  # (test name, repetition done, repetitions)
MAX_PREFIX = max((len(p) for p in CAUSAL_PREFIX.values()), default=0)  # the longest generation prefix of any family


@dataclass(frozen=True)
class BenchTest:
    """One llama-bench test: ``n_prompt`` tokens prefilled, then ``n_gen`` generated (either may be 0)."""

    n_prompt: int
    n_gen: int

    @property
    def name(self) -> str:  # llama-bench's "test" column
        if self.n_gen == 0:
            return f"pp{self.n_prompt}"
        if self.n_prompt == 0:
            return f"tg{self.n_gen}"
        return f"pp{self.n_prompt}+tg{self.n_gen}"

    @property
    def n_tokens(self) -> int:
        return self.n_prompt + self.n_gen


@dataclass(frozen=True)
class BenchSpec:
    """What to measure: each prompt length is a pp test, each generation length a tg test (0 skips), each pair of
    ``n_pg`` a pg test; llama-bench's order (pp, then tg, then pg)."""

    n_prompt: Sequence[int] = (512,)
    n_gen: Sequence[int] = (128,)
    n_pg: Sequence[tuple[int, int]] = ()
    repetitions: int = 5
    warmup: bool = True
    seed: int = 1234

    def tests(self) -> list[BenchTest]:
        return ([BenchTest(n, 0) for n in self.n_prompt if n > 0] + [BenchTest(0, n) for n in self.n_gen if n > 0]
                + [BenchTest(p, g) for p, g in self.n_pg])


@dataclass(frozen=True)
class BenchSettings:
    """llama-bench's settings of one run (defaults: llama-bench's, but for n_gpu_layers, ours)."""

    n_threads: int
    n_batch: int = 2048
    n_ubatch: int = 512
    type_k: str = "f16"
    type_v: str = "f16"
    n_gpu_layers: int = 0
    flash_attn: Optional[bool] = None  # None: llama.cpp decides (llama-bench's "auto", -1)

    @property
    def flash_attn_type(self) -> int:  # enum llama_flash_attn_type
        return {None: -1, False: 0, True: 1}[self.flash_attn]

    @property
    def engine_batch(self) -> int:
        """Tokens handed to the engine at a time: llama.cpp splits a batch of n_batch into micro-batches of
        n_ubatch, so chunks of min(n_batch, n_ubatch) make the same graphs (without the larger batch's buffers)."""
        return min(self.n_batch, self.n_ubatch)


def open_for_bench(path, spec: "BenchSpec", settings: BenchSettings, n_ctx: Optional[int] = None, *,
                   rpc: Sequence = (), tensor_split: Sequence[float] = ()) -> Engine:
    """The engine ``chatglm bench`` measures: ``settings`` applied, a context every test of ``spec`` fits (with
    room for any family's generation prefix) unless ``n_ctx`` is given; ``rpc``/``tensor_split`` as for
    ``open_engine``."""
    from chatglm.runtime.loader import open_engine

    if settings.type_k != settings.type_v:
        raise InputError(f"--cache-type-k {settings.type_k} and --cache-type-v {settings.type_v} differ: "
                         "keys and values share one cache type here")
    return open_engine(path, n_ctx=n_ctx or context_for(spec, MAX_PREFIX), n_threads=settings.n_threads,
                       n_gpu_layers=settings.n_gpu_layers, flash_attn=settings.flash_attn, kv_type=settings.type_k,
                       n_batch=settings.engine_batch, rpc=rpc, tensor_split=tensor_split)


@dataclass
class Measurement:
    """One test's samples: wall nanoseconds per repetition."""

    test: BenchTest
    samples_ns: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.test.name

    @property
    def n_tokens(self) -> int:
        return self.test.n_tokens

    @property
    def seconds(self) -> list[float]:
        return [ns / 1e9 for ns in self.samples_ns]

    @property
    def tps(self) -> list[float]:
        return [1e9 * self.n_tokens / ns for ns in self.samples_ns]

    @property
    def mean_tps(self) -> float:  # llama-bench's avg_ts
        return statistics.fmean(self.tps)

    @property
    def stdev_tps(self) -> float:  # llama-bench's stddev_ts: the sample standard deviation, 0 for one sample
        return statistics.stdev(self.tps) if len(self.samples_ns) > 1 else 0.0

    @property
    def median_tps(self) -> float:
        return statistics.median(self.tps)

    @property
    def mean_ns(self) -> int:  # llama-bench's avg_ns
        return int(statistics.fmean(self.samples_ns))

    @property
    def stdev_ns(self) -> int:
        return int(statistics.stdev(self.samples_ns)) if len(self.samples_ns) > 1 else 0


def check_spec(spec: BenchSpec, n_ctx: Optional[int] = None, n_prefix: int = 0) -> None:
    """Raise InputError for a spec that cannot run (in a context of ``n_ctx`` tokens, when given)."""
    if spec.repetitions < 1:
        raise InputError(f"repetitions must be at least 1, got {spec.repetitions}")
    lengths = list(spec.n_prompt) + list(spec.n_gen) + [n for pair in spec.n_pg for n in pair]
    if any(n < 0 for n in lengths):
        raise InputError(f"prompt and generation lengths must not be negative, got {lengths}")
    if any(p < 1 or g < 1 for p, g in spec.n_pg):
        raise InputError(f"a pg test needs a prompt and a generation of at least 1 token each, got {list(spec.n_pg)}")
    if not spec.tests():
        raise InputError("nothing to measure: every prompt and generation length is 0")
    if n_ctx is not None:
        for test in spec.tests():
            _check_fits(test, n_ctx, n_prefix)


def _check_fits(test: BenchTest, n_ctx: int, n_prefix: int) -> None:
    if 0 < test.n_prompt < n_prefix:
        raise InputError(f"a prompt must be at least {n_prefix} tokens for this model (its generation prefix)")
    if test.n_prompt > n_ctx:
        raise InputError(f"a prompt of {test.n_prompt} tokens is longer than the context of {n_ctx} tokens "
                         "(raise --ctx or lower --n-prompt)")
    if test.n_gen and max(test.n_prompt, n_prefix) + test.n_gen > n_ctx:
        ahead = f"a prompt of {test.n_prompt}" if test.n_prompt else f"{n_prefix} prefix"
        raise InputError(f"generating {test.n_gen} tokens (after {ahead} tokens) overflows the context of "
                         f"{n_ctx} tokens (raise --ctx or lower --n-gen)")


def context_for(spec: BenchSpec, n_prefix: int) -> int:
    """The smallest context every test of ``spec`` fits (llama-bench sizes each test's context as n_prompt +
    n_gen; one engine serves all tests here)."""
    return max(max(t.n_prompt, n_prefix) + t.n_gen for t in spec.tests())


def random_tokens(info: ModelInfo, n: int, rng: np.random.Generator) -> list[int]:
    """``n`` ids drawn uniformly from the vocabulary, the family's special tokens left out."""
    special = np.array(sorted(set(info.special.values())), dtype=np.int64)
    allowed = np.setdiff1d(np.arange(info.n_vocab, dtype=np.int64), special)
    return [int(t) for t in rng.choice(allowed, size=n)]


def time_prefill(engine: Engine, tokens: Sequence[int]) -> float:
    """Seconds to prefill ``tokens`` into a cleared cache (logits of the last one read)."""
    return time_test(engine, [], tokens, []) / 1e9


def time_decode(engine: Engine, prefix: Sequence[int], tokens: Sequence[int]) -> float:
    """Seconds for one step per token of ``tokens`` after a cleared cache holding only ``prefix`` (untimed)."""
    return time_test(engine, prefix, [], tokens) / 1e9


def time_test(engine: Engine, untimed: Sequence[int], prompt: Sequence[int], gen: Sequence[int]) -> int:
    """Nanoseconds to prefill ``prompt`` and then step through ``gen`` one token at a time, reading the logits after
    each evaluation, from a cleared cache that holds ``untimed`` first."""
    engine.reset()
    if untimed:
        engine.prefill(untimed)
    step, logits = engine.step, engine.logits
    start = time.perf_counter_ns()
    if prompt:
        engine.prefill(prompt)
        logits()
    for tok in gen:
        step(tok)
        logits()
    return time.perf_counter_ns() - start


def _warm_up(engine: Engine, prompt: list[int], untimed: list[int], first: Optional[int]) -> None:
    """llama-bench's warm-up: the whole prompt, then one generated token after it (without clearing)."""
    engine.reset()
    if prompt:
        engine.prefill(prompt)
        engine.logits()
    elif untimed:
        engine.prefill(untimed)
    if first is not None:
        engine.step(first)
        engine.logits()


def _measure(engine: Engine, test: BenchTest, spec: BenchSpec, rng: np.random.Generator, prefix: list[int],
             progress: Optional[BenchProgress]) -> Measurement:
    info = engine.info

    def draw() -> tuple[list[int], list[int], list[int]]:  # (untimed, prompt, generated)
        prompt = random_tokens(info, test.n_prompt - len(prefix), rng) + prefix if test.n_prompt else []
        return ([] if prompt else prefix), prompt, random_tokens(info, test.n_gen, rng)

    if spec.warmup:
        untimed, prompt, gen = draw()
        _warm_up(engine, prompt, untimed, gen[0] if gen else None)
    result = Measurement(test)
    for rep in range(spec.repetitions):
        result.samples_ns.append(time_test(engine, *draw()))
        if progress:
            progress(test.name, rep + 1, spec.repetitions)
    log.info("%s: %.2f ± %.2f t/s over %d repetitions", test.name, result.mean_tps, result.stdev_tps,
             spec.repetitions)
    return result


def run_bench(engine: Engine, spec: BenchSpec, progress: Optional[BenchProgress] = None) -> list[Measurement]:
    """Every test of ``spec`` on ``engine``; the engine's cache is left cleared."""
    prefix = causal_prefix(engine.info)
    check_spec(spec, engine.info.n_ctx, len(prefix))
    rng = np.random.default_rng(spec.seed)
    with engine.lock:
        try:
            return [_measure(engine, test, spec, rng, prefix, progress) for test in spec.tests()]
        finally:
            engine.reset()


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (mapped model pages that were touched included)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024

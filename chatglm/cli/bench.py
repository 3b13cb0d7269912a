"""`chatglm bench`: prefill (pp) and decode (tg) tokens/s of a GGUF, llama-bench style."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from chatglm.cli.common import (FlashAttn, GpuLayers, KVTypeOpt, RPCServers, TensorSplit, Threads, Verbose,
                               handle_errors, number, rpc_options, setup_logging)
from chatglm.errors import InputError
from chatglm.limits import MAX_CONTEXT, MAX_SEED
from chatglm.store import resolve

REPETITIONS = 1000  # most timed runs per test


@handle_errors
def bench_cmd(
    model: Annotated[Path, typer.Argument(help="A .gguf file or a stored model name.")],
    n_prompt: Annotated[Optional[list[int]], number(
        ("-p", "--n-prompt"), "Prompt length of a pp test (repeat for several; 0 skips pp).", 0, MAX_CONTEXT)] = None,
    n_gen: Annotated[Optional[list[int]], number(
        ("-n", "--n-gen"), "Tokens of a tg test (repeat for several; 0 skips tg).", 0, MAX_CONTEXT)] = None,
    repetitions: Annotated[int, number(("-r", "--repetitions"), "Timed runs per test.", 1, REPETITIONS)] = 5,
    threads: Threads = None,
    ctx: Annotated[Optional[int], number(
        ("-c", "--ctx"), "Context size (default: longest prompt + longest generation).", 1, MAX_CONTEXT)] = None,
    n_gpu_layers: GpuLayers = 0,
    flash_attn: FlashAttn = None,
    kv_type: KVTypeOpt = "f16",
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="One untimed run of each test first.")] = True,
    seed: Annotated[int, number(("--seed",), "Seed of the random tokens.", 0, MAX_SEED)] = 1234,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
    verbose: Verbose = False,
    rpc: RPCServers = None,
    tensor_split: TensorSplit = None,
) -> None:
    """Measure prompt (pp) and generation (tg) tokens/s: median and spread over repetitions."""
    from chatglm.runtime.bench import BenchSpec, check_spec, peak_rss_bytes, run_bench
    from chatglm.runtime.loader import open_engine
    from chatglm.runtime.perplexity import CAUSAL_PREFIX

    setup_logging(verbose)
    spec = BenchSpec(n_prompt=tuple(n_prompt or (512,)), n_gen=tuple(n_gen or (128,)), repetitions=repetitions,
                     warmup=warmup, seed=seed)
    check_spec(spec, ctx)
    if ctx is None:  # room for the longest test and the generation prefix some families need
        ctx = max(spec.n_prompt) + max(spec.n_gen) + max((len(p) for p in CAUSAL_PREFIX.values()), default=0)
    model = resolve(model)
    if not model.is_file():
        raise InputError("file not found", model)
    progress = _Progress(enabled=sys.stderr.isatty() and not verbose)
    with open_engine(model, n_ctx=ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                     kv_type=kv_type, **rpc_options(rpc, tensor_split)) as engine:
        results = run_bench(engine, spec, progress=progress)
        progress.done()
        report = bench_report(engine, results, threads=engine_threads(threads), n_gpu_layers=n_gpu_layers,
                              kv_type=kv_type, flash_attn=flash_attn, peak_rss=peak_rss_bytes())
    typer.echo(json.dumps(report, indent=2) if as_json else render_table(report))


def engine_threads(threads: Optional[int]) -> int:
    if threads is not None:
        return threads
    from chatglm.runtime.llama_native import physical_cores

    return physical_cores()


def bench_report(engine, results, *, threads: int, n_gpu_layers: int, kv_type: str, flash_attn: Optional[bool],
                 peak_rss: int) -> dict:
    info = engine.info
    return {
        "model": {"path": str(info.path), "description": info.description, "arch": info.arch, "family": info.family,
                  "size_bytes": info.size_bytes, "n_params": info.n_params},
        "engine": type(engine).__name__,
        "settings": {"threads": threads, "n_ctx": info.n_ctx, "n_gpu_layers": n_gpu_layers, "kv_type": kv_type,
                     "flash_attn": flash_attn},
        "system": {"machine": platform.machine(), "processor": platform.processor(),
                   "python": platform.python_version()},
        "peak_rss_bytes": peak_rss,
        "results": [r.to_dict() for r in results],
    }


def render_table(report: dict) -> str:
    m, s = report["model"], report["settings"]
    head = ["model", "size", "params", "engine", "threads", "test", "t/s (median)", "± stdev", "min … max"]
    rows = [[m["description"], _size(m["size_bytes"]), _count(m["n_params"]), report["engine"],
             str(s["threads"]), r["test"], f"{r['median_tps']:.2f}", f"{r['stdev_tps']:.2f}",
             f"{r['min_tps']:.2f} … {r['max_tps']:.2f}"] for r in report["results"]]
    widths = [max(len(row[i]) for row in [head] + rows) for i in range(len(head))]
    right = {1, 2, 4, 6, 7, 8}

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths, strict=True))) + " |"

    rule = "| " + " | ".join(("-" * (w - 1) + ":") if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    footer = f"peak RSS {report['peak_rss_bytes'] / 2**20:.0f} MiB"
    return "\n".join([line(head), rule] + [line(r) for r in rows] + ["", footer])


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


class _Progress:
    """One status line on stderr (terminal only): which test and repetition is running."""

    def __init__(self, enabled: bool):
        self.enabled = enabled

    def __call__(self, test: str, rep: int, reps: int) -> None:
        if self.enabled:
            sys.stderr.write(f"\r{test}: {rep}/{reps}   ")
            sys.stderr.flush()

    def done(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 30 + "\r")
            sys.stderr.flush()

"""`chatglm bench`: prefill (pp), decode (tg) and prompt-then-generate (pg) tokens/s of a GGUF, as llama-bench
measures and prints them (its phases, repetitions, warm-up, settings, table and JSON layouts)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from chatglm.cli.common import (GpuLayers, KVType, RPCServers, TensorSplit, Threads, Verbose, choice, handle_errors,
                               number, rpc_options, setup_logging, str_choices)
from chatglm.errors import InputError
from chatglm.limits import MAX_CONTEXT, MAX_SEED
from chatglm.store import resolve

REPETITIONS = 1000  # most timed runs per test
Output = str_choices("Output", ("md", "json", "jsonl", "csv"))
FlashAttnMode = str_choices("FlashAttnMode", ("auto", "on", "off", "1", "0", "-1"))
_FLASH = {"auto": None, "-1": None, "on": True, "1": True, "off": False, "0": False}
KVOpt = Annotated[Optional[KVType], choice(("--kv-type",), KVType, "KV cache type of keys and values.")]


@handle_errors
def bench_cmd(
    model: Annotated[Path, typer.Argument(help="A .gguf file or a stored model name.")],
    n_prompt: Annotated[Optional[list[int]], number(
        ("-p", "--n-prompt"), "Prompt length of a pp test (repeat for several; 0 skips pp).", 0, MAX_CONTEXT)] = None,
    n_gen: Annotated[Optional[list[int]], number(
        ("-n", "--n-gen"), "Tokens of a tg test (repeat for several; 0 skips tg).", 0, MAX_CONTEXT)] = None,
    n_pg: Annotated[Optional[list[str]], typer.Option(
        "-pg", help="A prompt-then-generate test PP,TG (repeat for several), as llama-bench's -pg.")] = None,
    repetitions: Annotated[int, number(("-r", "--repetitions"), "Timed runs per test.", 1, REPETITIONS)] = 5,
    threads: Threads = None,
    n_batch: Annotated[int, number(("-b", "--batch-size"), "Logical batch (llama-bench's -b).", 1, MAX_CONTEXT)] = 2048,
    n_ubatch: Annotated[int, number(("-ub", "--ubatch-size"), "Physical batch (llama-bench's -ub).", 1,
                                    MAX_CONTEXT)] = 512,
    ctx: Annotated[Optional[int], number(
        ("-c", "--ctx"), "Context size (default: the longest test's tokens).", 1, MAX_CONTEXT)] = None,
    n_gpu_layers: GpuLayers = 0,
    flash_attn: Annotated[FlashAttnMode, choice(("-fa", "--flash-attn"), FlashAttnMode,
                                                "Flash attention on|off|auto (llama-bench's -fa).")] = "auto",
    cache_type_k: Annotated[Optional[KVType], choice(("-ctk", "--cache-type-k"), KVType,
                                                     "KV cache type of keys.")] = None,
    cache_type_v: Annotated[Optional[KVType], choice(("-ctv", "--cache-type-v"), KVType,
                                                     "KV cache type of values.")] = None,
    kv_type: KVOpt = None,
    warmup: Annotated[bool, typer.Option("--warmup/--no-warmup", help="llama-bench's warm-up run first.")] = True,
    seed: Annotated[int, number(("--seed",), "Seed of the random tokens.", 0, MAX_SEED)] = 1234,
    output: Annotated[Output, choice(("-o", "--output"), Output, "Output format, as llama-bench's -o.")] = "md",
    as_json: Annotated[bool, typer.Option("--json", help="The same as -o json.")] = False,
    verbose: Verbose = False,
    rpc: RPCServers = None,
    tensor_split: TensorSplit = None,
) -> None:
    """Measure prompt (pp), generation (tg) and prompt+generation (pg) tokens/s as llama-bench does: mean ± stdev."""
    from chatglm.runtime.bench import BenchSettings, BenchSpec, check_spec, open_for_bench, peak_rss_bytes, run_bench
    from chatglm.runtime.bench_report import records, render, system_fields

    setup_logging(verbose)
    spec = BenchSpec(n_prompt=tuple(n_prompt or (512,)), n_gen=tuple(n_gen or (128,)),
                     n_pg=tuple(parse_pg(x) for x in n_pg or ()), repetitions=repetitions, warmup=warmup, seed=seed)
    check_spec(spec, ctx)
    settings = BenchSettings(n_threads=engine_threads(threads), n_batch=n_batch, n_ubatch=n_ubatch,
                             type_k=cache_type_k or kv_type or "f16", type_v=cache_type_v or kv_type or "f16",
                             n_gpu_layers=n_gpu_layers, flash_attn=_FLASH[flash_attn])
    model = resolve(model)
    if not model.is_file():
        raise InputError("file not found", model)
    progress = _Progress(enabled=sys.stderr.isatty() and not verbose)
    with open_for_bench(model, spec, settings, ctx, **rpc_options(rpc, tensor_split)) as engine:
        results = run_bench(engine, spec, progress=progress)
        progress.done()
        recs = records(engine, results, settings, system=system_fields(), peak_rss=peak_rss_bytes())
    typer.echo(render(recs, "json" if as_json else output))


def parse_pg(text: str) -> tuple[int, int]:
    """llama-bench's -pg value "PP,TG" as (PP, TG)."""
    parts = text.split(",")
    try:
        pp, tg = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"-pg: expected PP,TG (two token counts), got {text!r}") from None
    if not (1 <= pp <= MAX_CONTEXT and 1 <= tg <= MAX_CONTEXT):
        raise InputError(f"-pg: both counts must be between 1 and {MAX_CONTEXT}, got {text!r}")
    return pp, tg


def engine_threads(threads: Optional[int]) -> int:
    """-t, or what run and serve use: the physical cores this process may run on (llama-bench's default too)."""
    if threads is not None:
        return threads
    from chatglm.runtime.llama_native import physical_cores

    return physical_cores()


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

"""`chatglm perplexity`: strided sliding-window perplexity of a text file under a GGUF model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from chatglm.cli.common import (FlashAttn, GpuLayers, KVTypeOpt, RPCServers, TensorSplit, Threads, handle_errors,
                               number, rpc_options, setup_logging)
from chatglm.errors import InputError
from chatglm.limits import MAX_CONTEXT
from chatglm.store import resolve


@handle_errors
def perplexity_cmd(
    model: Annotated[Path, typer.Argument(help="A .gguf file or a stored model name.")],
    text_file: Annotated[Path, typer.Argument(help="A UTF-8 text file (scored as plain text).")],
    window: Annotated[int, number(("-w", "--window", "-l", "--max-length"),
                                  "Tokens per window (the context each window is scored in).", 2, MAX_CONTEXT)] = 1024,
    stride: Annotated[int, number(("-s", "--stride"), "Tokens between window starts.", 1, MAX_CONTEXT)] = 512,
    threads: Threads = None,
    n_gpu_layers: GpuLayers = 0,
    flash_attn: FlashAttn = None,
    kv_type: KVTypeOpt = "f16",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every window's perplexity.")] = False,
    rpc: RPCServers = None,
    tensor_split: TensorSplit = None,
) -> None:
    """Perplexity of TEXT_FILE: windows of --window tokens every --stride tokens, each token scored once."""
    from chatglm.runtime.loader import open_engine
    from chatglm.runtime.perplexity import CAUSAL_PREFIX, check_window, perplexity_of_file, read_text

    setup_logging(verbose)
    check_window(window, stride)
    read_text(text_file)  # fail on a missing or empty file before loading the model
    model = resolve(model)
    if not model.is_file():
        raise InputError("file not found", model)
    n_prefix = max((len(p) for p in CAUSAL_PREFIX.values()), default=0)
    with open_engine(model, n_ctx=window + n_prefix, n_threads=threads, n_gpu_layers=n_gpu_layers,
                     flash_attn=flash_attn, kv_type=kv_type, **rpc_options(rpc, tensor_split)) as engine, \
            _WindowBar(enabled=sys.stderr.isatty() and not verbose) as bar:
        result = perplexity_of_file(engine, text_file, window=window, stride=stride, progress=bar)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(f"perplexity: {result.perplexity:.4f} ({result.n_scored} of {result.n_tokens} tokens scored in "
                   f"{len(result.scored)} windows of {window}, stride {stride}; {result.seconds:.1f}s)")


class _WindowBar:
    """A rich progress bar over windows, with the running perplexity; silent off a terminal."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> "_WindowBar":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeRemainingColumn(), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task("perplexity", total=None)
        return self

    def __call__(self, done: int, total: int, ppl: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total, description=f"perplexity {ppl:.3f}")

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

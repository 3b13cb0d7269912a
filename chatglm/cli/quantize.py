"""`chatglm quantize`: re-encode a GGUF's tensors to another type, keeping its metadata and tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from chatglm.cli.common import ByteProgress, OutTypeArg, QuantThreads, Verbose, handle_errors, setup_logging


@handle_errors
def quantize_cmd(
    source: Annotated[Path, typer.Argument(help="Input .gguf (f32, f16 or bf16 weights).")],
    output: Annotated[Path, typer.Argument(help="Output .gguf path.")],
    qtype: OutTypeArg,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Importance matrix (llama.cpp format).")] = None,
    allow_requantize: Annotated[bool, typer.Option(
        "--allow-requantize", help="Re-encode tensors that are already quantized (loses more than quantizing the "
        "original weights).")] = False,
    threads: QuantThreads = None,
    verbose: Verbose = False,
) -> None:
    """Quantize a GGUF file (an f32/f16/bf16 one, as `chatglm convert` writes) to another type or recipe."""
    from chatglm.convert.requantize import quantize_gguf

    setup_logging(verbose)
    with ByteProgress("quantizing") as progress:
        result = quantize_gguf(source, output, qtype, imatrix=imatrix, allow_requantize=allow_requantize,
                               threads=threads, progress=progress)
    typer.echo(f"wrote {result.path}: {result.arch}, {result.n_tensors} tensors ({result.n_changed} re-encoded), "
               f"{result.qtype}, {result.nbytes / 2**20:.1f} MiB in {result.seconds:.1f}s")

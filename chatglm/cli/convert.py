"""`chatglm convert`: a Hugging Face checkpoint folder to one GGUF file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from chatglm.cli.common import (ByteProgress, LoraScales, OutTypeOpt, QuantThreads, Verbose, handle_errors,
                               setup_logging)


@handle_errors
def convert_cmd(
    model_dir: Annotated[Path, typer.Argument(help="Checkpoint folder (config.json, weights, tokenizer files).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output .gguf path.")] = None,
    outtype: OutTypeOpt = "f16",
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Importance matrix (llama.cpp format).")] = None,
    threads: QuantThreads = None,
    lora: Annotated[Optional[List[Path]], typer.Option(
        "--lora", metavar="DIR", help="PEFT LoRA adapter folder to merge into the weights (repeatable).")] = None,
    lora_scale: LoraScales = None,
    ptuning: Annotated[Optional[Path], typer.Option(
        "--ptuning", metavar="DIR", help="P-Tuning v2 folder (its trained prefix_encoder) or PEFT prefix-tuning "
        "adapter to carry in the GGUF.")] = None,
    ptuning_type: Annotated[str, typer.Option(
        "--ptuning-type", help="How the prefix is stored: f32, or f16 (half the size).")] = "f32",
    mmproj_type: Annotated[str, typer.Option(
        "--mmproj-type", help="Projector (mmproj) type for vision/speech checkpoints: f32, f16, bf16, q8_0.")] = "f16",
    no_mmproj: Annotated[bool, typer.Option("--no-mmproj", help="Do not write the projector.")] = False,
    verbose: Verbose = False,
) -> None:
    """Convert a ChatGLM / GLM checkpoint to GGUF (no torch needed)."""
    from chatglm.convert.pipeline import convert

    setup_logging(verbose)
    with ByteProgress("converting") as progress:
        result = convert(model_dir, output, outtype, imatrix=imatrix, threads=threads, progress=progress,
                         lora=lora or (), lora_scale=lora_scale or 1.0, ptuning=ptuning, ptuning_type=ptuning_type,
                         mmproj=not no_mmproj,
                         mmproj_type=mmproj_type)
    typer.echo(f"wrote {result.path}: {result.family} ({result.arch}), {result.n_tensors} tensors, {result.qtype}, "
               f"{result.nbytes / 2**20:.1f} MiB in {result.seconds:.1f}s")
    if result.mmproj is not None:
        typer.echo(f"wrote {result.mmproj}: projector, {result.mmproj.stat().st_size / 2**20:.1f} MiB")

"""`chatglm lora`: a PEFT LoRA adapter as a llama.cpp adapter GGUF, to apply at run time (`chatglm run --lora`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from chatglm.cli.common import LoraTypeOpt, Verbose, handle_errors, setup_logging


@handle_errors
def lora_cmd(
    model_dir: Annotated[Path, typer.Argument(help="The base checkpoint folder the adapter was trained on.")],
    adapter_dir: Annotated[Path, typer.Argument(help="PEFT adapter folder (adapter_config.json + weights).")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output adapter .gguf.")] = None,
    outtype: LoraTypeOpt = "f16",
    verbose: Verbose = False,
) -> None:
    """Write a LoRA adapter GGUF for `chatglm run --lora` (or merge it with `chatglm convert --lora`)."""
    from chatglm.convert.lora_gguf import write_lora_gguf

    setup_logging(verbose)
    dest = output or Path.cwd() / f"{adapter_dir.resolve().name}-lora-{outtype}.gguf"
    path = write_lora_gguf(model_dir, adapter_dir, dest, outtype)
    typer.echo(f"wrote {path}")

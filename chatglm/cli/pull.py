"""`chatglm pull ORG/REPO[:TYPE]`: a Hugging Face repository into the store (`chatglm.pull`)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from chatglm.cli.common import fail, handle_errors, setup_logging


@handle_errors
def pull_cmd(
    model: Annotated[Optional[str], typer.Argument(help="ORG/REPO[:TYPE] or a known short name (--list-known); "
                                                        "TYPE defaults to q4_k_m.", show_default=False)] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="A branch, tag or commit of the "
                                                                        "repository.")] = None,
    list_known: Annotated[bool, typer.Option("--list-known", help="Print the short names and their "
                                                                  "repositories.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Download a checkpoint from the Hugging Face hub and convert it into the store (a GGUF repository as is)."""
    from chatglm.pull import known_table, pull

    if list_known:
        typer.echo(known_table())
        return
    if not model:
        raise fail("give a model: ORG/REPO[:TYPE] (or --list-known)")
    setup_logging(verbose)
    entry = pull(model, revision=revision)
    typer.echo(f"pulled {entry.ref} ({entry.gguf})")

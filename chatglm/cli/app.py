"""The `chatglm` command: thin Typer wrappers over the library."""

from __future__ import annotations

from typing import Annotated

import typer

from chatglm.cli.bench import bench_cmd
from chatglm.cli.common import OneLineErrors
from chatglm.cli.convert import convert_cmd
from chatglm.cli.info import info_cmd
from chatglm.cli.lora import lora_cmd
from chatglm.cli.models import list_cmd, rm_cmd, show_cmd
from chatglm.cli.perplexity import perplexity_cmd
from chatglm.cli.pull import pull_cmd
from chatglm.cli.quantize import quantize_cmd
from chatglm.cli.rpc_server import rpc_server_cmd
from chatglm.cli.run import run_cmd
from chatglm.cli.serve import serve_cmd
from chatglm.cli.version import version_callback

app = typer.Typer(cls=OneLineErrors, no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Convert ChatGLM / GLM checkpoints to GGUF and chat with them.")


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                                help="Versions and the backends compiled in, then exit.")] = False,
          ) -> None:
    """Convert ChatGLM / GLM checkpoints to GGUF and chat with them."""


app.command("convert")(convert_cmd)
app.command("run")(run_cmd)
app.command("info")(info_cmd)
app.command("serve")(serve_cmd)
app.command("bench")(bench_cmd)
app.command("perplexity")(perplexity_cmd)
app.command("quantize")(quantize_cmd)
app.command("lora")(lora_cmd)
app.command("pull")(pull_cmd)
app.command("list")(list_cmd)
app.command("show")(show_cmd)
app.command("rm")(rm_cmd)
app.command("rpc-server")(rpc_server_cmd)


def main() -> None:
    app()

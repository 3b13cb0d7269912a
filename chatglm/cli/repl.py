"""The interactive chat loop of `chatglm run`."""

from __future__ import annotations

import sys

import typer

from chatglm.errors import ChatGLMError
from chatglm.runtime.messages import Message


def repl(m, history: list[Message], *, verbose: bool = False) -> None:
    from chatglm.cli.run import print_stats

    typer.echo(f"{m.info.description} ({m.info.family}) — type /exit or Ctrl-D to quit, /clear to start over.",
               err=True)
    system = [msg for msg in history if msg.role == "system"]
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            typer.echo("", err=True)
            return
        if not line.strip():
            continue
        if line.strip() in ("/exit", "/quit", "/bye"):
            return
        if line.strip() == "/clear":
            history = list(system)
            continue
        history.append(Message("user", line))
        try:
            for delta in m.stream_chat(history):
                sys.stdout.write(delta)
                sys.stdout.flush()
        except ChatGLMError as exc:
            history.pop()
            typer.echo(f"error: {exc}", err=True)
            continue
        except KeyboardInterrupt:
            history.pop()
            sys.stdout.write("\n")
            continue
        sys.stdout.write("\n")
        history.append(m.last_reply)
        if verbose:
            print_stats(m)

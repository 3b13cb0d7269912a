"""`chatglm list`, `show NAME`, `rm NAME`: the local model store (`chatglm.store`)."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from chatglm.cli.common import handle_errors

NameArg = Annotated[str, typer.Argument(help="A stored model: ORG/REPO[:TYPE] or NAME[:TYPE].", show_default=False)]


@handle_errors
def list_cmd(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON array.")] = False) -> None:
    """The models in the store: name, type, size, modified (a broken entry is one line on stderr)."""
    from chatglm.runtime.memory import human
    from chatglm.store import Store

    store, problems = Store(), []
    entries = store.entries(problems)
    for problem in problems:
        typer.echo(f"warning: {problem}", err=True)
    rows = [{"name": e.name, "type": e.type, "size": e.size, "modified": e.modified, "path": str(e.gguf),
             "source": e.manifest.get("source")} for e in entries]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo(f"no models in {store.root} (`chatglm pull ORG/REPO` fetches one)")
        return
    width = max(len("NAME"), *(len(r["name"]) for r in rows))
    typer.echo(f"{'NAME':<{width}}  {'TYPE':<8}  {'SIZE':>10}  MODIFIED")
    for r in rows:
        stamp = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["modified"]))
        typer.echo(f"{r['name']:<{width}}  {r['type']:<8}  {human(r['size']):>10}  {stamp}")


@handle_errors
def show_cmd(name: NameArg, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """What `info` says about a stored model, plus where it came from."""
    from chatglm.cli.info import describe_file, text_lines
    from chatglm.store import Store

    entry = Store().find(name)
    d = describe_file(entry.gguf, None, "f16")
    d["store"] = {"name": entry.name, "type": entry.type, "source": entry.manifest.get("source"),
                  "created": entry.manifest.get("created"), "files": entry.manifest.get("files")}
    if as_json:
        typer.echo(json.dumps(d, ensure_ascii=False, indent=2, default=str))
        return
    source = entry.manifest.get("source") or {}
    where = source.get("repo") or "(added by hand)"
    if source.get("revision"):
        where += f" @ {source['revision']}"
    lines = text_lines(d)
    lines[1:1] = [f"  name           {entry.ref}", f"  source         {where}",
                  f"  created        {entry.manifest.get('created', '?')}"]
    typer.echo("\n".join(lines))


@handle_errors
def rm_cmd(name: NameArg) -> None:
    """Remove a stored model (its GGUF, projector and manifest)."""
    from chatglm.store import Store

    entry = Store().remove(name)
    typer.echo(f"removed {entry.ref}")

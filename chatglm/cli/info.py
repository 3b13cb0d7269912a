"""`chatglm info`: what a GGUF holds and how much memory running it takes."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Optional

import gguf
import typer

from chatglm.cli.common import KVTypeOpt, handle_errors, number
from chatglm.limits import MAX_CONTEXT


def describe_file(path: Path, n_ctx: Optional[int], kv_type: str) -> dict:
    from chatglm.gguf_file import read_header
    from chatglm.runtime.loader import describe
    from chatglm.runtime.memory import default_context, estimate

    header = read_header(path)
    info = describe(header)
    ctx = n_ctx or default_context(header, kv_type)
    mem = estimate(header, ctx, kv_type)
    classes: dict[str, dict[str, int]] = {}
    for t in header.tensors.values():
        cls = re.sub(r"^blk\.\d+\.", "", t.name)
        name = gguf.GGMLQuantizationType(t.ggml_type).name.lower()
        classes.setdefault(cls, {}).setdefault(name, 0)
        classes[cls][name] += 1
    file_type = header.get("general.file_type")
    return {
        "path": str(path), "architecture": header.arch, "family": info.family, "chat_format": info.chat_format,
        "name": header.get("general.name"), "parameters": info.n_params, "file_size": header.file_size,
        "file_type": gguf.LlamaFileType(file_type).name if isinstance(file_type, int) and file_type in
        {f.value for f in gguf.LlamaFileType} else file_type,
        "context_length": info.n_ctx_train, "tensor_types": classes,
        "rope": {"freq_base": header.arch_get("rope.freq_base"), "scaling": header.arch_get("rope.scaling.type"),
                 "factor": header.arch_get("rope.scaling.factor")},
        "tokenizer": {"model": header.get("tokenizer.ggml.model"), "tokens": info.n_vocab,
                      "pre": header.get("tokenizer.ggml.pre")},
        "special_tokens": info.special,
        "special_ids": {k.removeprefix("tokenizer.ggml.").removesuffix("_token_id"): v for k, v in header.kv.items()
                        if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")},
        "memory": {"n_ctx": ctx, "kv_type": kv_type, "weights": mem.weights, "kv_cache": mem.kv_cache,
                   "compute": mem.buffers, "total": mem.total},
    }


def rope_text(rope: dict) -> str:
    text = f", rope base {rope['freq_base']:g}" if rope.get("freq_base") else ""
    if rope.get("scaling") and rope["scaling"] != "none" and rope.get("factor"):
        text += f", {rope['scaling']} position scaling ×{rope['factor']:g}"
    return text


def count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


@handle_errors
def info_cmd(
    model: Annotated[Path, typer.Argument(help="A .gguf file.")],
    ctx: Annotated[Optional[int], number(("-c", "--ctx"), "Context size for the memory estimate.", 1,
                                         MAX_CONTEXT)] = None,
    kv_type: KVTypeOpt = "f16",
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Show a GGUF's architecture, sizes, tensor types, tokenizer and memory needs."""
    from chatglm.runtime.memory import human

    d = describe_file(model, ctx, kv_type)
    if as_json:
        typer.echo(json.dumps(d, ensure_ascii=False, indent=2))
        return
    mem = d["memory"]
    lines = [
        f"{d['path']}",
        f"  architecture   {d['architecture']} (family {d['family']}, chat format {d['chat_format']})",
        f"  parameters     {count(d['parameters'])}    file {human(d['file_size'])}    type {d['file_type']}",
        f"  context        {d['context_length']} tokens trained{rope_text(d['rope'])}",
        f"  tokenizer      {d['tokenizer']['model']} ({d['tokenizer']['pre']}), {d['tokenizer']['tokens']} tokens",
        "  special        " + ", ".join(f"{k}={v}" for k, v in d["special_tokens"].items()),
        "  ids            " + ", ".join(f"{k}={v}" for k, v in d["special_ids"].items()),
        "  tensor types   " + "; ".join(f"{c}: " + ", ".join(f"{t}×{n}" for t, n in ts.items())
                                       for c, ts in d["tensor_types"].items()),
        f"  memory         {human(mem['total'])} at {mem['n_ctx']} tokens ({mem['kv_type']} KV): weights "
        f"{human(mem['weights'])} + KV {human(mem['kv_cache'])} + compute {human(mem['compute'])}",
    ]
    typer.echo("\n".join(lines))

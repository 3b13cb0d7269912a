"""`chatglm info`: what a GGUF holds and how much memory running it takes.

A model this tool runs is validated exactly as `run` validates it (a file that would be refused there is refused here,
with the same line); any other GGUF (a LoRA adapter, another architecture) is described as the file says, and the
output says plainly that this tool does not run it.
"""

from __future__ import annotations

import json
import re
from numbers import Real
from pathlib import Path
from typing import Annotated, Optional

import gguf
import typer

from chatglm.cli.common import DraftModel, KVTypeOpt, Mtp, fail, handle_errors, number
from chatglm.limits import MAX_CONTEXT
from chatglm.store import resolve


def describe_file(path: Path, n_ctx: Optional[int], kv_type: str, draft: Optional[Path] = None,
                  mtp: bool = False) -> dict:
    from chatglm.gguf_file import read_header
    from chatglm.runtime.loader import ENGINES, describe, not_runnable, validate
    from chatglm.runtime.validate import check_context, check_kv_type, resolve_flash_attn

    check_kv_type(kv_type)
    if n_ctx is not None:
        check_context(n_ctx)
    header = read_header(path)
    problem = not_runnable(header)
    if problem is None:
        validate(header)
    info = describe(header)
    file_type = header.get("general.file_type")
    d = {
        "path": str(path), "architecture": header.arch, "type": header.get("general.type") or "model",
        "runnable": problem is None, "note": problem,
        "family": info.family or None, "chat_format": info.chat_format or None,
        "chat": chat_path(info.chat_format) if problem is None else None,
        "chat_template": bool(info.chat_template), "stop_token_ids": sorted(info.eog),
        "name": header.get("general.name"), "parameters": info.n_params, "file_size": header.file_size,
        "file_type": gguf.LlamaFileType(file_type).name if isinstance(file_type, int) and file_type in
        {f.value for f in gguf.LlamaFileType} else file_type,
        "context_length": info.n_ctx_train, "tensor_types": tensor_types(header),
        "rope": {"freq_base": header.arch_get("rope.freq_base"), "scaling": header.arch_get("rope.scaling.type"),
                 "factor": header.arch_get("rope.scaling.factor")},
        "tokenizer": {"model": header.get("tokenizer.ggml.model"), "tokens": info.n_vocab,
                      "pre": header.get("tokenizer.ggml.pre")},
        "special_tokens": info.special,
        "special_ids": {k.removeprefix("tokenizer.ggml.").removesuffix("_token_id"): v for k, v in header.kv.items()
                        if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")},
        "memory": None, "speculation": None, "attention": None, "mtp_layers": mtp_layers(header), "projector": None,
        "mtp_drafting": mtp_usable(header) if mtp_layers(header) else None,
        "ptuning": ptuning(header),
    }
    if problem is None:
        flash = None
        if ENGINES[header.arch].endswith(":LlamaEngine"):
            flash, d["attention"] = resolve_flash_attn(kv_type, None)
        d["memory"] = memory(header, n_ctx, kv_type, flash is not False)
        d["projector"] = projector(path, d["memory"])
        d["speculation"] = speculation(path, header, d["memory"], draft, mtp, flash is not False)
    return d


def speculation(path: Path, header, mem: dict, draft: Optional[Path], mtp: bool, flash_attn: bool) -> Optional[dict]:
    """What --draft / --mtp add to the memory estimate (the draft model checked as `run` checks it)."""
    from chatglm.runtime.model import check_draft_model
    from chatglm.runtime.speculative import SpeculativeConfig, memory_estimate

    if draft is None and not mtp:
        return None
    spec = SpeculativeConfig(draft=draft, mtp=mtp)
    check_draft_model(path, spec)
    est = memory_estimate(header, spec, mem["n_ctx"], mem["kv_type"], flash_attn)
    mem["total"] += est.total
    d = est.draft
    return {"draft": None if d is None else {"path": str(draft), "weights": d.weights, "kv_cache": d.kv_cache,
                                             "compute": d.buffers, "total": d.total},
            "mtp": {"kv_cache": est.mtp_kv, "compute": est.mtp_compute, "states": est.mtp_states} if mtp else None,
            "outputs": est.outputs, "total": est.total}


def ptuning(header) -> Optional[dict]:
    """The P-Tuning v2 prefix the GGUF carries (checked as loading checks it), None without one."""
    from chatglm.runtime.ptuning import read_prefix

    prefix = read_prefix(header)
    if prefix is None:
        return None
    n_layer, _, n, width = prefix.shape
    return {"pre_seq_len": n, "layers": n_layer, "width": width, "bytes": prefix.nbytes}


def projector(path: Path, mem: dict) -> Optional[dict]:
    """The projector beside the model (vision/speech), counted into the memory estimate."""
    from chatglm.runtime.mtmd import projector_estimate

    proj = projector_estimate(path)
    if proj is None:
        return None
    mem["total"] += proj.total
    return {"path": proj.path, "projector_type": proj.projector_type, "weights": proj.weights,
            "compute": proj.compute, "image_tokens": proj.image_tokens}


def chat_path(fmt: str) -> str:
    """How the model's prompts are built: a token-exact builder, or the GGUF's own template in the sandbox."""
    from chatglm.schema.keys import JINJA_CHAT_FORMAT

    return "the GGUF's Jinja template (sandboxed)" if fmt == JINJA_CHAT_FORMAT else f"{fmt} (token-exact builder)"


def memory(header, n_ctx: Optional[int], kv_type: str, flash_attn: bool) -> dict:
    from chatglm.runtime.memory import default_context, estimate

    ctx = n_ctx if n_ctx is not None else default_context(header, kv_type)
    mem = estimate(header, ctx, kv_type, flash_attn=flash_attn)
    return {"n_ctx": ctx, "kv_type": kv_type, "weights": mem.weights, "kv_cache": mem.kv_cache,
            "compute": mem.buffers, "total": mem.total}


def mtp_usable(header) -> str:
    """Whether ``chatglm run --mtp`` drafts with the file's NextN layer, or why not."""
    from chatglm.errors import ChatGLMError
    from chatglm.runtime.speculative_mtp import check_mtp

    try:
        check_mtp(header)
    except ChatGLMError as exc:
        return f"not by --mtp here: {str(exc).split(': ', 1)[-1]}"
    return "chatglm run --mtp drafts with them"


def mtp_layers(header) -> int:
    """NextN (multi-token-prediction) blocks the file keeps after the trunk, for speculative decoding."""
    n = header.arch_get("nextn_predict_layers")
    return n if type(n) is int and n > 0 else 0


def tensor_types(header) -> dict[str, dict[str, int]]:
    classes: dict[str, dict[str, int]] = {}
    for t in header.tensors.values():
        cls = re.sub(r"^blk\.\d+\.", "", t.name)
        name = gguf.GGMLQuantizationType(t.ggml_type).name.lower()
        classes.setdefault(cls, {}).setdefault(name, 0)
        classes[cls][name] += 1
    return classes


def rope_text(rope: dict) -> str:
    base, factor = rope.get("freq_base"), rope.get("factor")
    text = f", rope base {base:g}" if isinstance(base, Real) and base else ""
    if rope.get("scaling") and rope["scaling"] != "none" and isinstance(factor, Real) and factor:
        text += f", {rope['scaling']} position scaling ×{factor:g}"
    return text


def count(n: int) -> str:
    from chatglm.runtime.memory import params_text

    return params_text(n)


def text_lines(d: dict) -> list[str]:
    from chatglm.runtime.memory import human

    kind = "" if d["type"] == "model" else f" ({d['type']})"
    fmt = f" (family {d['family']}, chat format {d['chat_format']})" if d["runnable"] else kind
    lines = [
        f"{d['path']}",
        f"  architecture   {d['architecture']}{fmt}",
        f"  parameters     {count(d['parameters'])}    file {human(d['file_size'])}    type {d['file_type']}",
    ]
    if not d["runnable"]:
        lines.append(f"  not runnable   {d['note']}")
    else:
        lines.append(f"  chat           {d['chat']}")
    if d["tokenizer"]["tokens"]:
        lines += [
            f"  context        {d['context_length']} tokens trained{rope_text(d['rope'])}",
            f"  tokenizer      {d['tokenizer']['model']} ({d['tokenizer']['pre']}), {d['tokenizer']['tokens']} tokens",
            "  special        " + ", ".join(f"{k}={v}" for k, v in d["special_tokens"].items()),
            "  ids            " + ", ".join(f"{k}={v}" for k, v in d["special_ids"].items()),
        ]
    if d["ptuning"]:
        pt = d["ptuning"]
        lines.append(f"  P-Tuning v2    prefix of {pt['pre_seq_len']} entries in front of each of {pt['layers']} "
                     f"layers' keys and values ({pt['width']} wide, {human(pt['bytes'])} f32); it takes "
                     f"{pt['pre_seq_len']} cells of the KV cache besides the context")
    if d["mtp_layers"]:
        lines.append(f"  MTP layers     {d['mtp_layers']} (NextN blocks usable for speculative decoding: "
                     f"{d['mtp_drafting']}; plain generation runs the trunk only)")
    lines.append("  tensor types   " + "; ".join(f"{c}: " + ", ".join(f"{t}×{n}" for t, n in ts.items())
                                             for c, ts in d["tensor_types"].items()))
    mem, proj = d["memory"], d["projector"]
    if proj:
        lines.append(f"  projector      {proj['path']} ({proj['projector_type']}): weights {human(proj['weights'])} + "
                     f"encoder {human(proj['compute'])}; an image of its own size takes {proj['image_tokens']} tokens")
    if mem:
        extra = f" + projector {human(proj['weights'] + proj['compute'])}" if proj else ""
        lines.append(f"  memory         {human(mem['total'])} at {mem['n_ctx']} tokens ({mem['kv_type']} KV): weights "
                     f"{human(mem['weights'])} + KV {human(mem['kv_cache'])} + compute {human(mem['compute'])}{extra}")
    spec = d.get("speculation")
    if spec and spec["draft"]:
        dr = spec["draft"]
        lines.append(f"  draft model    {dr['path']}: {human(dr['total'])}: weights {human(dr['weights'])} + KV "
                     f"{human(dr['kv_cache'])} + compute {human(dr['compute'])} (counted in memory)")
    if spec and spec["mtp"]:
        mt = spec["mtp"]
        lines.append(f"  MTP context    KV {human(mt['kv_cache'])} + compute {human(mt['compute'])} + hidden states "
                     f"{human(mt['states'])} + logits of every position {human(spec['outputs'])} (counted in memory)")
    if d["attention"]:
        lines.append(f"  attention      {d['attention']}")
    return lines


@handle_errors
def info_cmd(
    model: Annotated[Optional[Path], typer.Argument(help="A .gguf file or a stored model name.")] = None,
    ctx: Annotated[Optional[int], number(("-c", "--ctx"), "Context size for the memory estimate.", 1,
                                         MAX_CONTEXT)] = None,
    kv_type: KVTypeOpt = "f16",
    as_json: Annotated[bool, typer.Option("--json")] = False,
    system: Annotated[bool, typer.Option("--system", help="Versions and the backends compiled in (RPC "
                                                          "included), instead of a model.")] = False,
    draft: DraftModel = None,
    mtp: Mtp = False,
) -> None:
    """Show a GGUF's architecture, sizes, tensor types, tokenizer and memory needs."""
    if system:
        from chatglm.cli.version import version_text

        typer.echo(version_text())
        return
    if model is None:
        raise fail("give a model (or --system)")
    d = describe_file(resolve(model), ctx, kv_type, resolve(draft) if draft is not None else None, mtp)
    if as_json:
        typer.echo(json.dumps(d, ensure_ascii=False, indent=2, default=str))
        return
    typer.echo("\n".join(text_lines(d)))

"""`chatglm run`: one-shot answers (-p) or an interactive chat with a model (the demo model by default)."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from chatglm.cli.chatout import ThinkingPrinter, context_notes, format_tool_call, print_stats
from chatglm.cli.common import (Context, DraftFixed, DraftMax, DraftModel, FlashAttn, GpuLayers, KVTypeOpt, Lookup,
                               Mtp, RPCServers, TensorSplit, Threads, fail, handle_errors, number, rpc_options,
                               sampling_options, setup_logging, speculative_config)
from chatglm.limits import MAX_LORA_SCALE
from chatglm.runtime.messages import Message
from chatglm.runtime.speculative import DEFAULT_DRAFT
from chatglm.store import resolve

class ReasoningEffort(str, Enum):
    low = "low"
    high = "high"
    max = "max"


ModelArg = Annotated[Optional[Path], typer.Argument(help="A .gguf file or a stored model name (`chatglm list`); the "
                                                        "bundled demo model when omitted.")]


@handle_errors
@sampling_options
def run_cmd(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Option("-p", "--prompt", help="Answer this once and exit.")] = None,
    system: Annotated[Optional[str], typer.Option("-s", "--system", help="System message.")] = None,
    tools: Annotated[Optional[Path], typer.Option("--tools", help="JSON file of tools the model may call "
                                                   "(ChatGLM3 / GLM-4).")] = None,
    ctx: Context = None,
    threads: Threads = None,
    n_gpu_layers: GpuLayers = 0,
    kv_type: KVTypeOpt = "f16",
    flash_attn: FlashAttn = None,
    lora: Annotated[Optional[list[Path]], typer.Option("--lora", help="LoRA adapter GGUF (`chatglm lora`); "
                                                       "repeatable.")] = None,
    lora_scale: Annotated[float, number(("--lora-scale",), "Scale of every --lora adapter.", -MAX_LORA_SCALE,
                                        MAX_LORA_SCALE)] = 1.0,
    image: Annotated[Optional[list[Path]], typer.Option("--image", help="An image for the (first) message; "
                                                        "repeatable. Needs the model's projector.")] = None,
    mmproj: Annotated[Optional[Path], typer.Option("--mmproj", help="The projector GGUF (default: "
                                                   "mmproj-<model>.gguf beside the model).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="With -p: print one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show load time and tokens/s.")] = False,
    think: Annotated[Optional[bool], typer.Option("--think/--no-think", help="Thinking on or off (the chat "
                                                  "template's enable_thinking; default: the template's).")] = None,
    reasoning_effort: Annotated[Optional[ReasoningEffort], typer.Option(
        "--reasoning-effort", help="GLM-5.3-Flash's reasoning effort (default: max).")] = None,
    audio: Annotated[Optional[list[Path]], typer.Option(
        "--audio", metavar="FILE", help="Audio (WAV, MP3, FLAC) for the first message (speech models, e.g. "
        "GLM-ASR; repeatable).")] = None,
    rpc: RPCServers = None,
    tensor_split: TensorSplit = None,
    lookup: Lookup = 0,
    draft: DraftModel = None,
    draft_max: DraftMax = DEFAULT_DRAFT,
    mtp: Mtp = False,
    draft_fixed: DraftFixed = False,
    sampling: Optional[dict] = None,
) -> None:
    """Chat with a GGUF model."""
    import chatglm.runtime.model as api

    setup_logging(verbose)
    utf8_console()
    if as_json and prompt is None:
        raise fail("--json needs -p PROMPT")
    from chatglm.runtime.chatfiles import read_tools

    from chatglm.runtime.media import load_media
    from chatglm.runtime.mtmd import find_projector

    tool_list = read_tools(tools) if tools is not None else None
    media = tuple(load_media(p, "image") for p in image or ())  # checked before the model loads
    media += tuple(load_media(p, "audio") for p in audio or ())
    model = resolve(model) if model is not None else demo_path()
    if media and find_projector(model, mmproj) is None:
        raise fail(f"{media[0].name}: {model.name} takes text only (no projector mmproj-{model.stem}.gguf beside "
                   "it; name one with --mmproj)")
    placement = rpc_options(rpc, tensor_split)
    spec = speculative_config(lookup, draft, draft_max, mtp, draft_fixed)
    if verbose:  # over RPC, the load logs each device's part
        print_estimate(model, ctx, kv_type, flash_attn, mmproj, media, spec)
    with api.load(model, n_ctx=ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, kv_type=kv_type,
                  flash_attn=flash_attn, lora=[(p, lora_scale) for p in lora or ()], mmproj=mmproj,
                  **placement, **spec.options()) as m:
        m.sampling = m.sampling.updated(**sampling or {})
        if sys.stderr.isatty():
            m.prefill_progress = show_prefill
        if verbose:
            typer.echo(f"[loaded {m.info.path.name} in {m.load_seconds:.2f} s]", err=True)
        session = m.session(system, tools=tool_list, enable_thinking=think,
                            reasoning_effort=reasoning_effort.value if reasoning_effort else None)
        if media:
            m.media_of([Message("user", "", media=media)])  # a text-only model refuses them now
        if prompt is not None:
            one_shot(session, prompt, as_json, verbose, media)
        else:
            from chatglm.cli.repl import Repl

            repl = Repl(session, verbose=verbose)
            repl.attached = list(media)
            repl.run()


def show_prefill(done: int, total: int) -> None:
    """A one-line progress display while a long prompt is evaluated (terminal only)."""
    if total >= 1024:
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r[prompt {done}/{total} tokens]{end}")
        sys.stderr.flush()


def demo_path() -> Path:
    from chatglm.demo import demo_gguf

    return demo_gguf()


def print_estimate(path: Path, n_ctx: Optional[int], kv_type: str, flash_attn: Optional[bool],
                   mmproj: Optional[Path] = None, media=(), spec=None) -> None:
    """The memory the model (and its projector, with the images given; the draft model or MTP context of
    ``spec``) will take, before it is loaded (``--verbose``)."""
    from chatglm.gguf_file import read_header
    from chatglm.runtime.memory import default_context, estimate, human
    from chatglm.runtime.mtmd import projector_estimate

    header = read_header(path)
    ctx = n_ctx or default_context(header, kv_type)
    mem = estimate(header, ctx, kv_type, flash_attn=flash_attn is not False)
    proj = projector_estimate(path, mmproj, [(x.width, x.height) for x in media])
    extra = f", projector {human(proj.total)} ({proj.image_tokens} image tokens)" if proj is not None else ""
    total = mem.total + (proj.total if proj is not None else 0)
    if spec is not None and spec.enabled:
        from chatglm.runtime.speculative import memory_estimate

        more = memory_estimate(header, spec, ctx, kv_type, flash_attn is not False)
        total += more.total
        extra += f", speculation {human(more.total)}" + (f" (draft model {human(more.draft.total)})"
                                                          if more.draft is not None else "")
    typer.echo(f"[memory: about {human(total)} at {ctx} tokens: weights {human(mem.weights)}, "
               f"{kv_type} KV cache {human(mem.kv_cache)}, compute {human(mem.buffers)}{extra}]", err=True)


def utf8_console() -> None:
    """Never crash on text the console cannot show; pipes and files get UTF-8 whatever the locale says."""
    for stream in (sys.stdin, sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None:
            continue
        utf8 = (getattr(stream, "encoding", "") or "").lower().replace("_", "-") in ("utf-8", "utf8")
        if not utf8 and not stream.isatty():
            reconfigure(encoding="utf-8", errors="replace")
        else:
            reconfigure(errors="replace")


def one_shot(session, prompt: str, as_json: bool, verbose: bool, media=()) -> None:
    from chatglm.runtime.messages import Message
    from chatglm.runtime.model import drain

    if media:
        prompt = Message("user", prompt, media=tuple(media))
    m = session.model
    dropped: list[int] = []
    session.on_truncate = dropped.append
    if as_json:
        reply = drain(session.stream_chat(prompt))
        s = m.last_stats
        typer.echo(json.dumps({
            "reply": reply.to_dict(), "finish_reason": s.finish_reason,
            "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens},
            "timings": {"load_s": round(m.load_seconds, 4), "prefill_tokens_per_s": round(s.prefill_tps, 2),
                        "decode_tokens_per_s": round(s.decode_tps, 2)},
            **({"speculative": {"drafter": m.drafter.name, "drafted_tokens": s.drafted_tokens,
                                "accepted_tokens": s.accepted_tokens, "acceptance": round(s.acceptance, 4),
                                "draft_lengths": {str(n): k for n, k in sorted(s.draft_lengths.items())}}}
               if m.drafter is not None else {}),
            "notes": context_notes(m, sum(dropped)),
        }, ensure_ascii=False))
        return
    thinking = ThinkingPrinter()
    for delta in session.stream_chat(prompt, on_thinking=thinking):
        thinking.end()
        sys.stdout.write(delta)
        sys.stdout.flush()
    thinking.end()
    for call in session.last_reply.tool_calls:
        sys.stdout.write(format_tool_call(call))
    sys.stdout.write("\n")
    sys.stdout.flush()
    for text in context_notes(m, sum(dropped)):
        typer.echo(f"note: {text}", err=True)
    if verbose:
        print_stats(m)

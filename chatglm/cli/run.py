"""`chatglm run`: one-shot answers (-p) or an interactive chat with a model (the demo model by default)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from chatglm.cli.common import handle_errors, setup_logging
from chatglm.runtime.messages import Message

ModelArg = Annotated[Optional[Path], typer.Argument(help="A .gguf file; the bundled demo model when omitted.")]


@handle_errors
def run_cmd(
    model: ModelArg = None,
    prompt: Annotated[Optional[str], typer.Option("-p", "--prompt", help="Answer this once and exit.")] = None,
    system: Annotated[Optional[str], typer.Option("-s", "--system", help="System message.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temp", "--temperature")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k")] = None,
    repeat_penalty: Annotated[Optional[float], typer.Option("--repeat-penalty")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    max_tokens: Annotated[Optional[int], typer.Option("-n", "--max-tokens")] = None,
    ctx: Annotated[Optional[int], typer.Option("-c", "--ctx", help="Context size in tokens.")] = None,
    threads: Annotated[Optional[int], typer.Option("-t", "--threads")] = None,
    n_gpu_layers: Annotated[int, typer.Option("-ngl", "--n-gpu-layers")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="With -p: print one JSON object.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show load time and tokens/s.")] = False,
) -> None:
    """Chat with a GGUF model."""
    import chatglm.runtime.model as api

    setup_logging(verbose)
    sampling = {k: v for k, v in dict(temperature=temperature, top_p=top_p, top_k=top_k,
                                       repeat_penalty=repeat_penalty, seed=seed, max_tokens=max_tokens).items()
                if v is not None}
    with api.load(model, n_ctx=ctx, n_threads=threads, n_gpu_layers=n_gpu_layers) as m:
        m.sampling = m.sampling.updated(**sampling)
        history = [Message("system", system)] if system else []
        if prompt is not None:
            one_shot(m, history + [Message("user", prompt)], as_json, verbose)
        else:
            from chatglm.cli.repl import repl

            repl(m, history, verbose=verbose)


def one_shot(m, messages: list[Message], as_json: bool, verbose: bool) -> None:
    if as_json:
        reply = m.chat(messages)
        s = m.last_stats
        typer.echo(json.dumps({"reply": reply.to_dict(), "finish_reason": s.finish_reason,
                               "usage": {"prompt_tokens": s.prompt_tokens, "completion_tokens": s.generated_tokens}},
                              ensure_ascii=False))
        return
    for delta in m.stream_chat(messages):
        sys.stdout.write(delta)
        sys.stdout.flush()
    if m.last_reply.tool_calls:
        for call in m.last_reply.tool_calls:
            sys.stdout.write(f"[tool call] {call.name}({json.dumps(call.arguments, ensure_ascii=False)})")
    sys.stdout.write("\n")
    if verbose:
        print_stats(m)


def print_stats(m) -> None:
    s = m.last_stats
    typer.echo(f"[prompt {s.prompt_tokens} tokens ({s.evaluated_tokens} evaluated) {s.prefill_tps:.1f} tok/s, "
               f"reply {s.generated_tokens} tokens {s.decode_tps:.1f} tok/s, {s.finish_reason}]", err=True)

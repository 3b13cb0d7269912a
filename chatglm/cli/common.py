"""Shared CLI plumbing: error mapping, option types, progress display."""

from __future__ import annotations

import enum
import functools
import inspect
import logging
import math
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Optional

import typer
from typer.core import TyperGroup

from chatglm import limits
from chatglm.errors import ChatGLMError
from chatglm.runtime.speculative import MAX_DRAFT

DEBUG_ENV = "CHATGLM_DEBUG"


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def handle_errors(func: Callable) -> Callable:
    """Map the package's errors to one line on stderr and their exit code (CHATGLM_DEBUG=1 keeps tracebacks)."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except ChatGLMError as exc:
            if debug_enabled():
                raise
            raise fail(str(exc), exc.exit_code) from None
        except KeyboardInterrupt:
            if debug_enabled():
                raise
            raise fail("interrupted", 130) from None
        except MemoryError:
            raise fail("out of memory", 1) from None

    return wrapper


try:  # Typer >= 0.2x has its own copy of Click, whose errors derive from TyperException
    from typer import TyperException as _UsageBase
except ImportError:  # pragma: no cover - older Typer on Click
    from click import ClickException as _UsageBase


class OneLineErrors(TyperGroup):
    """The command group: a bad option value or usage is one ``error:`` line and exit 2, like every other error
    (instead of Click's usage box)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _UsageBase as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `chatglm`: the help, as before
                if exc.format_message().strip():
                    typer.echo(exc.format_message(), err=True)
            else:
                typer.echo(f"error: {usage_problem(exc)}", err=True)
            rv = exc.exit_code
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def usage_problem(exc: Exception) -> str:
    """The message on one line, led by the option it is about: ``--threads: must be ...``."""
    param = getattr(exc, "param", None)
    if isinstance(exc, typer.BadParameter) and param is not None and getattr(exc, "message", ""):
        text = f"{param_name(param)}: {exc.message.removeprefix('Value error, ')}"  # pydantic's prefix on a choice
    else:
        text = exc.format_message()
    return " ".join(text.split()).rstrip(".")


def param_name(param: Any) -> str:
    """An option by its (first) long name, ``--threads``; an argument by its metavar, ``QTYPE``."""
    if getattr(param, "param_type_name", "") != "option":
        return str(param.name).upper()
    opts = list(getattr(param, "opts", None) or [param.name])
    return next((o for o in opts if o.startswith("--")), opts[0])


# -- shared option types: each option declared once, with its choices or range -----------------------------------
#
# Choices are str Enums (Typer lists them in --help and refuses others); a callback hands the command the plain
# string. Ranges are checked by a callback that names the range and the value; floats must also be finite.

def str_choices(name: str, values: Iterable[str]) -> type[enum.Enum]:
    """A ``str`` Enum whose members are ``values`` (for an option's choices)."""
    return enum.Enum(name, {v: v for v in values}, type=str)


def _plain(value: Any) -> Any:
    """An Enum member (or a list of them) as the plain string(s) the library takes."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value.value if isinstance(value, enum.Enum) else value


def _in_range(lo: float | None, hi: float | None) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is None:
                continue
            if not math.isfinite(v):
                raise typer.BadParameter(f"must be a finite number, got {v}")
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise typer.BadParameter(f"must be {_range_text(lo, hi)}, got {_num(v)}")
        return value

    return check


def _range_text(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"between {_num(lo)} and {_num(hi)}"
    return f"at least {_num(lo)}" if lo is not None else f"at most {_num(hi)}"


def _num(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


def non_empty(value: Optional[str]) -> Optional[str]:
    """A text option given as "" (an empty --api-key would silently mean no key at all) is refused."""
    if value is not None and not value.strip():
        raise typer.BadParameter("must not be empty")
    return value


def choice(names: tuple[str, ...], choices: type[enum.Enum], help: str, argument: bool = False) -> Any:
    """An option (or argument) taking one of ``choices``, case-insensitive, given to the command as a string."""
    if argument:
        return typer.Argument(help=help, case_sensitive=False, callback=_plain, show_default=False)
    return typer.Option(*names, help=help, case_sensitive=False, callback=_plain)


def number(names: tuple[str, ...], help: str, lo: float | None = None, hi: float | None = None) -> Any:
    """A numeric option in [lo, hi], finite (checked here rather than by Typer's min/max: the message then says
    the range and the value given, and nan is refused too); --help shows the range."""
    return typer.Option(*names, help=f"{help} ({_range_text(lo, hi)})", callback=_in_range(lo, hi))


def _kv_types() -> list[str]:
    from chatglm.runtime.kv_types import KV_TYPES

    return list(KV_TYPES)


def _out_types() -> list[str]:
    from chatglm.convert.qtypes import RECIPES

    return list(RECIPES)


def _lora_types() -> list[str]:
    from chatglm.convert.lora_gguf import OUT_TYPES

    return list(OUT_TYPES)


KVType = str_choices("KVType", _kv_types())
OutType = str_choices("OutType", _out_types())
LoraType = str_choices("LoraType", _lora_types())

KVTypeOpt = Annotated[KVType, choice(("--kv-type",), KVType, "KV cache type.")]
OutTypeOpt = Annotated[OutType, choice(("-t", "--type"), OutType, "Output type or llama.cpp mixed recipe.")]
OutTypeArg = Annotated[OutType, choice((), OutType, "Output type or llama.cpp mixed recipe.", argument=True)]
LoraTypeOpt = Annotated[LoraType, choice(("-t", "--type"), LoraType, "Adapter tensor type.")]
Threads = Annotated[Optional[int], number(("-t", "--threads"), "CPU threads (default: physical cores).",
                                          1, limits.MAX_THREADS)]
QuantThreads = Annotated[Optional[int], number(
    ("--threads",), "Quantization threads (default: every CPU this process may run on).", 1, limits.MAX_THREADS)]
Context = Annotated[Optional[int], number(("-c", "--ctx"), "Context size in tokens.", 1, limits.MAX_CONTEXT)]
GpuLayers = Annotated[int, number(("-ngl", "--n-gpu-layers"), "Layers offloaded to a GPU (-1: all).", -1,
                                  limits.MAX_GPU_LAYERS)]
FlashAttn = Annotated[Optional[bool], typer.Option("--flash-attn/--no-flash-attn",
                                                   help="Flash attention (default: llama.cpp decides).")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v")]
LoraScales = Annotated[Optional[list[float]], number(
    ("--lora-scale",), "Scale of the LoRA update: one for all adapters or one per --lora.", -limits.MAX_LORA_SCALE,
    limits.MAX_LORA_SCALE)]


def _rpc_servers(value: Optional[str]) -> Optional[list[str]]:
    from chatglm.errors import InputError
    from chatglm.runtime.rpc import parse_servers

    if value is None:
        return None
    try:
        return [str(e) for e in parse_servers(value)]
    except InputError as exc:
        raise typer.BadParameter(exc.problem.split(": ", 1)[-1]) from None


def _tensor_split(value: Optional[str]) -> Optional[tuple[float, ...]]:
    from chatglm.errors import InputError
    from chatglm.runtime.rpc import parse_split

    try:
        return parse_split(value) or None
    except InputError as exc:
        raise typer.BadParameter(exc.problem.split(": ", 1)[-1]) from None


RPCServers = Annotated[Optional[str], typer.Option(
    "--rpc", metavar="HOST:PORT,...", callback=_rpc_servers,
    help="Split the model over these `chatglm rpc-server` processes (llama.cpp's RPC backend): every layer on them "
         "unless -ngl N puts only the last N there.")]
TensorSplit = Annotated[Optional[str], typer.Option(
    "--tensor-split", metavar="W0,W1,...", callback=_tensor_split,
    help="With --rpc: the share of the layers of each server's device, in order (default: by their free memory).")]


def rpc_options(rpc: Optional[list[str]], tensor_split: Optional[tuple[float, ...]]) -> dict:
    """The engine arguments of --rpc and --tensor-split (refused without --rpc)."""
    if tensor_split and not rpc:
        raise fail("--tensor-split weighs the devices of --rpc: give --rpc too")
    return {"rpc": tuple(rpc or ()), "tensor_split": tuple(tensor_split or ())}


# speculative decoding (chatglm/runtime/speculative.py): run, serve
Lookup = Annotated[int, number(("--lookup",), "Speculative decoding: draft up to N tokens by prompt lookup (the "
                               "last n-gram's earlier continuation in the prompt and reply; 0: off).", 0,
                               MAX_DRAFT)]
DraftModel = Annotated[Optional[Path], typer.Option(
    "--draft", metavar="MODEL", help="Speculative decoding: a small GGUF with the same vocabulary drafts tokens "
    "(a file or a stored model name).")]
DraftMax = Annotated[int, number(("--draft-max",), "The most tokens --draft drafts at once.", 1, MAX_DRAFT)]
Mtp = Annotated[bool, typer.Option("--mtp", help="Speculative decoding: the model's own MTP (NextN) layer drafts "
                                   "one token a step (GLM-4.5/4.6/4.7 GGUFs that kept it).")]
DraftFixed = Annotated[bool, typer.Option("--draft-fixed", help="Speculative decoding: always draft the most tokens "
                                          "(default: only as many as pay, measured while generating).")]


def speculative_config(lookup: int, draft: Optional[Path], draft_max: int, mtp: bool = False, fixed: bool = False):
    """The runtime's speculative settings from the options (a store name for --draft resolved)."""
    from chatglm.runtime.speculative import SpeculativeConfig
    from chatglm.store import resolve

    return SpeculativeConfig(lookup=lookup, draft=resolve(draft) if draft is not None else None, draft_max=draft_max,
                             mtp=mtp, adaptive=not fixed)


def sampling_options(command: Callable) -> Callable:
    """Give a command one option per :class:`~chatglm.runtime.sampling.SamplingParams` field (flags, help and range
    from the field's metadata), after its own options; the command gets them as ``sampling``, a dict of those given."""
    from chatglm.runtime.sampling import knobs

    own = inspect.signature(command, eval_str=True)
    extra = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                               annotation=Annotated[Optional[k.kind], number(k.flags, k.help, k.lo, k.hi)])
             for name, k in knobs().items()]
    signature = own.replace(parameters=[p for p in own.parameters.values() if p.name != "sampling"] + extra)

    @functools.wraps(command)
    def wrapper(**options: Any) -> Any:
        given = {name: options.pop(name) for name in knobs()}
        return command(**options, sampling={k: v for k, v in given.items() if v is not None})

    wrapper.__signature__ = signature  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()}
    return wrapper


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from chatglm.runtime.llama_native import set_native_verbose

    set_native_verbose(verbose)


class ByteProgress:
    """A progress bar with bytes and ETA on a terminal; silent otherwise."""

    def __init__(self, label: str, enabled: Optional[bool] = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._progress = None
        self._task = None
        self.label = label

    def __enter__(self) -> "ByteProgress":
        if self.enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                       TransferSpeedColumn)

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), TimeRemainingColumn(), transient=True)
            self._progress.__enter__()
            self._task = self._progress.add_task(self.label, total=None)
        return self

    def __call__(self, done: int, total: int, name: str = "") -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total,
                                  description=f"{self.label} {name}"[:60])

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

"""`chatglm serve`: an OpenAI-compatible API and a web chat page over one GGUF model (the demo model by default)."""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from pathlib import Path
from typing import Annotated, Optional

import typer

from chatglm.cli.common import (DraftFixed, DraftMax, DraftModel, FlashAttn, GpuLayers, KVTypeOpt, Lookup, Mtp,
                               RPCServers, TensorSplit, Threads, fail, handle_errors, non_empty, number, rpc_options,
                               setup_logging, speculative_config)
from chatglm.errors import ChatGLMError, InputError
from chatglm.limits import MAX_BODY_MIB, MAX_BODY_MIB_SETTING, MAX_CONTEXT
from chatglm.runtime.speculative import DEFAULT_DRAFT
from chatglm.store import resolve

log = logging.getLogger(__name__)

MAX_PARALLEL = 64  # model instances, each a full copy of the weights
MAX_QUEUE = 100_000
HOST_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[[0-9a-f:.]+\]")  # a DNS name, an IPv4 or [IPv6]

ModelArg = Annotated[Optional[Path], typer.Argument(help="A .gguf file or a stored model name (`chatglm list`); "
                                                        "when omitted, the store (the bundled demo model if the "
                                                        "store is empty).")]


@handle_errors
def serve_cmd(
    model: ModelArg = None,
    host: Annotated[str, typer.Option("--host", callback=non_empty,  # "" would listen on every interface
                                      help="Address to listen on (loopback by default).")] = "127.0.0.1",
    port: Annotated[int, number(("--port",), "Port; 0 picks a free one.", 0, 65535)] = 8000,
    api_key: Annotated[Optional[str], typer.Option("--api-key", envvar="CHATGLM_API_KEY", callback=non_empty,
                                                   help="Require 'Authorization: Bearer KEY' on /v1.")] = None,
    ctx: Annotated[Optional[int], number(("-c", "--n-ctx", "--ctx"), "Context size in tokens.", 1,
                                         MAX_CONTEXT)] = None,
    parallel: Annotated[int, number(("--parallel",), "Model instances (requests at once).", 1, MAX_PARALLEL)] = 1,
    queue_size: Annotated[int, number(("--queue-size",), "Requests allowed to wait.", 0, MAX_QUEUE)] = 64,
    threads: Threads = None,
    n_gpu_layers: GpuLayers = 0,
    kv_type: KVTypeOpt = "f16",
    flash_attn: FlashAttn = None,
    cors_origin: Annotated[Optional[str], typer.Option("--cors-origin", callback=non_empty,
                                                       help="Allow this one web origin.")] = None,
    model_id: Annotated[Optional[str], typer.Option("--model-id", callback=non_empty,
                                                    help="Name in /v1/models (file stem).")] = None,
    max_models: Annotated[int, number(("--max-models",), "Serving the store: models resident at once.", 1,
                                      MAX_PARALLEL)] = 1,
    max_body: Annotated[int, number(("--max-body",), "Largest request body, in MiB (images travel inside it).", 1,
                                    MAX_BODY_MIB_SETTING)] = MAX_BODY_MIB,
    lookup: Lookup = 0,
    draft: DraftModel = None,
    draft_max: DraftMax = DEFAULT_DRAFT,
    mtp: Mtp = False,
    draft_fixed: DraftFixed = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log requests and model loading.")] = False,
    allow_host: Annotated[Optional[list[str]], typer.Option(
        "--allow-host", help="Also answer requests for this Host name (repeatable; loopback without a key "
                             "answers only localhost, 127.0.0.1 and [::1]).")] = None,
    rpc: RPCServers = None,
    tensor_split: TensorSplit = None,
) -> None:
    """Serve a GGUF model over the OpenAI and Ollama APIs, with a chat page at /; with no model, the store (each
    model loaded on the first request naming it, unloaded after its keep_alive)."""
    import uvicorn

    from chatglm.server import ServerConfig, create_app

    setup_logging(verbose)
    from chatglm.store import Store

    store = Store()
    serving_store = model is None and bool(store.entries())  # an empty store: the demo model, as before
    placement = rpc_options(rpc, tensor_split)
    if rpc and (parallel > 1 or serving_store):  # a second connection would wait behind the first for ever
        raise fail("--rpc serves one model instance (an rpc-server serves one client at a time): give a model and "
                   "no --parallel")
    path = None if serving_store else resolve_model(model)
    hosts = allowed_hosts(host, api_key, allow_host or [])
    if threads is None:
        from chatglm.runtime.llama_native import physical_cores

        threads = max(1, physical_cores() // parallel)
    options = {**placement, **speculative_config(lookup, draft, draft_max, mtp, draft_fixed).options()}
    sock = bind(host, port)  # bound, not listening: a taken port fails before the load, and nothing answers yet
    try:
        models = [] if serving_store else load_instances(path, parallel, ctx, threads, n_gpu_layers, kv_type,
                                                         flash_attn, options)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    named = model is not None and path != model  # a store name: the name is the model's id
    store_options = {}
    if serving_store:
        def open_model(name: str):
            entry = Store(store.root).find(name)
            return entry.ref, load_instances(entry.gguf, 1, ctx, threads, n_gpu_layers, kv_type, flash_attn,
                                             options)[0]

        store_options = {"open_model": open_model, "max_models": max_models,
                         "list_store": lambda: [(e.ref, e.gguf) for e in Store(store.root).entries()]}
    config = ServerConfig(model_id=model_id or ("store" if serving_store else str(model) if named else path.stem),
                          api_key=api_key or None, cors_origin=cors_origin, max_queue=queue_size,
                          max_body_bytes=max_body << 20, allowed_hosts=hosts, pull=store_pull, **store_options)
    server = uvicorn.Server(uvicorn.Config(create_app(models, config, parallel), log_level="info" if verbose
                                           else "warning", access_log=verbose, timeout_graceful_shutdown=5))
    warn_if_exposed(host, api_key)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    what = f"the store ({store.root}; models load on first use)" if serving_store else path.name
    typer.echo(f"chatglm: serving {what} at http://{shown}:{bound[1]}/ (OpenAI API under /v1, Ollama's under /api)",
               err=True)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down on: stopping is the normal way out
        pass
    typer.echo("chatglm: server stopped", err=True)


def allowed_hosts(host: str, api_key: Optional[str], extra: list[str]) -> Optional[tuple[str, ...]]:
    """The Host names a server bound to ``host`` answers: on loopback without a key, only loopback names and
    ``extra`` (against DNS rebinding); None (any Host) when bound elsewhere or guarded by an API key."""
    from chatglm.server.guard import LOOPBACK_HOSTS, host_name

    names = []
    for given in extra:
        name = host_name(given)
        if not name or not HOST_NAME.fullmatch(name):
            raise InputError(f"--allow-host {given!r}: not a host name (give a name such as myhost.local)")
        names.append(name)
    if api_key or not is_loopback(host):
        if names:
            log.info("--allow-host is not needed: the Host header is checked only on loopback without --api-key")
        return None
    return LOOPBACK_HOSTS + tuple(names)


def store_pull(name: str):
    """/api/pull: into the store (the model served does not change)."""
    from chatglm.pull import pull

    return pull(name)


def resolve_model(model: Optional[Path]) -> Path:
    """The GGUF to serve, its header checked now so a wrong path fails before the server starts."""
    from chatglm.gguf_file import read_header

    if model is None:
        from chatglm.demo import demo_gguf

        model = demo_gguf()
    model = resolve(model)
    if not model.is_file():
        raise InputError("not a regular file" if model.exists() else "no such file", model)
    read_header(model)
    return model


def load_instances(path: Path, parallel: int, n_ctx: Optional[int], threads: int, n_gpu_layers: int,
                   kv_type: str = "f16", flash_attn: Optional[bool] = None, options: Optional[dict] = None) -> list:
    from chatglm.runtime.model import load

    models = []
    try:
        for i in range(parallel):
            log.info("loading instance %d of %d from %s", i + 1, parallel, path)
            models.append(load(path, n_ctx=n_ctx, n_threads=threads, n_gpu_layers=n_gpu_layers, kv_type=kv_type,
                               flash_attn=flash_attn, **(options or {})))
    except Exception as exc:
        close_all(models)
        if isinstance(exc, ChatGLMError):
            raise
        raise InputError(f"cannot load the model: {type(exc).__name__}: {exc}", path) from exc
    except BaseException:
        close_all(models)
        raise
    return models


def close_all(models: list) -> None:
    for m in models:
        m.close()


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, not yet listening (a clear error when the address is taken or unknown)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise InputError(f"cannot resolve the host {host!r}: {exc.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"


def warn_if_exposed(host: str, api_key: Optional[str]) -> None:
    if not is_loopback(host) and not api_key:
        typer.echo(f"warning: listening on {host} without --api-key: anyone who can reach it can use the model",
                   err=True)

"""`chatglm rpc-server`: serve this machine's devices to `chatglm run|serve|bench|perplexity --rpc` elsewhere.

ggml's own RPC server (``ggml_backend_rpc_start_server``), over the libggml llama-cpp-python ships: the same
protocol and the same kernels as llama.cpp's ``rpc-server``. It serves one client at a time.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Annotated, Optional

import typer

from chatglm.cli.common import fail, handle_errors, number, setup_logging
from chatglm.limits import MAX_THREADS

WARNING = ("warning: the RPC protocol has no authentication and no encryption: anyone who can reach {host}:{port} "
           "can use this machine's devices and memory and read what is computed on them; listen only on a network "
           "you trust")


@handle_errors
def rpc_server_cmd(
    host: Annotated[str, typer.Option("--host", help="IPv4 address to listen on (loopback by default).")
                    ] = "127.0.0.1",
    port: Annotated[int, number(("--port",), "Port.", 1, 65535)] = 50052,
    threads: Annotated[Optional[int], number(("-t", "--threads"), "CPU threads (default: physical cores).", 1,
                                             MAX_THREADS)] = None,
    cache: Annotated[Optional[Path], typer.Option(
        "--cache", help="Keep the tensors clients send in this folder, so a reconnecting client sends only their "
                        "hashes (ggml-rpc's local cache).")] = None,
    allow_remote: Annotated[bool, typer.Option(
        "--allow-remote", help="Listen on an address other than loopback (the protocol has no authentication).")
                            ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Serve this machine's GPUs (or its CPU) to RPC clients: `chatglm run MODEL --rpc HOST:PORT` elsewhere."""
    from chatglm.runtime import rpc
    from chatglm.runtime.llama_native import physical_cores

    setup_logging(verbose)
    rpc.check_listen_address(host)
    loopback = host.startswith("127.")
    if not loopback and not allow_remote:
        raise fail(f"--host {host} is not loopback: the RPC protocol has no authentication or encryption; give "
                   "--allow-remote to listen there anyway")
    rpc.require()
    check_port_free(host, port)
    if cache is not None:
        try:
            cache.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise fail(f"{cache}: cannot use it as the cache folder: {exc.strerror}")
    if not loopback:
        typer.echo(WARNING.format(host=host, port=port), err=True)
    n_threads = threads or physical_cores()
    server = threading.Thread(target=rpc.start_server, args=(host, port, n_threads, cache), daemon=True,
                              name="rpc-server")
    server.start()
    typer.echo(f"chatglm: RPC server on {host}:{port} ({n_threads} threads); Ctrl-C stops it", err=True)
    try:
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        typer.echo("chatglm: RPC server stopped", err=True)
        raise typer.Exit(130) from None
    raise fail(f"the RPC server on {host}:{port} stopped (its messages above say why)", 1)


def check_port_free(host: str, port: int) -> None:
    """A clear line when the address is taken or not ours (ggml's server would only say it failed)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ggml's server binds
        sock.bind((host, port))
    except OSError as exc:
        raise fail(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    finally:
        sock.close()


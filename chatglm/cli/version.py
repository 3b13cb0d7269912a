"""`chatglm --version`: this package's version, llama-cpp-python's, and the backends its llama.cpp was built with."""

from __future__ import annotations

import typer


def backends(system_info: str) -> dict[str, list[str]]:
    """llama.cpp's system info (``"CPU : SSE3 = 1 | AVX2 = 1 | CUDA : ARCHS = 890 | "``) as backend -> features
    (flags that are on by name, other values as ``NAME=value``)."""
    found: dict[str, list[str]] = {}
    current = None
    for part in (p.strip() for p in system_info.split("|")):
        if not part:
            continue
        if " : " in part:
            current, _, part = (s.strip() for s in part.partition(" : "))
            found.setdefault(current, [])
        key, eq, value = (s.strip() for s in part.partition("="))
        if current is None or not key:
            continue
        if not eq or value == "1":
            found[current].append(key)
        elif value != "0":
            found[current].append(f"{key}={value}")
    return found


def version_text() -> str:
    import llama_cpp

    import chatglm

    info = llama_cpp.llama_print_system_info()
    found = backends(info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info))
    lines = [f"chatglm {chatglm.__version__}", f"llama-cpp-python {llama_cpp.__version__}"]
    lines += [f"  {name:<8} {' '.join(features) or '-'}" for name, features in found.items()]
    lines.append(f"  GPU offload {'yes' if local_gpu() else 'no'}, RPC {rpc_text()}")
    return "\n".join(lines)


def local_gpu() -> bool:
    """A GPU backend is compiled in (llama_supports_gpu_offload also says yes for RPC alone, whose devices count as
    GPUs)."""
    from chatglm.runtime import rpc

    r = rpc.registry()
    return any(r.dev_type(r.dev_get(i)) in (rpc.DEV_GPU, rpc.DEV_IGPU) for i in range(r.dev_count()))


def rpc_text() -> str:
    """Whether llama.cpp's RPC backend is compiled in (its library shipped and its backend registered)."""
    from chatglm.runtime import rpc

    problem = rpc.missing()
    if problem:
        return f"no ({problem.split('; ', 1)[-1]})"
    lib = rpc.library_file()
    return f"yes ({lib.name if lib is not None else 'built in'}, protocol {rpc.PROTO_MAJOR}.{rpc.PROTO_MINOR})"


def version_callback(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()

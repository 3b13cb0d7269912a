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
    lines.append(f"  GPU offload {'yes' if llama_cpp.llama_supports_gpu_offload() else 'no'}, "
                 f"RPC {'yes' if llama_cpp.llama_supports_rpc() else 'no'}")
    return "\n".join(lines)


def version_callback(value: bool) -> None:
    if value:
        typer.echo(version_text())
        raise typer.Exit()

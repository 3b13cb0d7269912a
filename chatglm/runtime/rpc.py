"""llama.cpp's RPC backend (ggml-rpc): models split over ``rpc-server`` processes on other machines.

Three parts, each checked before anything native runs:

- endpoints (``host:port,host:port``) parsed and validated, and each server *probed* from Python: a TCP connection
  with a timeout, ggml-rpc's HELLO handshake (protocol version), its device count and memory. ggml-rpc's own client
  aborts the process on a refused connection, a malformed answer or a lost connection, and waits forever on a peer
  that never answers; the probe turns each of those at start into one line (:class:`RPCError`);
- the native calls (:func:`add_servers`, :func:`start_server`), bound through ctypes on the registry of the libggml
  that llama-cpp-python ships, the way llama.cpp's ``--rpc`` and ``rpc-server`` reach them (the RPC backend's
  ``get_proc_address``);
- the placement of the layers on the devices (:func:`device_plan`), computed as llama.cpp's loader computes it, for
  the memory estimate.

A connection that breaks later (a server dies mid-answer) still aborts the process that holds it: that is why an
RPC-backed engine always runs in a worker process (``runtime/rpc_worker.py``).
"""

from __future__ import annotations

import ctypes
import functools
import ipaddress
import math
import re
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from chatglm.errors import BackendUnavailableError, InputError
from chatglm.gguf_file import GGUFHeader

# ggml-rpc's wire protocol (ggml/src/ggml-rpc/ggml-rpc.cpp, protocol 7.x): a command byte, a u64 size, the request;
# the answer is a u64 size and the response.
PROTO_MAJOR, PROTO_MINOR = 7, 0
CMD_GET_DEVICE_MEMORY, CMD_HELLO, CMD_DEVICE_COUNT = 11, 14, 15
CONN_CAPS = 24  # transport capabilities in HELLO (RDMA negotiation; all zero: plain TCP)
MAX_SERVERS = 16  # GGML_RPC_MAX_SERVERS
MAX_DEVICES_PER_SERVER = 16
DEFAULT_PORT = 50052
PROBE_TIMEOUT = 10.0  # seconds for the connection and each answer of the probe
HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")  # an IPv4 address or a DNS name

REBUILD = ('reinstall it with RPC: CMAKE_ARGS="-DGGML_RPC=on" pip install --force-reinstall --no-cache-dir '
           '--no-binary llama-cpp-python llama-cpp-python==0.3.36')


class RPCError(BackendUnavailableError):
    """An RPC server cannot be used (down, not an rpc-server, another protocol, busy), or RPC is not compiled in."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerInfo:
    """What a probe learnt: the server's protocol version and each device's (free, total) memory in bytes."""

    endpoint: Endpoint
    version: tuple[int, int, int]
    memory: tuple[tuple[int, int], ...]


# -- endpoints ------------------------------------------------------------------------------------------------------
def parse_endpoint(text: str) -> Endpoint:
    """``host:port``: an IPv4 address or a host name (ggml-rpc's transport is IPv4 only) and a port 1..65535."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise InputError(f"--rpc {text!r}: give host:port, e.g. 192.168.1.2:{DEFAULT_PORT}")
    if host.startswith("[") or ":" in host:
        raise InputError(f"--rpc {text!r}: ggml-rpc connects over IPv4 only; give an IPv4 address or a host name")
    if not HOST.fullmatch(host) or len(host) > 253:
        raise InputError(f"--rpc {text!r}: {host!r} is not a host name or IPv4 address")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise InputError(f"--rpc {text!r}: the port must be a number between 1 and 65535")
    return Endpoint(host, int(port))


def parse_servers(text: str | Sequence[str]) -> tuple[Endpoint, ...]:
    """Comma-separated (or a list of) ``host:port``: at most 16, none twice."""
    parts = [p for item in ([text] if isinstance(text, str) else text) for p in item.split(",")]
    endpoints = tuple(parse_endpoint(p) for p in parts if p.strip())
    if not endpoints:
        raise InputError("--rpc: give at least one host:port")
    if len(endpoints) > MAX_SERVERS:
        raise InputError(f"--rpc: at most {MAX_SERVERS} servers, got {len(endpoints)}")
    seen = set()
    for e in endpoints:
        if e in seen:
            raise InputError(f"--rpc: {e} is given twice")
        seen.add(e)
    return endpoints


def parse_split(text: Optional[str | Sequence[float]], n_devices: Optional[int] = None) -> tuple[float, ...]:
    """``--tensor-split 3,1``: one finite weight >= 0 per device (fewer: the rest get 0), not all zero."""
    if text is None:
        return ()
    raw = text.replace("/", ",").split(",") if isinstance(text, str) else list(text)
    try:
        weights = tuple(float(w) for w in raw)
    except (TypeError, ValueError):
        raise InputError(f"--tensor-split {text!r}: give weights such as 3,1") from None
    if not weights or any(not math.isfinite(w) or w < 0 for w in weights) or not any(weights):
        raise InputError(f"--tensor-split {text!r}: weights must be finite, >= 0 and not all 0")
    if n_devices is not None and len(weights) > n_devices:
        raise InputError(f"--tensor-split gives {len(weights)} weights for {n_devices} device(s)")
    return weights


# -- probing --------------------------------------------------------------------------------------------------------
def probe(endpoint: Endpoint, timeout: float = PROBE_TIMEOUT) -> ServerInfo:
    """Handshake with ``endpoint`` as ggml-rpc's client would, but with timeouts and one-line errors."""
    try:
        infos = socket.getaddrinfo(endpoint.host, endpoint.port, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise RPCError(f"RPC server {endpoint}: cannot resolve {endpoint.host!r}: {exc.strerror}") from None
    try:
        with socket.create_connection(infos[0][4], timeout=timeout) as sock:
            return _handshake(sock, endpoint)
    except ConnectionRefusedError:
        raise RPCError(f"RPC server {endpoint}: connection refused (is `chatglm rpc-server` running there?)") from None
    except socket.timeout:
        raise RPCError(f"RPC server {endpoint}: no answer within {timeout:g} s (busy with another client, or not an "
                       "RPC server)") from None
    except OSError as exc:
        raise RPCError(f"RPC server {endpoint}: {exc.strerror or exc}") from None


def _handshake(sock: socket.socket, endpoint: Endpoint) -> ServerInfo:
    garbage = RPCError(f"RPC server {endpoint}: not a ggml RPC server (its answer to the handshake is malformed)")
    reply = _command(sock, CMD_HELLO, bytes(CONN_CAPS), 4 + CONN_CAPS, garbage)
    version = tuple(reply[:3])
    if version[0] != PROTO_MAJOR or version[1] > PROTO_MINOR:
        raise RPCError(f"RPC server {endpoint} speaks RPC protocol {'.'.join(map(str, version))}, this llama.cpp "
                       f"{PROTO_MAJOR}.{PROTO_MINOR}: run the same llama.cpp (llama-cpp-python 0.3.36) on both sides")
    (n_devices,) = struct.unpack("<I", _command(sock, CMD_DEVICE_COUNT, b"", 4, garbage))
    if not 1 <= n_devices <= MAX_DEVICES_PER_SERVER:
        raise RPCError(f"RPC server {endpoint} reports {n_devices} devices")
    memory = tuple(struct.unpack("<QQ", _command(sock, CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16, garbage))
                   for i in range(n_devices))
    return ServerInfo(endpoint, version, memory)  # type: ignore[arg-type]


def _command(sock: socket.socket, cmd: int, request: bytes, size: int, garbage: RPCError) -> bytes:
    sock.sendall(struct.pack("<BQ", cmd, len(request)) + request)
    (got,) = struct.unpack("<Q", _recv(sock, 8, garbage))
    if got != size:
        raise garbage
    return _recv(sock, size, garbage)


def _recv(sock: socket.socket, n: int, garbage: RPCError) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise garbage
        data += chunk
    return data


def probe_all(endpoints: Sequence[Endpoint], timeout: float = PROBE_TIMEOUT) -> list[ServerInfo]:
    return [probe(e, timeout) for e in endpoints]


# -- native binding -------------------------------------------------------------------------------------------------
P, SZ = ctypes.c_void_p, ctypes.c_size_t
_REGISTRY = {  # libggml's backend registry (ggml-backend.h): name -> (restype, argtypes)
    "ggml_backend_reg_count": (SZ, []), "ggml_backend_reg_get": (P, [SZ]),
    "ggml_backend_reg_name": (ctypes.c_char_p, [P]), "ggml_backend_dev_description": (ctypes.c_char_p, [P]),
    "ggml_backend_reg_by_name": (P, [ctypes.c_char_p]),
    "ggml_backend_reg_get_proc_address": (P, [P, ctypes.c_char_p]),
    "ggml_backend_reg_dev_count": (SZ, [P]), "ggml_backend_reg_dev_get": (P, [P, SZ]),
    "ggml_backend_dev_count": (SZ, []), "ggml_backend_dev_get": (P, [SZ]),
    "ggml_backend_dev_name": (ctypes.c_char_p, [P]), "ggml_backend_dev_type": (ctypes.c_int, [P]),
    "ggml_backend_dev_by_type": (P, [ctypes.c_int]),
}
DEV_CPU, DEV_GPU, DEV_IGPU = 0, 1, 2  # enum ggml_backend_dev_type
ADD_SERVER = ctypes.CFUNCTYPE(P, ctypes.c_char_p)
START_SERVER = ctypes.CFUNCTYPE(None, ctypes.c_char_p, ctypes.c_char_p, SZ, SZ, ctypes.POINTER(P))


class _Registry:
    def __init__(self) -> None:
        from chatglm.ggml import lib

        lib.bind(self, lib.ggml(), _REGISTRY, "ggml_backend_")


@functools.cache
def registry() -> _Registry:
    from chatglm.runtime.llama_native import lib as llama

    llama()  # backend initialised, llama.cpp's log routed
    return _Registry()


def library_file() -> Optional[Path]:
    """llama-cpp-python's libggml-rpc, when it ships one."""
    import llama_cpp

    found = sorted((Path(llama_cpp.__file__).parent / "lib").glob("*ggml-rpc*"))
    return found[0] if found else None


def missing() -> Optional[str]:
    """Why RPC cannot be used with this llama-cpp-python (None: it can)."""
    import llama_cpp

    if not llama_cpp.llama_supports_rpc() or not registry().reg_by_name(b"RPC"):
        return f"this llama-cpp-python was built without GGML_RPC; {REBUILD}"
    return None


def require() -> None:
    problem = missing()
    if problem:
        raise RPCError(problem)


def _proc(name: bytes, kind):
    require()
    reg = registry().reg_by_name(b"RPC")
    address = registry().reg_get_proc_address(reg, name)
    if not address:
        raise RPCError(f"the RPC backend of this llama-cpp-python has no {name.decode()}; {REBUILD}")
    return kind(address)


def add_servers(servers: Sequence[Endpoint]) -> list[int]:
    """The devices of each (probed) server, in order (this machine's own GPUs are not added: run an rpc-server on
    it to use them). Connects to every server: call it only in the worker process (a lost connection aborts it)."""
    add = _proc(b"ggml_backend_rpc_add_server", ADD_SERVER)
    r = registry()
    devices: list[int] = []
    for endpoint in servers:
        reg = add(str(endpoint).encode())
        if not reg:
            raise RPCError(f"RPC server {endpoint} offers no device")
        devices += [r.reg_dev_get(reg, i) for i in range(r.reg_dev_count(reg))]
    return devices


def start_server(host: str, port: int, n_threads: int, cache_dir: Optional[Path]) -> None:
    """Serve this machine's devices (its GPUs, else its CPU) to RPC clients; returns only when the server stops."""
    start = _proc(b"ggml_backend_rpc_start_server", START_SERVER)
    r = registry()
    local = [r.dev_get(i) for i in range(r.dev_count())]
    devices = [d for d in local if r.dev_type(d) == DEV_GPU] or [r.dev_by_type(DEV_CPU)]
    array = (P * len(devices))(*devices)
    start(f"{host}:{port}".encode(), None if cache_dir is None else str(cache_dir).encode(), n_threads,
          len(devices), array)


def check_listen_address(host: str) -> None:
    """ggml-rpc's server binds a numeric IPv4 address (``inet_addr``); refuse anything else before it does."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise InputError(f"--host {host!r}: the RPC server binds an IPv4 address (e.g. 127.0.0.1 or 0.0.0.0)") from None


# -- placement ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceShare:
    name: str  # "127.0.0.1:50052" (device i of a server with several: "#i" appended), or "this machine"
    layers: tuple[int, ...]  # layer indices; n_layer stands for the output layer
    weights: int
    kv_cache: int


def device_plan(header: GGUFHeader, names: Sequence[str], free: Sequence[int], split: Sequence[float],
                n_gpu_layers: int, kv_bytes: int) -> list[DeviceShare]:
    """Which layers (and so which weights and KV cache) each device gets, as llama.cpp's ``load_tensors`` assigns
    them: the input embedding stays here, the last ``n_gpu_layers`` of the layers and the output layer go to the
    devices in contiguous runs by ``split`` (by free memory when no split is given). The last share is this machine's."""
    n_layer = header.arch_get("block_count", 0)
    n_layer = n_layer if type(n_layer) is int and n_layer > 0 else 0
    weights = [0] * (n_layer + 2)  # per layer, the output layer at n_layer, the input layer last
    for t in header.tensors.values():
        m = re.match(r"blk\.(\d+)\.", t.name)
        index = int(m.group(1)) if m and int(m.group(1)) < n_layer else (n_layer + 1 if "token_embd" in t.name
                                                                          else n_layer)
        weights[index] += t.nbytes
    kv = kv_bytes // n_layer if n_layer else 0
    weights_of = [0] * (len(names) + 1)
    layers_of: list[list[int]] = [[] for _ in range(len(names) + 1)]
    ngl = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    first, active = max(n_layer + 1 - ngl, 0), min(ngl, n_layer + 1) if names else 0
    weights_in = list(split) + [0.0] * (len(names) - len(split)) if any(split) else [float(f) for f in free]
    total = sum(weights_in) or 1.0
    bounds = [sum(weights_in[:i + 1]) / total for i in range(len(names))]
    for il in range(n_layer + 1):
        if il < first or il - first >= active:
            device = len(names)
        else:
            at = (il - first) / active
            device = min(next((i for i, b in enumerate(bounds) if at < b), len(names) - 1), len(names) - 1)
        layers_of[device].append(il)
        weights_of[device] += weights[il]
    weights_of[-1] += weights[n_layer + 1]
    return [DeviceShare(name, tuple(layers_of[i]), weights_of[i],
                        kv * sum(1 for il in layers_of[i] if il < n_layer))
            for i, name in enumerate([*names, "this machine"])]


def device_names(servers: Sequence[ServerInfo]) -> tuple[list[str], list[int]]:
    """A name and the free memory of every device the servers offer, in the order add_servers gives them."""
    names, free = [], []
    for info in servers:
        for i, (avail, _total) in enumerate(info.memory):
            names.append(str(info.endpoint) + (f"#{i}" if len(info.memory) > 1 else ""))
            free.append(avail)
    return names, free


def default_context(header: GGUFHeader) -> int:
    """The context of a split model when none is given: its training context, at most 4096 (the weights are on the
    servers, so this machine's memory does not bound it)."""
    n_train = header.arch_get("context_length", 0)
    return min(n_train if type(n_train) is int and n_train > 0 else 4096, 4096)


def plan_lines(header: GGUFHeader, servers: Sequence[ServerInfo], split: Sequence[float], n_gpu_layers: int,
               n_ctx: Optional[int], kv_type: str) -> list[str]:
    """``127.0.0.1:50052: layers 0-13, weights 1.2 GiB, f16 KV cache 96.0 MiB`` for each device, then this machine."""
    from chatglm.runtime.memory import human, kv_per_token

    names, free = device_names(servers)
    kv = int(kv_per_token(header, kv_type) * (n_ctx or default_context(header)))
    n_layer = header.arch_get("block_count", 0)
    plan = device_plan(header, names, free, parse_split(split or None, len(names)), n_gpu_layers or -1, kv)
    return [f"{s.name}: layers {_ranges(s.layers, n_layer) or 'none'}, weights {human(s.weights)}, {kv_type} KV cache "
            f"{human(s.kv_cache)}" for s in plan]


def _ranges(layers: tuple[int, ...], n_layer: int) -> str:
    """``0-13, output`` for layer indices (n_layer stands for the output layer)."""
    out, run = [], []
    for il in [x for x in layers if x < n_layer] + [None]:
        if run and (il is None or il != run[-1] + 1):
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        if il is not None:
            run.append(il)
    if n_layer in layers:
        out.append("output")
    return ", ".join(out)

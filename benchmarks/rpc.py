#!/usr/bin/env python
"""A model split over 1, 2 and 3 loopback `chatglm rpc-server` processes against the same model in one process:
prefill and decode tokens/s (``chatglm bench --json --rpc ...`` in a child), and the bytes the client and the
servers exchange per token (counted by a relay in front of each server, in a second, untimed run).

The model is the ~1.3B ChatGLM3 shape of benchmarks/bench_models.py (synthetic weights). Loopback has no wire
latency, so the t/s columns show the protocol's own cost; over a real network add, per decoded token, one round trip
per server plus bytes/token divided by the link's bandwidth.

    python benchmarks/rpc.py                    # pp64 tg16, q4_0, servers with one thread each
    python benchmarks/rpc.py -p 128 -n 32 --type q8_0 --server-threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import CACHE, CHATGLM3_1B, build_gguf, machine, size  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int) -> tuple[subprocess.Popen, int]:
    from chatglm.runtime import rpc

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", "from chatglm.cli.app import main; main()", "rpc-server",
                             "--port", str(port), "-t", str(threads)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 60
    while True:
        try:
            rpc.probe(rpc.Endpoint("127.0.0.1", port), timeout=2)
            return proc, port
        except rpc.RPCError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"rpc-server on port {port} did not start") from None
            time.sleep(0.2)


class CountingRelay:
    """127.0.0.1:port -> the server at ``target``, counting the bytes each way."""

    def __init__(self, target: int):
        self.target, self.sent, self.received = target, 0, 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, "sent"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "received"), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counter: str) -> None:
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                setattr(self, counter, getattr(self, counter) + len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    @property
    def total(self) -> int:
        return self.sent + self.received


def bench(path: Path, endpoints: list[str], args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-c", "from chatglm.cli.app import main; main()", "bench", str(path), "-p",
           str(args.n_prompt), "-n", str(args.n_gen), "-r", str(args.repetitions), "-t", str(args.threads), "--json"]
    if endpoints:
        cmd += ["--rpc", ",".join(endpoints)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return {r["test"]: r["median_tps"] for r in json.loads(proc.stdout)["results"]}


def traffic(path: Path, ports: list[int], args: argparse.Namespace) -> dict:
    """Bytes through the relays while loading, per prefilled token and per decoded token."""
    from chatglm.runtime.loader import open_engine

    relays = [CountingRelay(p) for p in ports]
    total = lambda: sum(r.total for r in relays)  # noqa: E731
    rng = np.random.default_rng(0)
    with open_engine(path, n_ctx=args.n_prompt + args.n_gen + 8, n_threads=args.threads,
                     rpc=[f"127.0.0.1:{r.port}" for r in relays]) as engine:
        loaded = total()
        n_vocab = engine.info.n_vocab
        engine.prefill(rng.integers(100, n_vocab - 100, args.n_prompt).tolist())
        engine.logits()
        prefilled = total()
        for t in rng.integers(100, n_vocab - 100, args.n_gen).tolist():
            engine.step(int(t))
            engine.logits()
        decoded = total()
    return {"load": loaded, "pp": (prefilled - loaded) / args.n_prompt, "tg": (decoded - prefilled) / args.n_gen}


def row(n: int, speeds: dict, bytes_: Optional[dict], args: argparse.Namespace) -> list[str]:
    if "error" in speeds:
        return [str(n), "-", "-", "-", "-", "-", f"error: {speeds['error']}"]
    pp, tg = speeds.get(f"pp{args.n_prompt}", 0.0), speeds.get(f"tg{args.n_gen}", 0.0)
    if bytes_ is None:
        return [str(n), f"{pp:.2f}", f"{tg:.2f}", "-", "-", "-", ""]
    return [str(n), f"{pp:.2f}", f"{tg:.2f}", size(bytes_["load"]), f"{bytes_['pp'] / 1024:.1f} KiB",
            f"{bytes_['tg'] / 1024:.1f} KiB", ""]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", "--n-prompt", type=int, default=64)
    ap.add_argument("-n", "--n-gen", type=int, default=16)
    ap.add_argument("-r", "--repetitions", type=int, default=1)
    ap.add_argument("-t", "--threads", type=int, default=1, help="client threads")
    ap.add_argument("--server-threads", type=int, default=1)
    ap.add_argument("--servers", default="1,2,3", help="server counts to run")
    ap.add_argument("--type", default="q4_0")
    args = ap.parse_args(argv)
    path = build_gguf(CHATGLM3_1B, args.type, CACHE / "models")
    print(f"{CHATGLM3_1B.name} {args.type} ({size(path.stat().st_size)}), pp{args.n_prompt} tg{args.n_gen}; "
          f"{machine()}", flush=True)
    rows = [row(0, bench(path, [], args), None, args)]
    for n in (int(x) for x in args.servers.split(",")):
        procs = [start_server(args.server_threads) for _ in range(n)]
        try:
            speeds = bench(path, [f"127.0.0.1:{port}" for _, port in procs], args)
            rows.append(row(n, speeds, traffic(path, [port for _, port in procs], args), args))
        finally:
            for proc, _ in procs:
                os.kill(proc.pid, signal.SIGTERM)
                proc.wait(10)
    head = ["servers", f"pp{args.n_prompt} t/s", f"tg{args.n_gen} t/s", "load traffic", "bytes/token pp",
            "bytes/token tg", ""]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    for r in [head, ["-" * w for w in widths]] + rows:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

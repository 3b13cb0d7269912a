"""Load test for ``chatglm serve``: N concurrent streaming clients x M requests each, on loopback only.

Starts ``chatglm serve MODEL`` on a free 127.0.0.1 port (or targets a running server with ``--url``, which must be a
loopback address), runs the clients, and prints requests/s, time to first token (p50/p95), request latency, tokens/s,
errors and whether the server survived. Bounded in count (clients x requests) and time (``--time-limit``: no request
starts after it); the server it started is stopped at the end.

    python benchmarks/server_load.py --model tiny.gguf --clients 8 --requests 200 --max-tokens 16

Exit status 0 only with no errors and a server still healthy at the end. Needs httpx.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import urlparse

import httpx

RUN_SERVE = "import typer; from chatglm.cli.serve import serve_cmd; typer.run(serve_cmd)"
TOPICS = ["the weather", "a poem", "今天的新闻", "prime numbers", "你好", "Python lists", "the moon", "tea"]


@dataclass
class Result:
    ok: bool
    ttft: float = 0.0  # seconds to the first content chunk (to the end if the reply had no text)
    latency: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass
class Totals:
    results: list[Result] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, result: Result) -> None:
        with self.lock:
            self.results.append(result)


def one_request(client: httpx.Client, url: str, body: dict, headers: dict) -> Result:
    start = time.perf_counter()
    first: Optional[float] = None
    tokens, done = 0, False
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                response.read()
                return Result(False, error=f"HTTP {response.status_code}: {response.text[:200]}")
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return Result(False, error=f"stream error: {chunk['error'].get('message')}")
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    first = time.perf_counter()
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        return Result(False, error=f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if not done:
        return Result(False, error="the stream ended without [DONE]")
    return Result(True, ttft=(first or end) - start, latency=end - start, tokens=tokens)


def run_client(index: int, args, url: str, deadline: float, totals: Totals) -> None:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(timeout=args.request_timeout, verify=False) as client:
        for i in range(args.requests):
            if time.monotonic() > deadline:
                return
            body = {"model": "bench", "stream": True, "stream_options": {"include_usage": True},
                    "max_tokens": args.max_tokens, "temperature": args.temperature,
                    "messages": [{"role": "user", "content": f"[{index}.{i}] Tell me about "
                                                             f"{TOPICS[(index + i) % len(TOPICS)]}."}]}
            totals.add(one_request(client, url, body, headers))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def start_server(args) -> tuple[subprocess.Popen, str]:
    """``chatglm serve`` on a free loopback port; returns the process and its URL once the model is loaded."""
    cmd = [sys.executable, "-c", RUN_SERVE, "--host", "127.0.0.1", "--port", "0", "--parallel", str(args.parallel),
           "--queue-size", str(max(64, args.clients)), "--n-ctx", str(args.n_ctx)]
    if args.model:
        cmd.insert(3, args.model)
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "CHATGLM_API_KEY": args.api_key} if args.api_key else dict(os.environ)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    found: list[str] = []

    def drain() -> None:  # read stderr to the end so the server never blocks on a full pipe
        for line in proc.stderr:
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
            if match and not found:
                found.append(match.group(1))
            elif not match:
                sys.stderr.write("server: " + line)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if found and _healthy(found[0]):
            return proc, found[0]
        time.sleep(0.1)
    stop_server(proc)
    raise SystemExit(f"the server did not become ready within {args.startup_timeout} s")


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2, verify=False).status_code == 200
    except httpx.HTTPError:
        return False


def stop_server(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise SystemExit(f"--url must be a loopback address (127.0.0.0/8, ::1, localhost), not {host!r}")


def report(args, totals: Totals, elapsed: float, crashed: bool) -> dict:
    ok = [r for r in totals.results if r.ok]
    errors = [r for r in totals.results if not r.ok]
    ttft = [r.ttft * 1000 for r in ok]
    latency = [r.latency * 1000 for r in ok]
    summary = {
        "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
        "parallel": args.parallel, "requests": len(totals.results), "completed": len(ok), "errors": len(errors),
        "server_crashes": int(crashed), "seconds": round(elapsed, 2),
        "requests_per_s": round(len(ok) / elapsed, 2) if elapsed else 0.0,
        "tokens_per_s": round(sum(r.tokens for r in ok) / elapsed, 1) if elapsed else 0.0,
        "ttft_ms_p50": round(percentile(ttft, 0.50), 1), "ttft_ms_p95": round(percentile(ttft, 0.95), 1),
        "latency_ms_p50": round(percentile(latency, 0.50), 1), "latency_ms_p95": round(percentile(latency, 0.95), 1),
        "first_errors": sorted({e.error for e in errors})[:5],
    }
    if args.json:
        print(json.dumps(summary, ensure_ascii=False))
        return summary
    print(f"{summary['requests']} requests ({args.clients} clients x up to {args.requests}), max_tokens "
          f"{args.max_tokens}, {args.parallel} instance(s), {elapsed:.1f} s")
    print(f"throughput: {summary['requests_per_s']} requests/s, {summary['tokens_per_s']} tokens/s")
    print(f"time to first token: p50 {summary['ttft_ms_p50']} ms, p95 {summary['ttft_ms_p95']} ms")
    print(f"request latency:     p50 {summary['latency_ms_p50']} ms, p95 {summary['latency_ms_p95']} ms")
    print(f"errors: {len(errors)}, server crashes: {int(crashed)}")
    for message in summary["first_errors"]:
        print(f"  error: {message}")
    return summary


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="GGUF to serve (default: the bundled demo model)")
    p.add_argument("--url", help="benchmark this running server instead (loopback only)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--parallel", type=int, default=1, help="model instances of the server this script starts")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per instance")
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--api-key", default="")
    p.add_argument("--time-limit", type=float, default=600.0, help="no request starts after this many seconds")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--startup-timeout", type=float, default=120.0)
    p.add_argument("--json", action="store_true", help="print one JSON summary line")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.time_limit <= 0:
        p.error("--clients, --requests and --time-limit must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    proc = None
    if args.url:
        check_loopback(args.url)
        url = args.url.rstrip("/")
    else:
        proc, url = start_server(args)
    totals = Totals()
    start = time.monotonic()
    deadline = start + args.time_limit
    threads = [threading.Thread(target=run_client, args=(i, args, url, deadline, totals), daemon=True)
               for i in range(args.clients)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        elapsed = time.monotonic() - start
        crashed = (proc is not None and proc.poll() is not None) or not _healthy(url)
        if proc is not None:
            stop_server(proc)
    summary = report(args, totals, elapsed, crashed)
    return 0 if summary["errors"] == 0 and not crashed else 1


if __name__ == "__main__":
    sys.exit(main())

"""llama.cpp's RPC backend on loopback: two `chatglm rpc-server` processes and the client in this process.

The tiny f32 ChatGLM3 (conftest's ``glm3_gguf``) split over the two servers gives the single-process logits and
greedy ids; a killed server fails the request in flight (the engine's worker process dies, this process does not)
and the next call reconnects; a server that is down, or a port that is not an rpc-server, is one line at start.
These tests need a llama-cpp-python built with GGML_RPC: without one they fail, saying how to build it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from chatglm.errors import EngineLostError, InputError
from chatglm.runtime import rpc

REPO = Path(__file__).resolve().parents[1]
TEXT = "[Round 1]\n\n问：你好，请介绍一下你自己。\n\n答："


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "chatglm.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)


class Server:
    """One `chatglm rpc-server` child on a loopback port, which a test may kill and start again."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Server":
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "chatglm.cli", "rpc-server", "--port", str(self.port),
                                      "-t", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while True:
            try:
                rpc.probe(rpc.parse_endpoint(self.endpoint), timeout=2)
                return self
            except rpc.RPCError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"rpc-server exited: {self.proc.stderr.read().decode()[-500:]}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture(scope="module")
def need_rpc():
    problem = rpc.missing()
    if problem:
        pytest.fail(f"the RPC tests need llama-cpp-python with RPC: {problem}")


@pytest.fixture(scope="module")
def servers(need_rpc):
    pair = [Server().start(), Server().start()]
    yield pair
    for s in pair:
        s.kill()


@pytest.fixture()
def both_up(servers):
    for s in servers:
        if s.proc is None or s.proc.poll() is not None:
            s.start()
    return servers


def split_load(path: Path, servers, **kw):
    from chatglm.runtime.model import load

    return load(path, n_ctx=256, n_threads=1, kv_type="f32", flash_attn=False,
                rpc=[s.endpoint for s in servers], tensor_split=(1, 1), **kw)


# -- parsing: refused before anything connects --------------------------------------------------------------------
@pytest.mark.parametrize("text, message", [
    ("localhost", "give host:port"), ("[::1]:50052", "IPv4 only"), ("host:0", "between 1 and 65535"),
    ("a b:1", "not a host name"), ("h:1,h:1", "given twice"), (",".join(f"h:{i}" for i in range(1, 18)), "at most 16"),
])
def test_bad_server_lists_are_refused_with_their_reason(text, message):
    with pytest.raises(InputError, match=message):
        rpc.parse_servers(text)


@pytest.mark.parametrize("text", ["a,b", "-1,2", "0,0", "nan,1", "inf"])
def test_bad_splits_are_refused(text):
    with pytest.raises(InputError, match="--tensor-split"):
        rpc.parse_split(text)


def test_device_plan_splits_the_layers_as_llama_cpp_does(glm3_gguf):
    from chatglm.gguf_file import read_header

    header = read_header(glm3_gguf)
    n_layer = header.arch_get("block_count")
    plan = rpc.device_plan(header, ["a", "b"], [1, 1], (1, 1), -1, 1000 * n_layer)
    assert [s.name for s in plan] == ["a", "b", "this machine"]
    # n_layer + 1 slots (the output layer last) cut at the split's fractions: llama.cpp's upper_bound over them
    cut = [il for il in range(n_layer + 1) if il / (n_layer + 1) < 0.5]
    assert plan[0].layers == tuple(cut) and plan[1].layers == tuple(range(len(cut), n_layer + 1))
    assert plan[2].layers == () and plan[0].kv_cache == 1000 * len(cut)
    by_memory = rpc.device_plan(header, ["a", "b"], [0, 1], (), -1, 0)  # no split: by free memory
    assert by_memory[0].layers == () and len(by_memory[1].layers) == n_layer + 1
    assert plan[2].weights > 0  # the token embeddings stay here
    assert sum(s.weights for s in plan) == sum(t.nbytes for t in header.tensors.values())
    kept = rpc.device_plan(header, ["a", "b"], [1, 1], (), 1, 0)  # -ngl 1: only the output layer goes out
    assert kept[2].layers == tuple(range(n_layer))


# -- a split model computes what one process computes ------------------------------------------------------------
def test_split_logits_and_greedy_ids_equal_single_process(servers, glm3_model, glm3_gguf):
    ids = glm3_model.format.completion_ids(TEXT, glm3_model.engine)
    local = glm3_model.engine.all_logits(ids)
    want = glm3_model.generate(ids, temperature=0, max_tokens=24)
    with split_load(glm3_gguf, servers) as m:
        assert type(m.engine).__name__ == "RemoteEngine"
        remote = m.engine.all_logits(ids)
        scale = float(np.abs(local).max())
        diff = float(np.abs(remote - local).max())
        assert diff <= 1e-5 * scale, f"max |diff| {diff:.3g} at scale {scale:.3g}"
        assert m.tokenize(TEXT) == glm3_model.tokenize(TEXT)
        assert m.generate(ids, temperature=0, max_tokens=24) == want
        assert m.engine.logits().shape == (m.info.n_vocab,)
        stop = threading.Event()
        stop.set()
        from chatglm.errors import Cancelled

        with pytest.raises(Cancelled):  # the worker's llama_decode is aborted; the cache keeps what it had
            m.engine.prefill(ids + ids[:8], cancel=stop)
        assert m.engine.tokens == list(ids)[:len(m.engine.tokens)]
        os.kill(m.engine._worker.proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the worker too
        time.sleep(0.5)
        assert m.generate(ids, temperature=0, max_tokens=24) == want and m.engine.restarts == 0


def test_run_verbose_prints_what_each_device_gets_and_answers(both_up, glm3_gguf):
    servers = ",".join(s.endpoint for s in both_up)
    out = cli("run", str(glm3_gguf), "-p", "你好", "-n", "4", "--temp", "0", "-t", "1", "--rpc", servers,
              "--tensor-split", "1,1", "--verbose")
    assert out.returncode == 0, out.stderr
    plan = [line.split(": ", 1)[1] for line in out.stderr.splitlines() if line.startswith("INFO chatglm.runtime.rpc")
            and "layers" in line]
    assert [line.split(":")[1] if line.startswith("[127") else line[:13] for line in plan] == \
        [str(both_up[0].port), str(both_up[1].port), "[this machine"], out.stderr
    assert "layers 0-1, weights" in plan[0] and "layers output, weights" in plan[1] and "layers none" in plan[2]


def test_perplexity_and_bench_take_rpc(both_up, glm3_gguf, tmp_path):
    import json

    text = tmp_path / "text.txt"
    text.write_text("你好，世界。Hello, world! " * 40, encoding="utf-8")
    common = [str(glm3_gguf), str(text), "-w", "64", "-s", "32", "-t", "1", "--kv-type", "f32", "--no-flash-attn",
              "--json"]
    here = cli("perplexity", *common)
    split = cli("perplexity", *common, "--rpc", ",".join(s.endpoint for s in both_up))
    assert here.returncode == 0 and split.returncode == 0, split.stderr
    a, b = json.loads(here.stdout), json.loads(split.stdout)
    assert a["n_scored"] == b["n_scored"] > 0 and abs(a["perplexity"] - b["perplexity"]) <= 1e-5 * a["perplexity"]
    bench = cli("bench", str(glm3_gguf), "-p", "16", "-n", "4", "-r", "1", "-t", "1", "--json", "--rpc",
                both_up[0].endpoint)
    assert bench.returncode == 0, bench.stderr
    report = json.loads(bench.stdout)
    assert [(r["engine"], r["n_prompt"], r["n_gen"]) for r in report] == [("RemoteEngine", 16, 0),
                                                                         ("RemoteEngine", 0, 4)]


# -- faults ---------------------------------------------------------------------------------------------------------
def test_a_server_killed_mid_generation_fails_that_call_and_the_next_reconnects(both_up, glm3_gguf, glm3_model):
    ids = glm3_model.format.completion_ids(TEXT, glm3_model.engine)
    want = glm3_model.generate(ids, temperature=0, max_tokens=16)
    with split_load(glm3_gguf, both_up) as m:
        stream = m.stream_generate(ids, temperature=0, max_tokens=16)
        next(stream)
        both_up[1].kill()
        with pytest.raises(EngineLostError, match="the RPC engine stopped") as lost:
            list(stream)
        assert "\n" not in str(lost.value)
        assert m.engine.tokens == []  # nothing is cached any more: the next call evaluates everything again
        with pytest.raises(rpc.RPCError, match="connection refused"):
            m.generate(ids, temperature=0, max_tokens=16)  # still down: one line, no worker started
        both_up[1].start()
        assert m.generate(ids, temperature=0, max_tokens=16) == want
        assert m.engine.restarts == 1


def test_a_chat_keeps_its_history_across_a_lost_server(both_up, glm3_gguf):
    with split_load(glm3_gguf, both_up) as m:
        chat = m.session()
        chat.chat("你好", temperature=0, max_tokens=8)
        history = list(chat.messages)
        both_up[0].kill()
        with pytest.raises(EngineLostError):
            chat.chat("再说一遍", temperature=0, max_tokens=8)
        assert chat.messages == history
        both_up[0].start()
        chat.chat("再说一遍", temperature=0, max_tokens=8)
        assert chat.messages[:len(history)] == history and len(chat.messages) == len(history) + 2


def test_the_repl_reports_a_lost_server_and_keeps_the_conversation(both_up, glm3_gguf, capsys):
    from chatglm.cli.repl import LineEditor, Repl

    class Typed(LineEditor):
        """Lines typed in turn; a callable item is run (a server killed or started) before the next line."""

        def __init__(self, items):
            super().__init__(None)
            self.items = list(items)

        def read(self, prompt: str) -> str:
            while self.items and callable(self.items[0]):
                self.items.pop(0)()
            if not self.items:
                raise EOFError
            return self.items.pop(0)

    with split_load(glm3_gguf, both_up) as m:
        m.sampling = m.sampling.updated(temperature=0, max_tokens=6)
        session = m.session()
        Repl(session, editor=Typed(["你好", both_up[1].kill, "再说一遍", both_up[1].start, "再说一遍"])).run()
    err = capsys.readouterr().err
    assert err.count("error: the RPC engine stopped") == 1, err
    assert [x.role for x in session.messages] == ["user", "assistant"] * 2
    assert session.messages[0].content == "你好" and session.messages[2].content == "再说一遍"


def test_serve_answers_503_for_a_lost_server_and_recovers(both_up, glm3_gguf):
    from fixtures_server import http, serve

    body = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4, "temperature": 0}
    with serve(lambda: [split_load(glm3_gguf, both_up)]) as live:
        assert live.wait_ready(120).get("status") == "ok"
        url = live.url + "/v1/chat/completions"
        assert http().post(url, json=body, timeout=120).status_code == 200
        both_up[1].kill()
        lost = http().post(url, json=body, timeout=120)
        assert lost.status_code == 503, lost.text
        assert "RPC" in lost.json()["error"]["message"]
        down = http().post(url, json=body, timeout=120)
        assert down.status_code == 503 and "connection refused" in down.json()["error"]["message"]
        both_up[1].start()
        assert http().post(url, json=body, timeout=120).status_code == 200


def test_serve_survives_a_server_killed_mid_stream(both_up, glm3_gguf):
    """The RPC server dies while an answer streams: that stream ends with an error event naming RPC (the worker
    process died, not the server), the server stays up, and once the RPC server is back a request answers again."""
    import json

    from fixtures_server import http, serve

    body = {"model": "tiny", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 200, "temperature": 0,
            "stream": True}
    with serve(lambda: [split_load(glm3_gguf, both_up)]) as live:
        assert live.wait_ready(120).get("status") == "ok"
        url = live.url + "/v1/chat/completions"
        events = []
        with http().stream("POST", url, json=body, timeout=120) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                events.append(json.loads(line[6:]))
                if len(events) == 3:  # the answer is under way: the role chunk and two pieces came
                    both_up[1].kill()
        finishes = [c["finish_reason"] for e in events for c in e.get("choices", []) if c.get("finish_reason")]
        assert finishes == [] and "RPC" in events[-1]["error"]["message"], events[-3:]
        assert http().get(live.url + "/health", timeout=10).status_code == 200
        both_up[1].start()
        again = http().post(url, json={**body, "stream": False, "max_tokens": 4}, timeout=120)
        assert again.status_code == 200, again.text


class GarbageListener:
    """A TCP port that is not an rpc-server: it answers every connection with ``reply`` (or nothing) and holds it."""

    def __init__(self, reply: bytes):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.reply, self.conns = reply, []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            if self.reply:
                conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


@pytest.mark.parametrize("reply, message", [
    (b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(range(256)) * 4, "not a ggml RPC server"),
    (b"", "no answer within 1 s"),
], ids=["garbage", "silent"])
def test_a_port_that_is_not_an_rpc_server_is_an_error_not_a_hang(need_rpc, reply, message):
    listener = GarbageListener(reply)
    try:
        started = time.monotonic()
        with pytest.raises(rpc.RPCError, match=message):
            rpc.probe(rpc.Endpoint("127.0.0.1", listener.port), timeout=1)
        assert time.monotonic() - started < 30
    finally:
        listener.close()


def test_the_cli_says_in_one_line_when_a_server_is_down_or_garbage(need_rpc, glm3_gguf):
    down = cli("run", str(glm3_gguf), "-p", "hi", "--rpc", f"127.0.0.1:{free_port()}")
    assert down.returncode == 2 and down.stderr.count("\n") == 1, down.stderr
    assert "connection refused" in down.stderr and "Traceback" not in down.stderr
    listener = GarbageListener(b"\x00garbage" * 100)
    try:
        bad = cli("bench", str(glm3_gguf), "-p", "8", "-n", "8", "--rpc", f"127.0.0.1:{listener.port}")
    finally:
        listener.close()
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a ggml RPC server" in bad.stderr
    split = cli("run", str(glm3_gguf), "-p", "hi", "--tensor-split", "1,1")
    assert split.returncode == 2 and "give --rpc too" in split.stderr


def test_rpc_server_refuses_unsafe_or_taken_addresses(need_rpc):
    exposed = cli("rpc-server", "--host", "0.0.0.0", "--port", str(free_port()))
    assert exposed.returncode == 2 and "--allow-remote" in exposed.stderr and exposed.stderr.count("\n") == 1
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = cli("rpc-server", "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 2 and "cannot listen on" in busy.stderr and busy.stderr.count("\n") == 1
    named = cli("rpc-server", "--host", "localhost")
    assert named.returncode == 2 and "IPv4 address" in named.stderr


def test_version_says_rpc_is_compiled_in(need_rpc):
    out = cli("--version")
    assert out.returncode == 0 and "RPC yes" in out.stdout, out.stdout
    assert cli("info", "--system").stdout == out.stdout

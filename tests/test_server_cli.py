"""`chatglm serve` as a command: it serves a GGUF until Ctrl-C, and a bad model path or a taken port is one line and
exit code 2 before anything starts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import typer
from fixtures_server import http
from typer.testing import CliRunner

from chatglm.cli.serve import serve_cmd

RUN_SERVE = "import typer; from chatglm.cli.serve import serve_cmd; typer.run(serve_cmd)"


@pytest.fixture
def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(serve_cmd)
    return app


def test_missing_model_is_exit_2(cli, tmp_path):
    result = CliRunner().invoke(cli, [str(tmp_path / "none.gguf")])
    assert result.exit_code == 2 and "none.gguf: no such file" in result.output


def test_a_file_that_is_not_gguf_is_exit_2(cli, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely not a gguf" * 4)
    result = CliRunner().invoke(cli, [str(bad)])
    assert result.exit_code == 2 and "bad.gguf" in result.output and "GGUF" in result.output


def test_a_taken_port_is_exit_2(cli, glm3_gguf):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, [str(glm3_gguf), "--port", str(port)])
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output


def test_a_model_that_fails_to_load_stops_the_server_with_its_error(cli, tmp_path):
    import gguf

    path = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")  # a valid GGUF of an architecture we do not run
    writer.add_context_length(128)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result = CliRunner().invoke(cli, [str(path), "--port", "0"])
    assert result.exit_code == 2 and "architecture 'llama' is not a GLM model" in result.output


class StderrReader:
    """Drains a child's stderr on a thread (so it never blocks on a full pipe) and finds the printed address."""

    def __init__(self, proc: subprocess.Popen):
        self.lines: list[str] = []
        self.url = ""
        self.found = threading.Event()
        self.thread = threading.Thread(target=self._drain, args=(proc,), daemon=True)
        self.thread.start()

    def _drain(self, proc: subprocess.Popen) -> None:
        for line in proc.stderr:
            self.lines.append(line)
            match = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
            if match and not self.url:
                self.url = match.group(1)
                self.found.set()

    def wait_url(self, timeout: float) -> str:
        if not self.found.wait(timeout):
            raise AssertionError("the server printed no address: " + "".join(self.lines))
        return self.url

    def text(self) -> str:
        self.thread.join(5)
        return "".join(self.lines)


def test_serve_answers_on_a_free_port_and_stops_on_ctrl_c(glm3_gguf):
    env = {**os.environ, "CHATGLM_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-c", RUN_SERVE, str(glm3_gguf), "--port", "0", "--n-ctx", "128",
                             "--threads", "1", "--model-id", "tiny-cli"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stderr = StderrReader(proc)
        url = stderr.wait_url(60)
        deadline = time.monotonic() + 30
        while http().get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        r = http().post(url + "/v1/chat/completions", headers={"Authorization": "Bearer k"},
                        json={"model": "tiny-cli", "messages": [{"role": "user", "content": "你好"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["model"] == "tiny-cli"
        assert http().post(url + "/v1/chat/completions", json={"messages": []}).status_code == 401
        assert "<title>chatglm</title>" in http().get(url + "/").text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert "server stopped" in stderr.text() and "error" not in stderr.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def test_serve_without_a_model_serves_the_store(glm3_gguf, tmp_path):
    from chatglm.store import Ref, Store

    Store(tmp_path).add_file(Ref("org/tiny", "f32"), glm3_gguf, {})
    env = {**os.environ, "CHATGLM_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", RUN_SERVE, "--port", "0", "--n-ctx", "128", "--threads", "1",
                             "--max-models", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        stderr = StderrReader(proc)
        url = stderr.wait_url(60)
        assert [m["name"] for m in http().get(url + "/api/tags").json()["models"]] == ["org/tiny:f32"]
        r = http().post(url + "/api/chat", json={"model": "org/tiny", "stream": False, "options": {"num_predict": 3},
                                                 "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200 and r.json()["done"] and r.json()["model"] == "org/tiny:f32"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert "serving the store" in stderr.text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)



@contextlib.contextmanager
def serving(gguf, *args: str):
    """``chatglm serve GGUF ARGS`` in a child process on a free port: (the process, its stderr, the port) once it
    answers /health; killed at the end if it is still running."""
    from fixtures_server import raw_request

    proc = subprocess.Popen([sys.executable, "-c", RUN_SERVE, str(gguf), "--port", "0", "--n-ctx", "128",
                             "--threads", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stderr = StderrReader(proc)
        port = int(stderr.wait_url(60).rpartition(":")[2])
        deadline = time.monotonic() + 30
        while raw_request(port, "GET", "/health").status != 200:
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.05)
        yield proc, stderr, port
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


@pytest.mark.parametrize("value", ["0", "1025", "lots"])
def test_max_body_out_of_range_is_exit_2(cli, glm3_gguf, value):
    result = CliRunner().invoke(cli, [str(glm3_gguf), "--port", "0", "--max-body", value])
    assert result.exit_code == 2 and "--max-body" in result.output


def test_max_body_sets_the_request_limit(glm3_gguf):
    """``--max-body 1``: a body of exactly 1 MiB is served, one byte more is a 413 naming the limit."""
    from fixtures_server import raw_request

    with serving(glm3_gguf, "--max-body", "1") as (proc, _, port):
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()[:-1]
        headers = {"Content-Type": "application/json"}
        under = body + b" " * ((1 << 20) - len(body) - 1) + b"}"
        assert len(under) == 1 << 20
        assert raw_request(port, "POST", "/v1/chat/completions", under, headers).status == 200
        over = raw_request(port, "POST", "/v1/chat/completions", under[:-1] + b" }", headers)
        assert over.status == 413 and "the server's limit of 1048576 bytes" in over.json()["error"]["message"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0

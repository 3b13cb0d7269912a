"""Helpers and fixtures for the server tests: a live server on a loopback port, a scripted model, headless Chromium.

Test modules import what they use (``from fixtures_server import ...``); pytest puts tests/ on sys.path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

import pytest

from chatglm.runtime.engine import ModelInfo
from chatglm.runtime.messages import Message, as_messages, declared_tools
from chatglm.runtime.model import GenerationStats
from chatglm.runtime.prompts import get_format

if TYPE_CHECKING:  # pragma: no cover
    import httpx

SPECIAL_BASE = 1_000_000  # scripted-model special ids sit above every character code point
STUB_SPECIAL = {t: SPECIAL_BASE + i for i, t in enumerate(
    ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"))}
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "repeat_penalty", "seed", "max_tokens"}


def answer(text: str) -> str:
    """A plain ChatGLM3 reply as generated: an empty metadata line, then the text."""
    return "\n" + text


def tool_call_reply(name: str, **arguments) -> str:
    """A ChatGLM3 tool call as generated: the tool name, then ``tool_call(...)`` in a fenced block."""
    inner = ", ".join(f"{k}={v!r}" for k, v in arguments.items())
    return f"{name}\n```python\ntool_call({inner})\n```"


class ScriptedModel:
    """Stands in for :class:`chatglm.runtime.model.Model` with replies given as text, one token per word.

    A reply is the raw text a ChatGLM3 model generates after ``<|assistant|>``: a metadata line (empty for a plain
    answer, the tool name for a tool call), then the content; :func:`answer` makes a plain one.

    Prompts are built and replies parsed by the real ChatGLM3 chat format (tokens are character code points, so a
    prompt can be read back with :meth:`prompt_text`). It records what it was asked, refuses concurrent use (the
    server must serialise), checks ``cancel`` before every token as the real model does, and logs token times.
    """

    def __init__(self, replies: Sequence[str] = (), *, default: str = "\nHello from the scripted model.",
                 n_ctx: int = 8192, token_delay: float = 0.0, gate: Optional[threading.Event] = None,
                 chat_format: str = "chatglm3", special: Optional[dict[str, int]] = None):
        special = dict(special or STUB_SPECIAL)
        self.format = get_format(chat_format, special)
        self.info = ModelInfo(path=Path("scripted.gguf"), arch="chatglm", family="chatglm3", chat_format=chat_format,
                              n_ctx=n_ctx, n_ctx_train=n_ctx, n_vocab=SPECIAL_BASE + 64, n_params=0, size_bytes=0,
                              description="scripted", special=special)
        self.template_kwargs: list[dict] = []  # the template options of each chat
        self.replies, self.default, self.token_delay = deque(replies), default, token_delay
        self.gate = gate  # when given, every generation waits for it before its first token
        self.received: list[list[Message]] = []
        self.prompts: list[list[int]] = []
        self.sampling: list[dict] = []
        self.token_times: list[float] = []
        self.last_stats = GenerationStats()
        self.last_reply = Message("assistant")
        self.started = threading.Event()
        self.finished = threading.Event()
        self._busy = threading.Lock()
        self.closed = False

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def prompt_ids(self, messages, **options) -> list[int]:
        from chatglm.runtime.prompts import template_options

        with self.format.using(template_options(options)):
            return self.format.prompt_ids(as_messages(messages), self)

    def prompt_text(self, ids: Sequence[int]) -> str:
        names = {v: k for k, v in STUB_SPECIAL.items()}
        return "".join(names.get(i, chr(i) if i < SPECIAL_BASE else "?") for i in ids)

    def stream_chat(self, messages, *, cancel: Optional[threading.Event] = None, on_thinking=None,
                    **sampling) -> Iterator[str]:
        from chatglm.runtime.prompts import split_options, template_options

        options, sampling = split_options(sampling)
        messages = as_messages(messages)
        ids = self.prompt_ids(messages, **options)
        self.template_kwargs.append(template_options(options))
        self.received.append(messages)
        self.prompts.append(ids)
        text, shown, thought = "", "", ""
        for piece in self._run(ids, sampling, cancel):
            text += piece
            if on_thinking is not None and hasattr(self.format, "visible_thinking"):
                now = self.format.visible_thinking(text)
                if now.startswith(thought) and len(now) > len(thought):
                    on_thinking(now[len(thought):])
                    thought = now
            visible = self.format.visible(text).rstrip()
            if visible.startswith(shown) and len(visible) > len(shown):
                yield visible[len(shown):]
                shown = visible
        self.last_reply = self.format.parse_reply(text, declared_tools(messages))
        if on_thinking is not None and self.last_reply.thinking.startswith(thought) \
                and len(self.last_reply.thinking) > len(thought):
            on_thinking(self.last_reply.thinking[len(thought):])
        if self.last_reply.content.startswith(shown) and len(self.last_reply.content) > len(shown) \
                and not self.last_reply.tool_calls:
            yield self.last_reply.content[len(shown):]

    def chat(self, messages, *, cancel=None, **sampling) -> Message:
        for _ in self.stream_chat(messages, cancel=cancel, **sampling):
            pass
        return self.last_reply

    def generate(self, prompt: str, *, cancel=None, **sampling) -> str:
        return "".join(self.stream_generate(prompt, cancel=cancel, **sampling))

    def stream_generate(self, prompt: str, *, cancel=None, **sampling) -> Iterator[str]:
        return self._run(self.tokenize(prompt), sampling, cancel)

    def _run(self, ids: list[int], sampling: dict, cancel: Optional[threading.Event]) -> Iterator[str]:
        unknown = set(sampling) - SAMPLING_KEYS
        if unknown:
            raise TypeError(f"unknown sampling options {unknown}")
        if not self._busy.acquire(blocking=False):
            raise RuntimeError("ScriptedModel used by two requests at once")
        try:
            self.sampling.append(dict(sampling))
            self.finished.clear()
            self.started.set()
            if self.gate is not None and not self.gate.wait(10):
                raise TimeoutError("ScriptedModel's gate was never opened")
            yield from self._tokens(ids, sampling, cancel)
        finally:
            self._busy.release()
            self.finished.set()

    def _tokens(self, ids: list[int], sampling: dict, cancel: Optional[threading.Event]) -> Iterator[str]:
        reply = self.replies.popleft() if self.replies else self.default
        pieces = re.findall(r"\s*\S+|\s+", reply)
        stats = GenerationStats(prompt_tokens=len(ids), evaluated_tokens=len(ids), finish_reason="stop")
        self.last_stats = stats
        limit = min(sampling.get("max_tokens") or len(pieces), self.info.n_ctx - len(ids))
        self.token_times = []
        for i, piece in enumerate(pieces):
            if cancel is not None and cancel.is_set():
                stats.finish_reason = "cancelled"
                return
            if i >= limit:
                stats.finish_reason = "length"
                return
            if self.token_delay:
                time.sleep(self.token_delay)
            self.token_times.append(time.monotonic())
            stats.generated_tokens += 1
            yield piece

    def close(self) -> None:
        self.closed = True


# -- a server on a loopback port --------------------------------------------------------------------------------
class LiveServer:
    """uvicorn serving ``app`` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def wait_ready(self, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = http().get(self.url + "/health", timeout=5)
            if status.status_code == 200 or time.monotonic() > deadline:
                return status.json()
            time.sleep(0.02)

    @property
    def state(self):
        return self.app.state.server

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def serve(models_or_loader, **config) -> LiveServer:
    """A :class:`LiveServer` over the given models (or a loader function) with ``ServerConfig(**config)``; the Host
    check is on (loopback names only) unless ``allowed_hosts`` says otherwise, as ``chatglm serve`` runs keyless."""
    from chatglm.server import ServerConfig, create_app
    from chatglm.server.guard import LOOPBACK_HOSTS

    config.setdefault("allowed_hosts", LOOPBACK_HOSTS)

    loader = models_or_loader if callable(models_or_loader) else (lambda: list(models_or_loader))
    parallel = 1 if callable(models_or_loader) else len(models_or_loader)
    return LiveServer(create_app(loader, ServerConfig(**{"model_id": "tiny", **config}), parallel))


LLAMA_KEY = "test-key"


@pytest.fixture(scope="module")
def llama_server(glm3_gguf) -> Iterator[LiveServer]:
    """The tiny random ChatGLM3 GGUF (conftest's ``glm3_gguf``) served through llama.cpp: context 256, API key
    :data:`LLAMA_KEY`, one thread (on two shared cores, more threads only add synchronisation cost)."""
    from chatglm.runtime.model import load

    with serve(lambda: [load(glm3_gguf, n_ctx=256, n_threads=1)], api_key=LLAMA_KEY) as live:
        status = live.wait_ready()
        if status.get("status") != "ok":
            raise RuntimeError(f"the llama server did not become ready: {status}")
        yield live


_CLIENTS: dict[str, Any] = {}


def http() -> "httpx.Client":
    """One shared plain-HTTP client (making one per call costs ~0.2 s of certificate loading)."""
    import httpx

    if "httpx" not in _CLIENTS:
        _CLIENTS["httpx"] = httpx.Client(verify=False, timeout=15)
    return _CLIENTS["httpx"]


def openai_client(live: LiveServer, api_key: str = "unused", **kwargs):
    """The official client pointed at ``live`` (no retries, so a failure shows at once)."""
    import openai

    if "openai" not in _CLIENTS:
        _CLIENTS["openai"] = openai.DefaultHttpxClient(verify=False)
    return openai.OpenAI(base_url=live.url + "/v1", api_key=api_key, max_retries=0, timeout=30,
                         http_client=_CLIENTS["openai"], **kwargs)


# -- headless Chromium over the DevTools protocol (pipe transport: no extra packages) ---------------------------
def find_chromium() -> Optional[str]:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


class Chromium:
    """A headless Chromium driven over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-separated JSON)."""

    def __init__(self, binary: str, timeout: float = 20.0):
        self.timeout = timeout
        self.profile = tempfile.mkdtemp(prefix="chatglm-chromium-")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [binary, "--headless", "--no-sandbox", "--remote-debugging-pipe", f"--user-data-dir={self.profile}",
                "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                "--disable-background-networking", "--disable-sync", "--disable-dev-shm-usage", "about:blank"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, close_fds=False,
                                     preexec_fn=_pipe_fds(to_browser_r, from_browser_w))
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.session = ""

    def _read(self) -> None:
        buf = b""
        while True:
            try:
                data = os.read(self._from_browser, 65536)
            except OSError:
                data = b""
            if not data:
                break
            buf += data
            *messages, buf = buf.split(b"\0")
            with self._cond:
                for raw in messages:
                    msg = json.loads(raw)
                    if "id" in msg:
                        self._replies[msg["id"]] = msg
                self._cond.notify_all()
        with self._cond:
            self._replies[-1] = {"error": {"message": "the browser closed the pipe"}}
            self._cond.notify_all()

    def send(self, method: str, params: Optional[dict] = None, session: Optional[str] = None) -> dict:
        with self._cond:
            self._next_id += 1
            mid = self._next_id
        msg: dict[str, Any] = {"id": mid, "method": method, "params": params or {}}
        if session or self.session:
            msg["sessionId"] = session or self.session
        os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while mid not in self._replies and -1 not in self._replies:
                if not self._cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"no DevTools reply to {method}")
            reply = self._replies.pop(mid, None) or self._replies[-1]
        if "error" in reply:
            raise RuntimeError(f"DevTools {method}: {reply['error'].get('message')}")
        return reply["result"]

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable")
        self.send("Page.navigate", {"url": url})
        self.wait_for(f"location.href === {json.dumps(url)} && document.readyState === 'complete'")

    def eval(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails'].get('text')} in {expression!r}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 10.0, interval: float = 0.02) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.eval(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"page condition not met within {timeout} s: {expression}")
            time.sleep(interval)

    def screenshot(self, path: Path) -> None:
        import base64

        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"]))

    def close(self) -> None:
        try:
            self.send("Browser.close", session="")
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        for fd in (self._to_browser, self._from_browser):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def _pipe_fds(read_end: int, write_end: int) -> Callable[[], None]:
    """In the child: put the browser's command pipe on fd 3 and its reply pipe on fd 4.

    Every other descriptor of ours is close-on-exec (PEP 446), so with ``close_fds=False`` only 0-4 reach the browser.
    """

    def setup() -> None:
        import fcntl

        high_r = fcntl.fcntl(read_end, fcntl.F_DUPFD_CLOEXEC, 10)  # out of the way of 3 and 4 first
        high_w = fcntl.fcntl(write_end, fcntl.F_DUPFD_CLOEXEC, 10)
        os.dup2(high_r, 3)
        os.dup2(high_w, 4)

    return setup


@pytest.fixture(scope="module")
def chromium() -> Iterator[Chromium]:
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium binary on PATH (Debian: apt-get install chromium; .ci/run installs it)")
    browser = Chromium(binary)
    try:
        yield browser
    finally:
        browser.close()


# -- raw HTTP: bytes as given, Host and Content-Type set by hand -------------------------------------------------
class RawReply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)


def raw_request(port: int, method: str, path: str, body: bytes = b"", headers: Optional[dict[str, str]] = None,
                host: Optional[str] = "127.0.0.1", timeout: float = 15) -> RawReply:
    """One request on a fresh connection with exactly these headers (``host`` None: no Host header at all)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if (body or method == "POST") and "Transfer-Encoding" not in (headers or {}):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body or None)
        reply = conn.getresponse()
        return RawReply(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        conn.close()


def raw_http10(port: int, request: bytes, timeout: float = 15) -> bytes:
    """Send ``request`` (an HTTP/1.0 request, headers and all) and return the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            data = sock.recv(65536)
            if not data:
                return b"".join(chunks)
            chunks.append(data)

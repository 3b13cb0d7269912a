"""An RPC-backed engine in a worker process, so that a lost RPC server cannot take the caller down.

ggml-rpc's client aborts its process when a server's connection breaks. :class:`RemoteEngine` is an
:class:`~chatglm.runtime.engine.Engine` whose model lives in a child process (``multiprocessing``'s spawn start
method); every engine call is one message over a pipe, answered by the child's :class:`LlamaEngine`. The last logits
come back through shared memory (no copy per token). When the child dies mid-call, the call raises
:class:`~chatglm.errors.EngineLostError` with the reason the child logged; the engine then holds no tokens, and its
next call probes the servers again and starts a new child (so ``serve`` answers a 503 for the request in flight and
reconnects on the next one, and a chat session keeps its history and evaluates it again).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from chatglm import errors
from chatglm.errors import ChatGLMError, EngineLostError, ModelRuntimeError
from chatglm.runtime.engine import Engine, ModelInfo, ProgressFn
from chatglm.runtime.llama_native import lib
from chatglm.gguf_file import GGUFHeader
from chatglm.runtime import rpc
from chatglm.runtime.rpc import Endpoint, RPCError, probe_all

log = logging.getLogger(__name__)
POLL = 0.1  # seconds between checks of the child's health and of cancellation while a call runs
CANCEL_GRACE = 30.0  # after a cancel, how long a call may still take before the child is killed
START_TIMEOUT = 3600.0  # a load over a slow network may take long; the child reports progress meanwhile


@dataclass(frozen=True)
class WorkerSpec:
    """What the child loads: the open_engine arguments, the servers and the split."""

    path: Path
    info: ModelInfo  # what the header says (loader.describe), completed by the engine
    servers: tuple[Endpoint, ...]
    tensor_split: tuple[float, ...]
    n_ctx: int
    n_threads: int
    n_gpu_layers: int
    flash_attn: Optional[bool]
    kv_type: str


def endpoints_of(servers: Sequence) -> tuple[Endpoint, ...]:
    if all(isinstance(s, Endpoint) for s in servers):
        return tuple(servers)
    return rpc.parse_servers([str(s) for s in servers])


def remote_engine(header: GGUFHeader, info: ModelInfo, servers: Sequence, tensor_split: Sequence[float] | str, *,
                  n_ctx: int, n_threads: int, n_gpu_layers: int, flash_attn: Optional[bool], kv_type: str,
                  on_progress: Optional[ProgressFn] = None) -> "RemoteEngine":
    """The engine of ``header``'s model (validated, described by ``info``) split over ``servers``: everything that
    can be checked here is (the engine, RPC compiled in, each server up and speaking our protocol, the split), then
    the worker starts. ``n_gpu_layers`` 0 means every layer on the servers."""
    from chatglm import families
    from chatglm.families.descriptor import ENGINE_LLAMA

    if families.arch_value(header.arch, "engine") != ENGINE_LLAMA:
        raise errors.UnsupportedModelError(f"--rpc needs the llama.cpp engine; {header.arch} models run on our own "
                                           "ggml graph, on this machine only", header.path)
    endpoints = endpoints_of(servers)
    rpc.require()
    infos = probe_all(endpoints)
    n_devices = sum(len(i.memory) for i in infos)
    if n_devices > lib().llama_max_devices():  # llama.cpp reads one split weight per device from a fixed array
        raise errors.InputError(f"--rpc: the servers offer {n_devices} devices, more than the "
                                f"{lib().llama_max_devices()} llama.cpp can split a model over")
    split = rpc.parse_split(tensor_split or None, n_devices)
    for line in rpc.plan_lines(header, infos, split, n_gpu_layers, n_ctx, kv_type):
        log.info("[%s]", line)  # what each device gets (--verbose)
    spec = WorkerSpec(header.path, info, endpoints, split, n_ctx, n_threads, n_gpu_layers or -1, flash_attn, kv_type)
    return RemoteEngine(spec, on_progress, probed=True)


# -- the child --------------------------------------------------------------------------------------------------
def child_main(conn, spec: WorkerSpec, cancel, log_path: str) -> None:
    """The worker: load the engine on the servers, then answer calls until told to close or the pipe ends."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 2)  # native messages (ggml's abort line) and our log go to the file the parent reads
    os.environ["GGML_NO_BACKTRACE"] = "1"  # an abort would otherwise run gdb for a backtrace first
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent cancels
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from chatglm.gguf_file import read_header
    from chatglm.runtime.llama_engine import LlamaEngine

    try:
        devices = rpc.add_servers(spec.servers)  # connects: from here on a lost server aborts this process
        engine = LlamaEngine(read_header(spec.path), spec.info, n_ctx=spec.n_ctx, n_threads=spec.n_threads,
                             n_gpu_layers=spec.n_gpu_layers, flash_attn=spec.flash_attn, kv_type=spec.kv_type,
                             on_progress=lambda done, total: conn.send(("progress", done, total)),
                             devices=devices, tensor_split=spec.tensor_split)
    except BaseException as exc:  # noqa: BLE001 - every failure goes back as one line
        conn.send(("error", _pack(exc)))
        return
    conn.send(("ok", engine.info))
    _Server(engine, cancel, conn).serve()


class _Server:
    def __init__(self, engine, cancel, conn):
        self.engine, self.cancel, self.conn = engine, cancel, conn
        self.samplers: dict[int, Any] = {}
        self.logits_out: Optional[np.ndarray] = None
        self._shm: Optional[shared_memory.SharedMemory] = None

    def serve(self) -> None:
        while True:
            try:
                op, args = self.conn.recv()
            except (EOFError, OSError):
                return
            try:
                result = getattr(self, "op_" + op)(*args)
            except BaseException as exc:  # noqa: BLE001
                self.conn.send(("error", _pack(exc)))
                continue
            self.conn.send(("ok", result))
            if op == "close":
                return

    def progress(self, done: int, total: int) -> None:
        self.conn.send(("progress", done, total))

    def op_attach(self, name: str) -> None:
        self._shm = shared_memory.SharedMemory(name=name)
        self.logits_out = np.ndarray((self.engine.info.n_vocab,), dtype=np.float32, buffer=self._shm.buf)

    def op_tokenize(self, text: str) -> list[int]:
        return self.engine.tokenize(text)

    def op_token_bytes(self, token: int) -> bytes:
        return self.engine.token_bytes(token)

    def op_detokenize(self, tokens: list[int]) -> str:
        return self.engine.detokenize(tokens)

    def op_truncate(self, n_keep: int) -> Optional[bool]:
        return self.engine._truncate(n_keep)

    def op_n_tokens(self) -> int:
        return len(self.engine.tokens)

    def op_eval(self, tokens: list[int], progress: bool) -> None:
        self.engine._eval(tokens, cancel=self.cancel, progress=self.progress if progress else None)
        self.logits_out[:] = self.engine.logits()

    def op_all_logits(self, tokens: list[int]) -> np.ndarray:
        return self.engine.all_logits(tokens)

    def op_sampler(self, params) -> int:
        key = len(self.samplers) + 1 + max(self.samplers, default=0)
        self.samplers[key] = self.engine.sampler(params)
        return key

    def op_sample(self, key: int) -> int:
        return self.samplers[key]()

    def op_sampler_close(self, key: int) -> None:
        sampler = self.samplers.pop(key, None)
        if sampler is not None:
            sampler.close()

    def op_apply_lora(self, adapters) -> None:
        self.engine.apply_lora(adapters)

    def op_close(self) -> None:
        for sampler in self.samplers.values():
            sampler.close()
        self.engine.close()
        if self._shm is not None:
            self.logits_out = None
            self._shm.close()


def _pack(exc: BaseException) -> tuple[str, str, Optional[str]]:
    if isinstance(exc, ChatGLMError):
        return type(exc).__name__, exc.problem, exc.path
    log.error("worker call failed", exc_info=exc)
    return "ModelRuntimeError", f"the RPC worker failed: {type(exc).__name__}: {exc}", None


def _unpack(packed: tuple[str, str, Optional[str]]) -> ChatGLMError:
    name, problem, path = packed
    cls = RPCError if name == "RPCError" else getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ChatGLMError)):
        cls = errors.InputError if name.endswith("InputError") else ModelRuntimeError
    return cls(problem, path)


# -- the parent -------------------------------------------------------------------------------------------------
class _Worker:
    """One child process, its pipe, its cancel flag and its log file."""

    def __init__(self, spec: WorkerSpec):
        ctx = mp.get_context("spawn")
        self.cancel = ctx.Event()
        self.conn, child = ctx.Pipe()
        fd, self.log_path = tempfile.mkstemp(prefix="chatglm-rpc-", suffix=".log")
        os.close(fd)
        self.proc = ctx.Process(target=child_main, args=(child, spec, self.cancel, self.log_path), daemon=True,
                                name="chatglm-rpc-worker")
        self.proc.start()
        child.close()
        self.shm: Optional[shared_memory.SharedMemory] = None

    def call(self, op: str, *args, cancel: Optional[threading.Event] = None, progress: Optional[ProgressFn] = None,
             timeout: Optional[float] = None) -> Any:
        self.cancel.clear()  # before the call: the child must not see a previous call's cancel
        started, cancelled_at = time.monotonic(), None
        if cancel is not None and cancel.is_set():
            self.cancel.set()
            cancelled_at = started
        if op:
            self.conn.send((op, args))
        while True:
            if self.conn.poll(POLL):
                try:
                    kind, *payload = self.conn.recv()
                except (EOFError, OSError):
                    raise self.lost() from None
                if kind == "progress":
                    if progress is not None:
                        progress(*payload)
                    continue
                if kind == "ok":
                    return payload[0]
                raise _unpack(payload[0])
            if not self.proc.is_alive():
                raise self.lost()
            now = time.monotonic()
            if cancel is not None and cancel.is_set() and cancelled_at is None:
                self.cancel.set()
                cancelled_at = now
            if (cancelled_at is not None and now - cancelled_at > CANCEL_GRACE) or \
                    (timeout is not None and now - started > timeout):
                self.kill()
                raise EngineLostError("the RPC engine did not answer in time and was stopped (a server that stopped "
                                      "answering?); the next request reconnects")

    def lost(self) -> EngineLostError:
        self.proc.join(5)
        reason = self.reason()
        self.kill()
        return EngineLostError(f"the RPC engine stopped{': ' + reason if reason else ''} (did an RPC server go "
                               "away?); the next request reconnects")

    def reason(self) -> str:
        try:
            lines = [x.strip() for x in Path(self.log_path).read_text(errors="replace").splitlines() if x.strip()]
        except OSError:
            return ""
        text = lines[-1] if lines else ""
        return re.sub(r"^\S+:\d+: (GGML_ABORT )?", "", text)  # ggml's abort line: "file:line: message"

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)
        self.conn.close()
        if self.shm is not None:
            self.shm.close()
            self.shm.unlink()
            self.shm = None
        try:
            os.unlink(self.log_path)
        except OSError:
            pass


class RemoteEngine(Engine):
    """The engine of a model split over RPC servers, run in a worker process (see the module docstring)."""

    def __init__(self, spec: WorkerSpec, on_progress: Optional[ProgressFn] = None, probed: bool = False):
        super().__init__()
        self.spec = spec
        self.restarts = 0
        self._worker: Optional[_Worker] = None
        self._generation = 0  # counts workers: a sampler of a dead one is never called again
        self._start(on_progress, probed)

    def _start(self, on_progress: Optional[ProgressFn] = None, probed: bool = False, retry: bool = True) -> None:
        if not probed:
            probe_all(self.spec.servers)  # down, busy or not a server: one line, and no child is started
        worker = _Worker(self.spec)
        try:
            self.info: ModelInfo = worker.call("", progress=on_progress, timeout=START_TIMEOUT)
            worker.shm = shared_memory.SharedMemory(create=True, size=max(4, 4 * self.info.n_vocab))
            worker.call("attach", worker.shm.name)
        except EngineLostError as exc:
            worker.kill()
            if not retry:
                raise
            # a server that answered the probe and then refused or dropped the worker's connection: once more
            log.info("the RPC worker stopped while loading (%s); trying once more", exc)
            return self._start(on_progress, retry=False)
        except BaseException:
            worker.kill()
            raise
        self._logits = np.ndarray((self.info.n_vocab,), dtype=np.float32, buffer=worker.shm.buf)
        self._worker, self._generation = worker, self._generation + 1
        self._pieces: dict[int, bytes] = {}
        self.tokens, self.extra_cells = [], 0

    def _call(self, op: str, *args, **kw) -> Any:
        if self._worker is None:
            log.info("reconnecting to the RPC servers (%s)", ", ".join(map(str, self.spec.servers)))
            self._start()
            self.restarts += 1
        try:
            return self._worker.call(op, *args, **kw)
        except EngineLostError:
            self._worker, self.tokens, self.extra_cells = None, [], 0
            raise

    # -- tokenizer --------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self._call("tokenize", text) if text else []

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._call("token_bytes", token)
        return piece

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self._call("detokenize", list(tokens))

    # -- evaluation -------------------------------------------------------------------------------------------
    def _truncate(self, n_keep: int) -> Optional[bool]:
        if self._worker is None and n_keep == 0:
            self.tokens = []  # nothing cached anywhere: the next evaluation starts the worker
            return True
        done = self._call("truncate", n_keep)
        if done is not False:
            del self.tokens[n_keep:]
        return done

    def _eval(self, tokens: Sequence[int], *, cancel: Optional[threading.Event] = None,
              progress: Optional[ProgressFn] = None) -> None:
        tokens = list(tokens)
        try:
            self._call("eval", tokens, progress is not None, cancel=cancel, progress=progress)
        except EngineLostError:
            raise
        except ChatGLMError:  # a cancelled or failed batch: the child dropped it (or, unable to, all of its cache)
            del self.tokens[self._call("n_tokens"):]
            raise
        self.tokens.extend(tokens)
        self.n_evaluated += len(tokens)

    def logits(self) -> np.ndarray:
        if self._worker is None or not self.tokens:
            raise ModelRuntimeError("no logits available: nothing has been evaluated")
        return self._logits

    def all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        self.reset()
        out = self._call("all_logits", list(tokens))
        self.tokens = list(tokens)
        self.n_evaluated += len(tokens)
        return out

    def apply_lora(self, adapters) -> None:
        if adapters:
            self._call("apply_lora", [(Path(p), float(s)) for p, s in adapters])

    def sampler(self, params) -> "_RemoteSampler":
        return _RemoteSampler(self, self._call("sampler", params), self._generation)

    def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        try:
            worker.call("close", timeout=30)
        except ChatGLMError:
            pass
        finally:
            worker.kill()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class _RemoteSampler:
    def __init__(self, engine: RemoteEngine, key: int, generation: int):
        self.engine, self.key, self.generation = engine, key, generation

    def __call__(self) -> int:
        if self.engine._generation != self.generation or self.engine._worker is None:
            raise EngineLostError("the RPC engine was restarted during this generation")
        return self.engine._call("sample", self.key)

    def close(self) -> None:
        e = self.engine
        if e._worker is not None and e._generation == self.generation:
            e._call("sampler_close", self.key)

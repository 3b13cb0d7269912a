"""Fuzz targets: each feeds arbitrary bytes to one reader of untrusted input; only InputError may come out.

A target returns normally when the input was accepted or refused with :class:`chatglm.errors.InputError` (for the
server: answered with a 4xx JSON error in OpenAI's shape, or a success); anything else it raises is a finding, as are
a hang (the driver's per-execution time limit) and a crash of the process.

Used by tests/test_fuzz.py (hypothesis, bounded, in CI), tests/fuzz/run_atheris.py (coverage-guided, one target per
process) and benchmarks/fuzz.py (runs every target for a given time). Targets that need a checkpoint folder take the
first byte as the choice of folder and the rest as the file's bytes; every other file of the folder is a hard link to
a seed built by tests/fuzz/seeds.py.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import seeds as seedlib
from chatglm.errors import InputError


def silence_logs() -> int:
    """Refusals (and, in the server, logged 500s) come by the million: the targets report what matters themselves.
    Returns the level it replaced, for a caller that restores it (the test suite)."""
    logger = logging.getLogger("chatglm")
    previous = logger.level
    logger.setLevel(logging.CRITICAL)
    return previous


def _scratch() -> Path:
    """This process's scratch folder, in memory where possible. atheris leaves through ``_exit`` (no atexit), so the
    folders of processes that are gone are removed here."""
    parent = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()) / f"chatglm-fuzz-{os.getuid()}"
    parent.mkdir(exist_ok=True)
    for old in parent.iterdir():
        pid = old.name.split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_DIR = _scratch()
atexit.register(shutil.rmtree, _DIR, True)


class Finding(Exception):
    """A target's input got an answer that breaks the promise without raising (e.g. an HTTP 500)."""


@functools.cache
def seeds() -> seedlib.Seeds:
    return seedlib.build()


def _file(name: str, data: bytes) -> Path:
    path = _DIR / name
    path.write_bytes(data)
    return path


def _refused(fn: Callable[[], object]) -> None:
    try:
        fn()
    except InputError:
        pass


# --------------------------------------------------------------------------------------------- weight files


def safetensors(data: bytes) -> None:
    from chatglm.convert.safetensors_file import SafetensorsFile

    def run() -> None:
        st = SafetensorsFile(_file("x.safetensors", data))
        try:
            for name in st.infos():
                st.load(name)
        finally:
            st.close()

    _refused(run)


def _torch_file(path: Path) -> None:
    from chatglm.convert.torch_file import TorchFile

    reader = TorchFile(path)
    try:
        for name in reader.infos():
            reader.load(name)
    finally:
        reader.close()


def torch_pickle(data: bytes) -> None:
    """A PyTorch zip checkpoint whose data.pkl is the fuzzed bytes, with one 64-byte storage."""
    path = _DIR / "x.bin"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/data/0", bytes(64))
    _refused(lambda: _torch_file(path))


def torch_zip(data: bytes) -> None:
    """A whole ``pytorch_model.bin``: the zip container (directory, headers, CRCs, zip64 fields) and what it holds."""
    _refused(lambda: _torch_file(_file("whole.bin", data)))


# --------------------------------------------------------------------------------------------- GGUF


def gguf(data: bytes) -> None:
    from chatglm.gguf_file import read_header

    def run() -> None:
        header = read_header(_file("x.gguf", data))
        for key in header.kv:
            header.array(key)  # long arrays are read from the file here

    _refused(run)


def gguf_validate(data: bytes) -> None:
    """Everything run/info/bench/serve do with a GGUF before the first native call (which is left out)."""
    _refused(lambda: validate_gguf(_file("v.gguf", data)))


def validate_gguf(path: Path) -> None:
    from chatglm.cli.info import describe_file
    from chatglm.gguf_file import read_header
    from chatglm.runtime import loader
    from chatglm.runtime.memory import default_context

    header = read_header(path)
    loader.validate(header)  # the one validation step before any engine (GLM-1's included)
    loader.describe(header)
    default_context(header, "f16")
    describe_file(path, None, "f16")  # what `chatglm info` shows


def imatrix(data: bytes) -> None:
    """An importance matrix (either format) read and checked against the ChatGLM3 seed's tensors, as convert does."""
    from chatglm.convert.pipeline import importance_for

    _refused(lambda: importance_for(_file("imatrix", data), _imatrix_shapes()))


@functools.cache
def _imatrix_shapes() -> dict[str, tuple[int, ...]]:
    return seedlib.model_shapes(seeds().root / "glm3.gguf")


# --------------------------------------------------------------------------------------------- checkpoint folders


@functools.cache
def _workspace(folder: str, fuzzed: str) -> Path:
    """A copy of seed ``folder`` made of hard links, without ``fuzzed`` (written per execution)."""
    src = seeds().folder(folder)
    work = _DIR / f"ws-{folder}-{fuzzed}"
    work.mkdir()
    for item in src.iterdir():
        if item.name != fuzzed and item.is_file():
            try:
                os.link(item, work / item.name)
            except OSError:
                shutil.copyfile(item, work / item.name)
    return work


def convert_folder(folder: str, fuzzed: str, data: bytes, base: str | None = None) -> None:
    """``chatglm convert`` of seed ``folder`` whose file ``fuzzed`` holds ``data``, to f32 in a scratch file; with
    ``base``, ``folder`` is a LoRA adapter merged into the seed checkpoint ``base``."""
    from chatglm.convert.pipeline import convert

    work = _workspace(folder, fuzzed)
    (work / fuzzed).write_bytes(data)
    out = _DIR / f"out-{folder}"
    out.mkdir(exist_ok=True)
    model, lora = (work, ()) if base is None else (seeds().folder(base), (work,))
    try:
        _refused(lambda: convert(model, out / "model.gguf", "f32", lora=lora))
    finally:
        shutil.rmtree(out, ignore_errors=True)


@dataclass(frozen=True)
class FolderTarget:
    """Fuzzes one file of a checkpoint folder; the first byte of the input chooses among ``folders``. With ``base``,
    the folders are LoRA adapters merged into that seed checkpoint."""

    fuzzed: str
    folders: tuple[str, ...]
    base: str | None = None

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        convert_folder(self.folders[data[0] % len(self.folders)], self.fuzzed, data[1:], self.base)

    def seed_inputs(self) -> list[bytes]:
        return [bytes([i]) + (seeds().folder(f) / self.fuzzed).read_bytes() for i, f in enumerate(self.folders)]


config_json = FolderTarget("config.json", ("glm3", "glm4", "glm4-hf", "glm45", "glm1"))
tokenizer_config_json = FolderTarget("tokenizer_config.json", ("glm4", "glm4-hf", "glm3", "glm1"))
tokenizer_json = FolderTarget("tokenizer.json", ("glm4-hf", "glm45"))
spm_model = FolderTarget("tokenizer.model", ("glm3",))
tiktoken = FolderTarget("tokenizer.model", ("glm4",))
ice_model = FolderTarget("ice_text.model", ("glm1",))
adapter_config_json = FolderTarget("adapter_config.json", ("glm3-lora",), base="glm3")


# --------------------------------------------------------------------------------------------- chat files, replies


class CodePoints:
    """A tokenizer for prompt building without a model: one id per character."""

    @staticmethod
    def tokenize(text: str) -> list[int]:
        return [ord(c) for c in text]


@functools.cache
def _formats() -> list:
    """Every registered chat format, with every special token a format may need at ids above the code points."""
    from chatglm import families
    from chatglm.runtime import prompts

    special = {t: 0x110000 + i for i, t in enumerate(sorted(families.special_tokens()))}
    return [prompts.get_format(name, special) for name in sorted(families.chat_formats())]


def _chat_file(kind: int, path: Path) -> None:
    from chatglm.runtime.chatfiles import read_tools
    from chatglm.runtime.messages import Message
    from chatglm.runtime.chatfiles import read_conversation
    from chatglm.runtime.session import system_message

    if kind % 2 == 0:
        messages = read_conversation(path) + [Message("user", "hi")]
    else:
        messages = [m for m in (system_message(None, read_tools(path)), Message("user", "hi")) if m is not None]
    for fmt in _formats():
        _refused(lambda: fmt.prompt_ids(messages, CodePoints()))


def chat_files(data: bytes) -> None:
    """A conversation file (REPL ``/load``; first byte even) or a tools file (``--tools``; odd), then the prompt of
    every chat format built from it."""
    if data:
        _refused(lambda: _chat_file(data[0], _file("chat.json", data[1:])))


def reply(data: bytes) -> None:
    """Generated text (a model can emit anything) through every chat format's reply parser and visible-text filter."""
    text = data.decode("utf-8", "replace")
    for fmt in _formats():
        _refused(lambda: (fmt.parse_reply(text), fmt.visible(text)))


# --------------------------------------------------------------------------------------------- media


def media(data: bytes) -> None:
    """Image and audio bytes through load_media's format checks, as either kind (what libmtmd would decode)."""
    from chatglm.runtime.media import load_media

    for kind in ("image", "audio"):
        _refused(lambda: load_media(data, kind, name="fuzzed"))


def _media_seeds() -> list[bytes]:
    import numpy as np

    from chatglm.devtools import media_files as mf

    return [mf.png(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)), mf.jpeg(16, 8), mf.jpeg(8, 8, 1, 0xC2),
            mf.bmp(5, 3, 8), mf.gif(4, 3), mf.wav(64), mf.flac_header(), mf.mp3(2)]


# --------------------------------------------------------------------------------------------- server


@functools.cache
def _server():
    """A TestClient on the real app serving the tests' scripted ChatGLM3 model, ready, with a loopback Host."""
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from fixtures_server import ScriptedModel

    from chatglm.server.app import ServerConfig, create_app

    model = ScriptedModel()
    client = TestClient(create_app(lambda: [model], ServerConfig()), base_url="http://127.0.0.1:8000")
    client.__enter__()
    for _ in range(500):
        if client.get("/health").status_code == 200:
            break
        time.sleep(0.01)
    return client, model


ENDPOINTS = ("/v1/chat/completions", "/v1/completions")


def server(data: bytes) -> None:
    """A POST body (first byte: which endpoint) answered with a success or a 4xx error in OpenAI's shape."""
    if not data:
        return
    client, model = _server()
    path = ENDPOINTS[data[0] % len(ENDPOINTS)]
    r = client.post(path, content=data[1:], headers={"content-type": "application/json"})
    for log in (model.received, model.prompts, model.sampling):
        log.clear()
    if r.status_code >= 500 or r.status_code < 200:
        raise Finding(f"{path} answered {r.status_code}: {r.text[:200]}")
    if r.status_code >= 400:
        body = r.json()
        if not (isinstance(body, dict) and isinstance(body.get("error"), dict)
                and isinstance(body["error"].get("message"), str)):
            raise Finding(f"{path} answered {r.status_code} without an OpenAI error object: {r.text[:200]}")


def close() -> None:
    """Stop the server target's app if it was started (scratch files go at exit)."""
    if _server.cache_info().currsize:
        client, _ = _server()
        client.__exit__(None, None, None)
        _server.cache_clear()


# --------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Target:
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    covers: str
    json: bool = False  # the input is one byte (a choice) and a JSON document: mutate it structurally too


def _seed_files(*names: str, prefix: bytes = b"") -> Callable[[], list[bytes]]:
    return lambda: [prefix + seeds().file(n) for n in names]


def _server_seeds() -> list[bytes]:
    bodies = [seeds().file(p.name) for p in sorted(seeds().root.glob("request-*.json"))]
    return [bytes([0]) + b for b in bodies[:-1]] + [bytes([1]) + bodies[-1]]


def _chat_seeds() -> list[bytes]:
    return [bytes([0]) + seeds().file("conversation.json"), bytes([1]) + seeds().file("tools.json")]


TARGETS: dict[str, Target] = {
    "safetensors": Target(safetensors, _seed_files("x.safetensors"), "safetensors header and tensor loads"),
    "gguf": Target(gguf, _seed_files("header.gguf", "glm3.gguf"), "GGUF header reader (read_header, arrays)"),
    "gguf_validate": Target(gguf_validate, _seed_files("glm3.gguf", "glm4-hf.gguf", "glm45.gguf", "glm1.gguf"),
                            "everything run/info does before a native call"),
    "imatrix": Target(imatrix, _seed_files("imatrix.dat", "imatrix.gguf"), "importance matrices (.dat and GGUF)"),
    "pickle": Target(torch_pickle, _seed_files("data.pkl"), "the safe unpickler (data.pkl of a zip checkpoint)"),
    "torch_zip": Target(torch_zip, _seed_files("torch.bin"), "a whole .bin: zip container and pickle"),
    "config_json": Target(config_json, config_json.seed_inputs, "config.json through detection and conversion",
                          json=True),
    "tokenizer_config_json": Target(tokenizer_config_json, tokenizer_config_json.seed_inputs,
                                    "tokenizer_config.json through conversion", json=True),
    "tokenizer_json": Target(tokenizer_json, tokenizer_json.seed_inputs, "tokenizer.json (BPE vocab builder)",
                             json=True),
    "adapter_config_json": Target(adapter_config_json, adapter_config_json.seed_inputs,
                                  "a LoRA adapter_config.json (target_modules regex, patterns) merged by convert",
                                  json=True),
    "spm_model": Target(spm_model, spm_model.seed_inputs, "SentencePiece tokenizer.model (SPM vocab builder)"),
    "tiktoken": Target(tiktoken, tiktoken.seed_inputs, "tiktoken tokenizer.model (merges recovery)"),
    "ice_model": Target(ice_model, ice_model.seed_inputs, "ChatGLM-6B ice_text.model (GLM-1 vocab builder)"),
    "chat_files": Target(chat_files, _chat_seeds, "conversation and tools files through every chat format",
                         json=True),
    "reply": Target(reply, lambda: [r.encode("utf-8") for r in seedlib.REPLIES], "generated text through every chat format's reply parser"),
    "server": Target(server, _server_seeds, "HTTP request bodies of the OpenAI endpoints", json=True),
    "media": Target(media, _media_seeds, "image and audio bytes before libmtmd's decoders (load_media)"),
}

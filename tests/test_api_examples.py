"""The API documentation and the examples run: the README's Python API block, examples/stream_chat.py, and
examples/tk_chat.py against a stand-in tkinter (the examples' own code, with ``chatglm.load`` giving a toy model)."""

from __future__ import annotations

import io
import json
import re
import runpy
import sys
import time
import types
from pathlib import Path

import pytest
from fixtures_chat import toy_model

import chatglm

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def toy_load(monkeypatch):
    """``chatglm.load`` returns toy models; the list holds what it gave."""
    given = []

    def load(path=None, **kwargs):
        given.append(toy_model(**getattr(load, "toy", {})))
        return given[-1]

    monkeypatch.setattr(chatglm, "load", load)
    return load, given


def test_docs_python_block_runs(toy_load, tmp_path, monkeypatch, capsys):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    monkeypatch.chdir(tmp_path)
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.startswith("chatglm3 256\n") and "tokens/s" in out
    saved = json.loads((tmp_path / "conversation.json").read_text(encoding="utf-8"))
    assert [m["role"] for m in saved["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert toy_load[1][0].engine.closed


def test_stream_chat_example(toy_load, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["stream_chat.py"])
    monkeypatch.setattr(sys, "stdin", io.StringIO("你好\nagain\n"))
    runpy.run_path(str(ROOT / "examples" / "stream_chat.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.count("[7 tokens, stop]") == 2
    model = toy_load[1][0]
    assert model.engine.closed and model.last_reply.content in out


class Widget:
    """Just enough of a Tk widget for examples/tk_chat.py."""

    made: list = []

    def __init__(self, *_args, **options):
        self.options, self.text = dict(options), ""
        Widget.made.append(self)

    def pack(self, **_kw): ...
    def see(self, _index): ...
    def title(self, _text): ...
    def __getitem__(self, key): return self.options.get(key, "normal")
    def __setitem__(self, key, value): self.options[key] = value
    def insert(self, _index, text): self.text += text
    def get(self): return self.text
    def delete(self, *_range): self.text = ""
    def bind(self, event, fn): self.options[event] = fn
    def after(self, _ms, fn): self.options["after"] = fn

    def mainloop(self):
        log, entry, send, stop = Widget.made[1:5]

        def pump_until_idle(limit=5.0, stop_after=None):
            end = time.monotonic() + limit
            while send["state"] == "disabled" and time.monotonic() < end:
                self.options["after"]()
                if stop_after is not None and len(log.text) >= stop_after:
                    stop["command"]()
                time.sleep(0.005)

        entry.text = "hello"
        entry.options["<Return>"]()
        assert send["state"] == "disabled" and stop["state"] == "normal"
        pump_until_idle(stop_after=len(log.text) + 40)
        self.options["log"] = log.text


def test_tk_example_streams_and_stops(toy_load, monkeypatch):
    fake = types.ModuleType("tkinter")
    fake.Tk, fake.Text, fake.Entry, fake.Button = Widget, Widget, Widget, Widget
    monkeypatch.setitem(sys.modules, "tkinter", fake)
    monkeypatch.setattr(sys, "argv", ["tk_chat.py", "model.gguf"])
    Widget.made = []
    toy_load[0].toy = {"reply_len": None, "delay": 0.002, "n_ctx": 4096}
    start = time.monotonic()
    runpy.run_path(str(ROOT / "examples" / "tk_chat.py"), run_name="__main__")
    model, root = toy_load[1][0], Widget.made[0]
    assert time.monotonic() - start < 4.0
    assert model.last_stats.finish_reason == "cancelled" and 40 <= model.last_stats.generated_tokens < 500
    assert root.options["log"].startswith("\nYou: hello\nGLM: ") and len(root.options["log"]) > 50
    assert Widget.made[3]["state"] == "normal" and model.engine.closed

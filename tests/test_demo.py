"""The bundled demo model, through the same path `chatglm run` takes with no model: convert on first use, then chat."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from chatglm.cli.app import app
from chatglm.demo import demo_dir
from chatglm.runtime.messages import Message

EXPECTED = json.loads((demo_dir() / "expected.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    import os

    from chatglm import demo as demo_mod
    from chatglm import load

    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("CHATGLM_CACHE")
    os.environ["CHATGLM_CACHE"] = str(cache)
    try:
        path = demo_mod.demo_gguf()
        assert path.parent == cache and path.is_file()
        assert demo_mod.demo_gguf() == path  # converted once, then reused
        with load(None, n_threads=1) as m:
            yield m
    finally:
        if old is None:
            os.environ.pop("CHATGLM_CACHE", None)
        else:
            os.environ["CHATGLM_CACHE"] = old


@pytest.mark.parametrize("case", EXPECTED["cases"], ids=[c["name"] for c in EXPECTED["cases"]])
def test_demo_replies_match_the_reference(demo, case):
    messages = [Message.from_dict(m) for m in case["history"]] + [Message("user", case["query"])]
    assert demo.prompt_ids(messages) == case["prompt_ids"]  # token-exact ChatGLM3 prompt
    assert demo.chat(messages, temperature=0).content == case["reply"]
    assert demo.last_stats.finish_reason == "stop"  # it ended at <|user|>, as trained


def test_demo_answers_are_sensible(demo):
    assert "你好" in demo.chat([Message("user", "你好")], temperature=0).content
    assert "5" in demo.chat([Message("user", "What is 2+3?")], temperature=0).content


def test_run_without_a_model_uses_the_demo(demo, monkeypatch):
    import os

    monkeypatch.setenv("CHATGLM_CACHE", os.environ["CHATGLM_CACHE"])
    r = CliRunner().invoke(app, ["run", "-p", "What is 2+3?", "--temp", "0", "-t", "1"])
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "2 + 3 = 5."

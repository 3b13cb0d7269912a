"""`chatglm run`: the REPL's commands and flows in process (toy engine), then through a pseudo-terminal."""

from __future__ import annotations

import io
import json
import os
import re
import sys
import time
from pathlib import Path

import pexpect
import pytest
from fixtures_chat import chat_gguf, toy_model  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from chatglm.cli.app import app
from chatglm.cli.repl import HELP, LineEditor, Repl
from chatglm.runtime.messages import Message, ToolCall

HERE = Path(__file__).resolve().parent


class ScriptedEditor(LineEditor):
    """Lines typed in turn; a KeyboardInterrupt item is Ctrl-C (with ``pending`` text), the end is Ctrl-D."""

    def __init__(self, lines):
        super().__init__(None)
        self.lines, self.prompts, self._pending = list(lines), [], ""

    def read(self, prompt: str) -> str:
        self.prompts.append(prompt)
        if not self.lines:
            raise EOFError
        item = self.lines.pop(0)
        if isinstance(item, tuple):  # ("^C", text typed before it)
            self._pending = item[1]
            raise KeyboardInterrupt
        return item

    def pending(self) -> str:
        return self._pending


def run_repl(lines, **toy):
    session = toy_model(**toy).session()
    editor = ScriptedEditor(lines)
    Repl(session, editor=editor).run()
    return session, editor


def test_commands(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2", encoding="utf-8")
    saved = tmp_path / "conv.json"
    session, editor = run_repl([
        "/help", "/set temperature 0.5", "/set top_k many", "/set seed 7", "/set seed none", "/set max_tokens 4",
        "/set bogus 1", "/system be brief", "/system", "你好", '"""first line', "second line", 'end"""', "/show",
        f"/save {saved}", f"/load {bad}", "/bogus", "/clear", f"/load {saved}", "/exit", "never read",
    ])
    out, err = capsys.readouterr()
    assert HELP in err
    p = session.sampling
    assert (p.temperature, p.seed, p.max_tokens) == (0.5, None, 4)
    assert "error: /set top_k needs an integer, got 'many'" in err
    assert "error: unknown setting 'bogus'" in err
    assert "system: be brief" in err
    assert f"error: {bad}: not valid JSON" in err and "error: unknown command /bogus" in err
    assert "temperature=0.5" in out and "chatglm3 chat format" in out
    assert editor.lines == ["never read"] and "... " in editor.prompts
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert [m["role"] for m in data["messages"]] == ["system", "user", "assistant", "user", "assistant"]
    assert data["messages"][3]["content"] == "first line\nsecond line\nend"
    assert session.messages == [Message.from_dict(m) for m in data["messages"]]  # /load after /clear restored it
    assert f"loaded 5 messages from {saved}" in err


def test_ctrl_c_at_the_prompt(capsys):
    session, editor = run_repl(["hi", ("^C", "half typed"), '"""block', ("^C", ""), "again", ("^C", ""), "unread"])
    assert [m.content for m in session.messages if m.role == "user"] == ["hi", "again"]
    assert editor.lines == ["unread"]  # Ctrl-C at an empty prompt left


def test_tool_call_asks_for_the_observation(tmp_path, capsys):
    call = "get_weather\n```python\ntool_call(city='巴黎')\n```"
    script = [*call.encode(), 256 + 5]  # then <|observation|>
    session = toy_model(script=script).session(tools=[{"name": "get_weather", "parameters": {}}])
    Repl(session, editor=ScriptedEditor(["weather?", "sunny, 25C"])).run()
    err = capsys.readouterr().err
    assert '[tool call] get_weather({"city": "巴黎"})' in err
    roles = [m.role for m in session.messages]
    assert roles[:4] == ["system", "user", "assistant", "observation"] and session.messages[3].content == "sunny, 25C"
    assert session.messages[2].tool_calls == [ToolCall("get_weather", {"city": "巴黎"})]


def test_overflow_is_told_once(capsys):
    session, _ = run_repl([f"question number {i}" for i in range(12)], n_ctx=96, reply_len=8)
    err = capsys.readouterr().err
    assert err.count("outgrew the context of 96 tokens") == 1
    assert session.dropped_messages >= 4 and session.messages[-2].content == "question number 11"


# ------------------------------------------------------------------------------------------------ the command line


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_one_shot_json_and_tools(chat_gguf, tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([{"name": "get_weather", "description": "weather", "parameters": {}}]))
    r = invoke("run", chat_gguf, "-p", "你好", "--json", "-n", "5", "--temp", "0", "-t", "1", "--tools", tools)
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["reply"]["role"] == "assistant" and data["usage"]["completion_tokens"] <= 5
    assert set(data["timings"]) == {"load_s", "prefill_tokens_per_s", "decode_tokens_per_s"}


def test_one_shot_verbose_shows_speed(chat_gguf):
    r = invoke("run", chat_gguf, "-p", "hi", "-n", "3", "--temp", "0", "-t", "1", "--verbose")
    assert r.exit_code == 0, r.output
    assert re.search(r"\[loaded \S+ in [0-9.]+ s\]", r.stderr)
    speed = r"\[prompt \d+ tokens \(\d+ evaluated, [0-9.]+ tok/s\), reply 3 tokens \([0-9.]+ tok/s\)"
    assert re.search(speed, r.stderr)


def test_piped_input_gets_replies_without_prompts(chat_gguf):
    r = runner.invoke(app, ["run", str(chat_gguf), "-n", "3", "--temp", "0", "-t", "1"],
                      input="hi\n/set top_k 5\nthanks\n")
    assert r.exit_code == 0, r.output
    assert ">>>" not in r.stdout and r.stdout.endswith("\n") and "top_k = 5" in r.stderr


@pytest.mark.parametrize("args, message", [
    (["--json"], "error: --json needs -p PROMPT"),
    (["--tools", "{missing}"], "error: {missing}: file not found"),
    (["--tools", "{notlist}"], "error: {notlist}: expected a list of tools"),
])
def test_run_bad_options(chat_gguf, tmp_path, args, message):
    notlist = tmp_path / "tools.json"
    notlist.write_text('{"name": "x"}')
    names = {"missing": tmp_path / "nope.json", "notlist": notlist}
    r = invoke("run", chat_gguf, *[a.format(**names) for a in args])
    assert r.exit_code == 2 and message.format(**names) in r.output


def test_run_rejects_a_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf at all")
    r = invoke("run", path, "-p", "hi")
    assert r.exit_code == 2 and f"error: {path}: not a GGUF file" in r.output


# ------------------------------------------------------------------------------------------- a pseudo-terminal


def spawn(args, tmp_path):
    env = {**os.environ, "CHATGLM_CACHE": str(tmp_path / "cache"), "TERM": "dumb", "PYTHONIOENCODING": ""}
    return pexpect.spawn(sys.executable, args, cwd=str(tmp_path), env=env, encoding="utf-8", timeout=20,
                         dimensions=(50, 200))


def test_terminal_conversation(chat_gguf, tmp_path):
    (tmp_path / "bad.json").write_text('{"kind": "chatglm-conversation", "version": 1, "messages": [{"role": "x"}]}')
    c = spawn(["-m", "chatglm.cli", "run", str(chat_gguf), "--ctx", "256", "-n", "24", "--temp", "0", "-t", "1"],
              tmp_path)
    c.logfile_read = transcript = io.StringIO()
    c.expect("/help for commands")
    c.expect(">>> ")
    c.sendline("你好，世界")
    c.expect(">>> ")
    c.sendline("/set temperature 0")
    c.expect("temperature = 0.0")
    c.sendline('"""first line')
    c.expect(r"\.\.\. ")
    c.sendline('second line"""')
    c.expect(">>> ")
    c.sendline("/save conv.json")
    c.expect("saved 4 messages")
    c.sendline("/load bad.json")
    c.expect(r"bad.json: messages\[0\].role: unknown role 'x'")
    c.expect(">>> ")
    for i in range(8):  # 256 tokens hold about five rounds: the oldest go, with one note
        c.sendline(f"round {i}: tell me something about the number {i}")
        c.expect(">>> ")
    c.sendline("/show")
    c.expect("settings")
    c.expect(">>> ")
    c.sendeof()
    c.expect(pexpect.EOF)
    c.close()
    assert c.exitstatus == 0
    assert transcript.getvalue().count("outgrew the context of 256 tokens") == 1
    messages = json.loads((tmp_path / "conv.json").read_text(encoding="utf-8"))["messages"]
    assert [m["content"] for m in messages if m["role"] == "user"] == ["你好，世界", "first line\nsecond line"]


def test_terminal_ctrl_c(tmp_path):
    c = spawn([str(HERE / "fixtures_chat.py"), "0.01"], tmp_path)  # toy model: 10 ms a token, never stops itself
    c.expect(">>> ")
    c.sendline("tell me a long story")
    c.expect("tell me a long story\r\n")
    c.expect("[a-z]{5}")  # the reply is streaming
    start = time.monotonic()
    c.sendintr()
    c.expect(">>> ", timeout=2)
    assert time.monotonic() - start < 1.0
    c.sendline("and another")
    c.expect("[a-z]{3}")
    c.sendintr()
    c.expect(">>> ")
    c.send("typed but not sent")
    c.expect("not sent")  # readline has it on the line
    c.sendintr()
    c.expect(">>> ")  # Ctrl-C with text on the line clears it
    c.sendintr()
    c.expect(pexpect.EOF)  # Ctrl-C at an empty prompt leaves
    c.close()
    assert c.exitstatus == 0


def test_images_stand_where_typed_and_survive_save_and_load(tmp_path, capsys):
    """/image before a message puts the picture before its text; a /image line inside a multi-line message puts it
    there; /save and /load keep them (the toy engine sees no pixels: media_of is told the model takes them)."""
    from chatglm.devtools import media_files as mf

    import numpy as np

    first, second = tmp_path / "a.png", tmp_path / "b.png"
    first.write_bytes(mf.png(np.zeros((4, 6, 3), dtype=np.uint8)))
    second.write_bytes(mf.png(np.full((2, 3, 3), 200, dtype=np.uint8)))
    saved = tmp_path / "conv.json"
    session = toy_model().session()
    session.model.media_of = lambda messages: ()  # the toy model "takes" images (its prompts stay text)
    lines = [f"/image {first}", '"""Compare', f"/image {second}", "with", f"  /image {first}  ", 'this"""',
             '"""/image missing.png', 'not sent"""', f"/save {saved}", "/clear", f"/load {saved}", "/exit"]
    Repl(session, editor=ScriptedEditor(lines)).run()
    err = capsys.readouterr().err
    assert f"attached {first} (6x4) to the next message" in err
    assert "error: missing.png: file not found" in err
    user = [m for m in session.messages if m.role == "user"]
    assert len(user) == 1 and user[0].content == "Compare\nwith\nthis"
    assert [(x.path, x.offset) for x in user[0].media] == [(str(first), 0), (str(second), 8), (str(first), 13)]
    assert f"loaded 2 messages from {saved}" in err  # /load after /clear brought the images back
    parts = json.loads(saved.read_text(encoding="utf-8"))["messages"][0]["content"]
    assert [p.get("text", p["type"]) for p in parts] == ["image", "Compare\n", "image", "with\n", "image", "this"]

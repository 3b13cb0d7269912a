"""Issue 16, "seen as a new user": what a plain `chatglm run` shows, the installed wheel, chat files of the wrong shape.

- the GLM-1 engine's ``repack:`` lines stay out of a plain run (ggml's log goes to logging, at debug level);
- a wheel built from the tree carries the demo model, and `chatglm run -p` answers from an installed copy;
- context notes stand on their own line on stderr (and in ``--json``'s ``notes``), never inside the reply;
- a tools file (``run --tools``) or conversation file (the REPL's ``/load``) of the wrong shape is one line naming the
  file and the field: exit 2 on the command line; in the REPL the chat goes on with its history.

Every input is made here; the cases that reach native code or another interpreter run in child processes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from fixtures_chat import chat_gguf, toy_model  # noqa: F401  (fixtures)
from hostile import ROOT, assert_refused, cli, digest

from chatglm.cli.repl import LineEditor, Repl
from chatglm.demo import DEMO_FILES, demo_dir

# ------------------------------------------------------------------------------------- GLM-1: ggml's log stays quiet


@pytest.fixture(scope="module")
def glm1_q4(tmp_path_factory) -> Path:
    """A tiny ChatGLM-6B in q4_0 with rows wide enough for the CPU backend's repacked q4_0 kernels."""
    from chatglm.convert.pipeline import convert
    from chatglm.devtools.glm1 import tiny_glm1_checkpoint, train_ice_tokenizer

    folder = tmp_path_factory.mktemp("glm1q4")
    tok = train_ice_tokenizer(folder / "ice_text.model")
    ckpt, _, _ = tiny_glm1_checkpoint(folder / "ckpt", tok, seed=0, hidden_size=256)
    return convert(ckpt, folder / "glm1-q4_0.gguf", "q4_0").path


def run_child(args, *, env=None, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("CHATGLM_DEBUG", None)
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=cwd, stdin=subprocess.DEVNULL)


def test_glm1_run_prints_only_the_answer(glm1_q4):
    r = run_child(["-m", "chatglm.cli", "run", str(glm1_q4), "-p", "hi", "-n", "4", "--temp", "0", "-t", "1"])
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout.endswith("\n"), (r.stdout, r.stderr)
    verbose = run_child(["-m", "chatglm.cli", "run", str(glm1_q4), "-p", "hi", "-n", "4", "--temp", "0", "-t", "1",
                         "--verbose"])
    assert verbose.returncode == 0 and "repack: repack tensor" not in verbose.stderr, verbose.stderr
    assert "[loaded glm1-q4_0.gguf" in verbose.stderr


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the process's mappings (Linux)")
def test_one_copy_of_ggml_in_the_process():
    code = ("from chatglm.runtime.llama_native import lib; lib()\n"
            "from chatglm.ggml import lib as g; g.base(); g.cpu(); g.ggml()\n"
            "import os\n"
            "maps = {l.split()[-1] for l in open('/proc/self/maps') if 'libggml' in l}\n"
            "print(sorted(os.path.basename(p).split('.so')[0] for p in maps))\n")
    r = run_child(["-c", code])
    assert r.returncode == 0, r.stderr
    # a build with GGML_RPC (README, .ci/run) also maps the RPC backend's own library, once
    assert r.stdout.strip() in ("['libggml', 'libggml-base', 'libggml-cpu']",
                                "['libggml', 'libggml-base', 'libggml-cpu', 'libggml-rpc']"), r.stdout


# ------------------------------------------------------------------------------------- the demo model in the wheel


def test_installed_wheel_carries_the_demo_and_answers(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "chatglm", src / "chatglm", ignore=shutil.ignore_patterns("__pycache__", "*.gguf"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=180)
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("chatglm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"chatglm/models/demo/{n}" for n in DEMO_FILES} <= names, sorted(names)

    site = tmp_path / "site"
    installed = subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                               capture_output=True, text=True, timeout=180)
    assert installed.returncode == 0, installed.stderr
    env = {"PYTHONPATH": str(site), "CHATGLM_CACHE": str(tmp_path / "cache")}
    where = run_child(["-c", "import chatglm.demo as d; print(d.demo_dir())"], env=env, cwd=tmp_path)
    assert where.stdout.strip() == str(site / "chatglm" / "models" / "demo"), where.stdout + where.stderr
    expected = json.loads((demo_dir() / "expected.json").read_text("utf-8"))
    greeting = next(c for c in expected["cases"] if c["query"] == "你好" and not c["history"])
    r = run_child(["-m", "chatglm.cli", "run", "-p", "你好", "--temp", "0", "-t", "1"], env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == greeting["reply"] and r.stderr == "", (r.stdout, r.stderr)


def test_missing_demo_files_are_named(tmp_path, monkeypatch):
    from chatglm import demo

    fake = tmp_path / "chatglm" / "demo.py"
    (tmp_path / "chatglm" / "models" / "demo").mkdir(parents=True)
    monkeypatch.setattr(demo, "__file__", str(fake))
    with pytest.raises(demo.ChatGLMError, match="bundled demo model is incomplete .* lacks config.json"):
        demo.demo_dir()


# ------------------------------------------------------------------------------------- context notes


class Lines(LineEditor):
    """Typed lines in turn, then Ctrl-D."""

    def __init__(self, lines):
        super().__init__(None)
        self.lines = list(lines)

    def read(self, prompt: str) -> str:
        if not self.lines:
            raise EOFError
        return self.lines.pop(0)


def test_repl_overflow_note_is_its_own_line(monkeypatch):
    screen = io.StringIO()  # stdout and stderr interleaved, as a terminal shows them
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(sys, "stderr", screen)
    session = toy_model(n_ctx=96, reply_len=8).session()
    Repl(session, editor=Lines([f"question number {i}" for i in range(8)])).run()
    lines = screen.getvalue().splitlines()[1:]  # after the banner: replies and notes
    notes = [line for line in lines if "outgrew the context" in line]
    assert notes and notes[0].startswith("note: the conversation outgrew the context of 96 tokens; its ")
    assert len(notes) == 1 and all(line.isalpha() for line in lines if line and not line.startswith("note: ")), lines
    assert all(m.content.isalpha() for m in session.messages if m.role == "assistant")


def test_run_cut_off_note_is_on_stderr_and_in_json(chat_gguf):
    args = ["run", chat_gguf, "-p", "hi", "--ctx", "256", "--temp", "0", "-t", "1"]
    r = run_child(["-m", "chatglm.cli", *map(str, args)])
    assert r.returncode == 0, r.stderr
    assert r.stderr.splitlines() == ["note: the reply was cut off at the end of the context of 256 tokens "
                                     "(--ctx gives more)"], r.stderr
    assert "note" not in r.stdout and r.stdout.endswith("\n")
    j = run_child(["-m", "chatglm.cli", *map(str, args), "--json"])
    data = json.loads(j.stdout)
    assert data["finish_reason"] == "length" and data["notes"] == [
        "the reply was cut off at the end of the context of 256 tokens (--ctx gives more)"]
    assert "cut off" not in data["reply"]["content"] and j.stderr == ""


# ------------------------------------------------------------------------------------- tools files of the wrong shape

TOOLS_CASES = [
    ("null", "expected a list of tools (or an object with a \"tools\" list), got null"),
    ('{"name": "get_weather"}', "expected a list of tools (or an object with a \"tools\" list), got an object"),
    ('{"tools": {"name": "get_weather"}}', "tools: expected a list, got an object"),
    ('{"tools": null}', "tools: expected a list, got null"),
    ('[["get_weather", "weather"]]', "tools[0]: expected an object, got a list"),
    ('[{"description": "no name"}]', "tools[0]: missing field 'name'"),
    ('[{"name": ""}]', "tools[0].name: a tool needs a non-empty name"),
    ('[{"name": 42}]', "tools[0].name: expected a string, got a number"),
    ('[{"name": "a"}, {"type": "function", "function": {"parameters": {}}}]', "tools[1].function: missing field"),
    ('[{"type": "function", "function": ["get_weather"]}]', "tools[0].function: expected an object, got a list"),
    ('[{"type": "python", "name": "x"}]', "tools[0].type: tool type 'python' is not supported"),
    ('[{"type": 1, "name": "x"}]', "tools[0].type: expected a string, got a number"),
    ('[{"name": "x", "description": ["d"]}]', "tools[0].description: expected a string, got a list"),
    ('[{"name": "x", "parameters": "{}"}]', "tools[0].parameters: expected an object, got a string"),
    ('[{"name": "x"}, 7]', "tools[1]: expected an object, got a number"),
    ("[" * 100_000, "nested more than 100 levels deep"),
    ("[" + "9" * 5000 + "]", "not valid JSON"),
    ("[{\"name\": \"x\",]", "not valid JSON: Expecting property name enclosed in double quotes at line 1"),
]


@pytest.mark.parametrize("text, problem", TOOLS_CASES, ids=[str(i) for i in range(len(TOOLS_CASES))])
def test_bad_tools_file_is_one_line(chat_gguf, tmp_path, text, problem):
    tools = tmp_path / "tools.json"
    tools.write_text(text, encoding="utf-8")
    sources = digest([tools])
    outcome = cli(["run", chat_gguf, "-p", "hi", "--tools", tools])
    assert_refused(outcome, tools, code=2, problem=problem, sources=sources)


# ------------------------------------------------------------------------------------- conversation files (/load)

GOOD = {"role": "user", "content": "hi"}
LOAD_CASES = [
    ("null", "not a conversation file: expected a list of messages or a conversation object, got null"),
    ("7", "not a conversation file: expected a list of messages or a conversation object, got a number"),
    ('{"kind": "chatglm-conversation", "version": "1", "messages": []}', "version: expected a number, got a string"),
    ('{"kind": "chatglm-conversation", "version": 1}', "missing field 'messages'"),
    ('{"kind": "chatglm-conversation", "version": 1, "messages": {"role": "user"}}',
     "messages: expected a list, got an object"),
    ('[["user", "hi"]]', "messages[0]: expected an object, got a list"),
    ('[null]', "messages[0]: expected an object, got null"),
    ('[{"content": "hi"}]', "messages[0]: missing field 'role'"),
    ('[{"role": ["user"], "content": "hi"}]', "messages[0].role: expected a string, got a list"),
    ('[{"role": "wizard", "content": "hi"}]', "messages[0].role: unknown role 'wizard'"),
    ('[{"role": "user"}]', "messages[0]: missing field 'content'"),
    ('[{"role": "user", "content": 5}]', "messages[0].content: expected a string, got a number"),
    ('[{"role": "user", "content": null}]', "messages[0].content: expected a string, got null"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": {"name": "f"}}]',
     "messages[1].tool_calls: expected a list, got an object"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"arguments": {}}]}]',
     "messages[1].tool_calls[0]: missing field 'name'"),
    ('[{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [{"name": "f", "arguments": 3}]}]',
     "messages[1].tool_calls[0].arguments: expected an object or a string, got a number"),
    ('[{"role": "system", "content": "", "tools": [{"description": "x"}]}]', "messages[0].tools[0]: missing field"),
    ('[{"role": "assistant", "content": "a", "metadata": 1}]', "messages[0].metadata: expected a string, got a number"),
    ('[{"role": "assistant", "content": "a", "thinking": true}]', "messages[0].thinking: expected a string, got"),
    ('{"kind": "chatglm-conversation", "version": 1, "messages": ' + "[" * 50_000, "not valid JSON"),
]


def test_repl_load_of_a_bad_file_keeps_the_chat(chat_gguf, tmp_path):
    """One REPL session loads every bad file in turn: one error line each, naming the file and the field, and the
    conversation typed before them is still there at the end."""
    files = []
    for i, (text, _) in enumerate(LOAD_CASES):
        path = tmp_path / f"conv{i}.json"
        path.write_text(text, encoding="utf-8")
        files.append(path)
    sources = digest(files)
    lines = ["hello there", *(f"/load {p}" for p in files), "/show"]
    outcome = cli(["run", chat_gguf, "-n", "3", "--temp", "0", "-t", "1"], input="\n".join(lines) + "\n")
    assert outcome.code == 0 and "Traceback" not in outcome.text, outcome.text
    errors = [line for line in outcome.text.splitlines() if line.startswith("error:")]
    assert len(errors) == len(LOAD_CASES), errors
    for line, path, (_, problem) in zip(errors, files, LOAD_CASES):
        assert line.startswith(f"error: {path}: ") and problem in line, (line, problem)
    assert "messages    2" in outcome.out  # the user's message and the reply: nothing replaced them
    assert digest(files) == sources


@pytest.mark.parametrize("text, problem", LOAD_CASES[:3] + LOAD_CASES[8:10])
def test_api_load_names_the_file_and_field(tmp_path, text, problem):
    from chatglm.errors import InputError

    path = tmp_path / "conv.json"
    path.write_text(text, encoding="utf-8")
    session = toy_model().session()
    session.chat("hi", max_tokens=2)
    before = session.messages
    with pytest.raises(InputError) as err:
        session.load(path)
    assert str(err.value).startswith(f"{path}: ") and problem in str(err.value)
    assert session.messages == before

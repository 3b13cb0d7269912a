"""Hostile destinations and option values: every output goes through one helper (``fsutil.atomic_path``).

A destination that is one of the inputs (same path, hard link, symbolic link, a shard, the tokenizer), or that exists
and is not a regular file (a folder, a device, a FIFO, a socket), is refused before anything is written. A run killed
mid-write leaves nothing visible; where a named partial file had to be used, the next run removes it (never one whose
writer still runs). Outputs follow the umask. Every command's bad option values are one ``error:`` line, exit 2.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chatglm import fsutil
from chatglm.errors import InputError
from hostile import ROOT, assert_nothing_at, assert_refused, cli, digest

SAME = "is the same file as"


def no_partials(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".partial")]


@pytest.fixture()
def ckpt(glm3, tmp_path) -> Path:
    """A private copy of the tiny ChatGLM3 checkpoint (links are made into it)."""
    return Path(shutil.copytree(glm3.ckpt, tmp_path / "ckpt"))


@pytest.fixture(scope="module")
def sharded(workdir, sp_model) -> Path:
    from conftest import make_tiny

    return make_tiny(workdir, sp_model, "chatglm3", shards=2, seed=3).ckpt


@pytest.fixture()
def gguf_copy(glm3_gguf, tmp_path) -> Path:
    return Path(shutil.copy(glm3_gguf, tmp_path / "model.gguf"))


# -- a destination that is an input ----------------------------------------------------------------------------

def _weights(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


@pytest.mark.parametrize("how", ["same path", "hard link", "symlink", "tokenizer", "symlink to tokenizer"])
def test_convert_never_writes_over_its_checkpoint(ckpt, tmp_path, how):
    weights, tok = _weights(ckpt), ckpt / "tokenizer.model"
    dest = {"same path": weights, "tokenizer": tok}.get(how, tmp_path / "out.gguf")
    if how == "hard link":
        os.link(weights, dest)
    elif how.startswith("symlink"):
        dest.symlink_to(tok if how.endswith("tokenizer") else weights)
    before = digest([ckpt, dest])
    r = cli(["convert", ckpt, "-o", dest, "-t", "q8_0"])
    assert_refused(r, dest, problem=SAME, sources=before)
    assert no_partials(ckpt) == [] and no_partials(tmp_path) == []


def test_convert_never_writes_over_a_shard(sharded, tmp_path):
    shard = sorted(sharded.glob("model-*-of-*.safetensors"))[1]
    link = tmp_path / "out.gguf"
    os.link(shard, link)
    before = digest([sharded])
    assert_refused(cli(["convert", sharded, "-o", shard]), shard, problem=f"{SAME} an input", sources=before)
    assert_refused(cli(["convert", sharded, "-o", link]), link, problem=f"{SAME} the input {shard}", sources=before)
    assert no_partials(sharded) == []


@pytest.mark.parametrize("how", ["same path", "hard link", "symlink"])
def test_quantize_never_writes_over_its_source(gguf_copy, tmp_path, how):
    dest = gguf_copy if how == "same path" else tmp_path / "q.gguf"
    if how == "hard link":
        os.link(gguf_copy, dest)
    elif how == "symlink":
        dest.symlink_to(gguf_copy)
    before = digest([gguf_copy])
    assert_refused(cli(["quantize", gguf_copy, dest, "q8_0"]), dest, problem=SAME, sources=before)
    assert no_partials(tmp_path) == []


def test_quantize_never_writes_over_its_imatrix(gguf_copy, tmp_path):
    imatrix = tmp_path / "imatrix.dat"
    imatrix.write_bytes(b"refused before it is read")
    before = digest([gguf_copy, imatrix])
    r = cli(["quantize", gguf_copy, imatrix, "q4_k_m", "--imatrix", imatrix])
    assert_refused(r, imatrix, problem=SAME, sources=before)


def test_a_conversation_is_never_saved_over_the_model(glm3_model, tmp_path):
    session = glm3_model.session()
    model = Path(glm3_model.info.path)
    before = digest([model])
    with pytest.raises(InputError, match=SAME):
        session.save(model)
    assert digest([model]) == before and no_partials(model.parent) == []


def test_lora_never_writes_over_its_adapter(glm3, ckpt, tmp_path):
    from test_lora import module_shapes, pick, write_adapter

    adapter = tmp_path / "adapter"
    write_adapter(adapter, pick(module_shapes(glm3.model), "query_key_value"))
    before = digest([ckpt, adapter])
    for dest in (adapter / "adapter_model.safetensors", _weights(ckpt)):
        assert_refused(cli(["lora", ckpt, adapter, "-o", dest]), dest, problem=SAME, sources=before)


def test_an_existing_unrelated_file_is_replaced(glm3, tmp_path):
    dest = tmp_path / "old.gguf"
    dest.write_bytes(b"an older output")
    r = cli(["convert", glm3.ckpt, "-o", dest, "-t", "f16"])
    assert r.code == 0, r.text
    assert dest.read_bytes()[:4] == b"GGUF" and no_partials(tmp_path) == []


# -- a destination that is not a regular file --------------------------------------------------------------------

def _special(kind: str, tmp_path: Path) -> Path:
    if kind == "directory":
        (tmp_path / "out").mkdir()
        return tmp_path / "out"
    if kind == "FIFO":
        os.mkfifo(tmp_path / "out.fifo")
        return tmp_path / "out.fifo"
    if kind == "socket":
        path = tmp_path / "out.sock"
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
        return path
    return Path("/dev/null")


KINDS = {"directory": "a directory", "FIFO": "a FIFO", "socket": "a socket", "/dev/null": "a character device"}


@pytest.mark.parametrize("kind", list(KINDS))
def test_special_destinations_are_refused_never_replaced(glm3, gguf_copy, tmp_path, kind):
    dest = _special(kind, tmp_path)
    mode = os.stat(dest).st_mode
    problem = f"the output path exists and is {KINDS[kind]}, not a regular file"
    for args in (["convert", glm3.ckpt, "-o", dest], ["quantize", gguf_copy, dest, "q8_0"]):
        r = cli(args, isolated=kind == "FIFO", timeout=60)  # a FIFO opened by mistake would block: in a child
        assert_refused(r, dest, problem=problem, sources=digest([glm3.ckpt, gguf_copy]))
        assert os.stat(dest).st_mode == mode and stat.S_IFMT(mode) != stat.S_IFREG
    assert no_partials(dest.parent) == []


@pytest.mark.parametrize("kind", ["directory", "FIFO", "/dev/null"])
def test_conversation_saves_use_the_same_checks(tmp_path, kind):
    dest = _special(kind, tmp_path)
    with pytest.raises(InputError, match=KINDS[kind]):
        with fsutil.atomic_output(dest) as fh:
            fh.write(b"{}")
    assert stat.S_IFMT(os.stat(dest).st_mode) != stat.S_IFREG


# -- permissions follow the umask --------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
@pytest.mark.parametrize("unnamed", [True, False])
def test_outputs_follow_the_umask(glm3, gguf_copy, tmp_path, monkeypatch, umask, unnamed):
    monkeypatch.setattr(fsutil, "USE_UNNAMED", unnamed and fsutil.USE_UNNAMED)
    old = os.umask(umask)
    try:
        converted, quantized = tmp_path / "c.gguf", tmp_path / "q.gguf"
        assert cli(["convert", glm3.ckpt, "-o", converted, "-t", "f16"]).code == 0
        assert cli(["quantize", gguf_copy, quantized, "q8_0"]).code == 0
        with fsutil.atomic_output(tmp_path / "chat.json") as fh:
            fh.write(b"{}")
    finally:
        os.umask(old)
    for path in (converted, quantized, tmp_path / "chat.json"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask, (path, oct(os.stat(path).st_mode))


# -- killed mid-write: nothing visible; a named partial is removed by the next run -------------------------------

FORCE_NAMED = ("import sys, chatglm.fsutil as f; f.USE_UNNAMED = False; from chatglm.cli.app import main; "
               "sys.argv = ['chatglm'] + sys.argv[1:]; main()")


def _writing(pid: int, folder: Path, named: bool) -> bool:
    """Whether the child has its temporary file open: a named partial, or an unnamed (O_TMPFILE) one."""
    if named:
        return bool(no_partials(folder))
    try:
        targets = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(t.startswith(f"{folder}/#") for t in targets)


def _kill_while_writing(ckpt: Path, dest: Path, named: bool) -> bool:
    """Start a conversion, SIGKILL it while its temporary file is open; False when it finished first."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    head = [sys.executable, "-c", FORCE_NAMED] if named else [sys.executable, "-m", "chatglm.cli"]
    proc = subprocess.Popen(head + ["convert", str(ckpt), "-o", str(dest), "-t", "q4_0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        if _writing(proc.pid, dest.parent, named):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    dest.unlink(missing_ok=True)
    return False


@pytest.mark.parametrize("named", [False, True], ids=["unnamed", "named"])
def test_killed_mid_write_leaves_nothing_after_the_next_run(glm3, tmp_path, named):
    out = tmp_path / "out"
    out.mkdir()
    dest = out / "killed.gguf"
    if not named and not fsutil.USE_UNNAMED:
        pytest.skip("no O_TMPFILE here")
    assert any(_kill_while_writing(glm3.ckpt, dest, named) for _ in range(3)), "never caught it writing"
    assert not dest.exists()
    if named:
        assert len(no_partials(out)) == 1  # what the next run has to clean up
    else:
        assert list(out.iterdir()) == []  # the unnamed file vanished with the process
    r = cli(["convert", glm3.ckpt, "-o", dest, "-t", "q4_0"], isolated=True, timeout=120)
    assert r.code == 0, r.text
    assert sorted(p.name for p in out.iterdir()) == ["killed.gguf"]


def _partial(dest: Path, token: str, age: float = 3600) -> Path:
    path = dest.with_name(f".{dest.name}.{token}.partial")
    path.write_bytes(b"half")
    past = time.time() - age
    os.utime(path, (past, past))
    return path


def test_only_abandoned_partials_of_this_destination_are_removed(tmp_path):
    dest = tmp_path / "x.gguf"
    stale = _partial(dest, "abcd1234")
    running = _partial(dest, "zzzz9999")
    young = _partial(dest, "young___", age=-60)  # newer than this process: possibly a run that just started
    other = _partial(tmp_path / "y.gguf", "abcd1234")
    foreign = [_partial(dest, "short"), tmp_path / ".x.gguf.abcd1234.partial.keep", tmp_path / "x.gguf.partial"]
    for f in foreign[1:]:
        f.write_bytes(b"not ours")
    folder = dest.with_name(".x.gguf.dir00000.partial")
    folder.mkdir()
    link = dest.with_name(".x.gguf.link0000.partial")
    link.symlink_to(other)
    fd = os.open(running, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the writer of a run in progress holds it
        assert fsutil.remove_stale_partials(dest) == [stale]
    finally:
        os.close(fd)
    assert all(p.exists() or p.is_symlink() for p in [running, young, other, folder, link, *foreign])
    assert fsutil.remove_stale_partials(dest) == [running]  # its writer is gone now


def test_two_runs_at_once_do_not_remove_each_others_partials(glm3, tmp_path):
    """Two conversions to one destination in parallel (forced named partials): both finish, one file stays."""
    dest = tmp_path / "both.gguf"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", FORCE_NAMED, "convert", str(glm3.ckpt), "-o", str(dest),
                               "-t", "q4_0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["both.gguf"]


def test_unwritable_folder_is_one_line(glm3, tmp_path):
    dest = tmp_path / "missing" / "x.gguf"
    assert_refused(cli(["convert", glm3.ckpt, "-o", dest]), dest, code=3, problem="cannot write here")
    assert_nothing_at(dest)


# -- option values: one error line, exit 2, for every command ----------------------------------------------------

M, T = "m.gguf", "t.txt"  # never opened: options are checked first
BAD_OPTIONS = [
    (["run", M, "--threads", "0"], "--threads", "must be between 1 and 512, got 0"),
    (["run", M, "-t", "-1"], "--threads", "must be between 1 and 512, got -1"),
    (["run", M, "-t", "abc"], "--threads", "valid integer"),
    (["run", M, "--kv-type", "banana"], "--kv-type", "'banana' is not one of 'f16', 'f32'"),
    (["run", M, "-v", "--kv-type", "banana"], "--kv-type", "'banana' is not one of"),
    (["run", M, "-n", "-1"], "--max-tokens", "must be between 0 and 16777216, got -1"),
    (["run", M, "--ctx", "0"], "--ctx", "must be between 1 and 16777216, got 0"),
    (["run", M, "--ctx", str(10**9)], "--ctx", "got 1000000000"),
    (["run", M, "--temp", "-0.5"], "--temp", "must be between 0 and 100, got -0.5"),
    (["run", M, "--temp", "nan"], "--temp", "must be a finite number, got nan"),
    (["run", M, "--top-p", "1.5"], "--top-p", "must be between 0 and 1, got 1.5"),
    (["run", M, "--top-k", "-1"], "--top-k", "got -1"),
    (["run", M, "--repeat-penalty", "inf"], "--repeat-penalty", "must be a finite number, got inf"),
    (["run", M, "--seed", "-1"], "--seed", "must be between 0 and 4294967295, got -1"),
    (["run", M, "--seed", str(2**32)], "--seed", "got 4294967296"),
    (["run", M, "-ngl", "-2"], "--n-gpu-layers", "got -2"),
    (["run", M, "--lora-scale", "nan"], "--lora-scale", "finite"),
    (["run", M, "--lora-scale", "1e9"], "--lora-scale", "must be between -1000 and 1000"),
    (["run", M, "--no-such-option"], "--no-such-option", "No such option"),
    (["info", M, "--kv-type", "banana"], "--kv-type", "'banana' is not one of"),
    (["info", M, "--ctx", "-5"], "--ctx", "got -5"),
    (["serve", M, "--port", "70000"], "--port", "must be between 0 and 65535, got 70000"),
    (["serve", M, "--parallel", "0"], "--parallel", "must be between 1 and 64, got 0"),
    (["serve", M, "--queue-size", "-1"], "--queue-size", "got -1"),
    (["serve", M, "--api-key", ""], "--api-key", "must not be empty"),
    (["serve", M, "--model-id", " "], "--model-id", "must not be empty"),
    (["serve", M, "--host", ""], "--host", "must not be empty"),
    (["serve", M, "-t", "0"], "--threads", "got 0"),
    (["serve", M, "--kv-type", "q2_k"], "--kv-type", "'q2_k' is not one of"),
    (["serve", M, "-c", "0"], "--n-ctx", "got 0"),
    (["bench", M, "-r", "0"], "--repetitions", "must be between 1 and 1000, got 0"),
    (["bench", M, "-p", "-1"], "--n-prompt", "got -1"),
    (["bench", M, "-n", str(10**9)], "--n-gen", "got 1000000000"),
    (["bench", M, "--seed", "-5"], "--seed", "got -5"),
    (["bench", M, "-t", "1000"], "--threads", "got 1000"),
    (["bench", M, "--kv-type", "f8"], "--kv-type", "'f8' is not one of"),
    (["perplexity", M, T, "-w", "1"], "--window", "must be between 2 and 16777216, got 1"),
    (["perplexity", M, T, "-s", "0"], "--stride", "got 0"),
    (["perplexity", M, T, "-ngl", "-7"], "--n-gpu-layers", "got -7"),
    (["perplexity", M, T, "--kv-type", "x"], "--kv-type", "'x' is not one of"),
    (["convert", "ckpt", "-t", "q9_9"], "--type", "'q9_9' is not one of 'f32', 'f16'"),
    (["convert", "ckpt", "--threads", "0"], "--threads", "got 0"),
    (["convert", "ckpt", "--lora-scale", "inf"], "--lora-scale", "finite"),
    (["quantize", M, "o.gguf", "q4_k_xl"], "QTYPE", "'q4_k_xl' is not one of"),
    (["quantize", M, "o.gguf", "q8_0", "--threads", "-3"], "--threads", "got -3"),
    (["lora", "ckpt", "adapter", "-t", "bf16"], "--type", "'bf16' is not one of 'f32', 'f16'"),
    (["lora", "ckpt"], "adapter_dir", "Missing argument"),
]


@pytest.mark.parametrize("args,name,problem", BAD_OPTIONS, ids=[" ".join(a) for a, _, _ in BAD_OPTIONS])
def test_bad_option_values_are_one_line(tmp_path, args, name, problem):
    r = cli([str(tmp_path / a) if a in (M, T) else a for a in args])
    assert_refused(r, name, problem=problem)
    assert "Usage:" not in r.text and "╭" not in r.text


@pytest.mark.parametrize("args", [["run", "--threads", "0"], ["info", "x.gguf", "--kv-type", "banana"],
                                  ["quantize", "a", "b", "nope"]])
def test_bad_options_through_the_real_entry_point(args):
    r = cli(args, isolated=True, timeout=60)
    assert_refused(r, args[-2] if args[-2].startswith("-") else "QTYPE")
    assert r.out == "" and "Usage:" not in r.err


def test_choices_are_case_insensitive_and_reach_the_library_as_strings(glm3, tmp_path):
    dest = tmp_path / "x.gguf"
    r = cli(["convert", glm3.ckpt, "-o", dest, "-t", "Q8_0"])
    assert r.code == 0 and "q8_0" in r.out, r.text
    r = cli(["info", dest, "--kv-type", "Q8_0", "--json"])
    assert r.code == 0 and '"kv_type": "q8_0"' in r.out, r.text

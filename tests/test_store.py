"""The local model store: names, manifests, list/show/rm, and a store name wherever a model path is taken."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chatglm.cli.app import app
from chatglm.errors import InputError, OutputError
from chatglm.store import Ref, Store, home, parse_ref, resolve

runner = CliRunner()
NAME = "THUDM/tiny-glm3"
SOURCE = {"repo": NAME, "revision": "0123abcd"}


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def store(tmp_path, monkeypatch) -> Store:
    monkeypatch.setenv("CHATGLM_HOME", str(tmp_path / "home"))
    return Store()


@pytest.fixture
def stored(store, glm3_gguf) -> Store:
    store.add_file(Ref(NAME, "f32"), glm3_gguf, {"source": SOURCE, "files": {"config.json": "ab" * 32}})
    return store


def test_home_follows_chatglm_home_else_the_user_data_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATGLM_HOME", str(tmp_path))
    assert home() == tmp_path
    monkeypatch.delenv("CHATGLM_HOME")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert home() == tmp_path / "data" / "chatglm"


@pytest.mark.parametrize("text, ref", [("glm-4-9b-chat", Ref("glm-4-9b-chat")), ("a/b:Q4_K_M", Ref("a/b", "q4_k_m")),
                                        ("zai-org/GLM-4.7-Flash:q8_0", Ref("zai-org/GLM-4.7-Flash", "q8_0"))])
def test_names_parse(text, ref):
    assert parse_ref(text) == ref


@pytest.mark.parametrize("text", ["../x", "a/../b", "/abs", "a/b/c", "a/b:", "a/b:q4 k", "a\\b", ".hidden", "a/.",
                                  "", "a:b:c"])
def test_names_that_could_escape_or_are_malformed_are_refused(text, store):
    with pytest.raises(InputError, match="not a model name"):
        parse_ref(text)
    r = invoke("show", text)
    assert r.exit_code == 2 and "not a model name" in r.output and "Traceback" not in r.output
    assert not store.models.exists()


def test_add_writes_gguf_then_manifest(stored, glm3_gguf):
    entry = stored.find(NAME)  # the only type stored under the name
    assert entry.ref == f"{NAME}:f32" and entry.gguf == stored.models / "THUDM" / "tiny-glm3" / "f32.gguf"
    assert entry.gguf.read_bytes() == glm3_gguf.read_bytes()
    manifest = json.loads(entry.gguf.with_suffix(".json").read_text())
    assert manifest["source"] == SOURCE and manifest["type"] == "f32" and manifest["created"].endswith("Z")
    assert sorted(p.name for p in entry.gguf.parent.iterdir()) == ["f32.gguf", "f32.json"]  # no partial left


def test_a_failed_write_leaves_the_store_as_it_was(stored):
    before = sorted(p.relative_to(stored.root) for p in stored.models.rglob("*"))
    with pytest.raises(RuntimeError):
        with stored.adding(Ref(NAME, "q8_0"), {"source": SOURCE}) as tmp:
            Path(tmp).write_bytes(b"half a file")
            raise RuntimeError("disk full")
    assert sorted(p.relative_to(stored.root) for p in stored.models.rglob("*")) == before
    with pytest.raises(InputError, match="no such model"):
        stored.find(f"{NAME}:q8_0")


def _hold_lock(root: str, started, release) -> None:
    with Store(root).lock(NAME):
        started.set()
        release.wait(10)


def test_a_second_writer_of_a_name_waits_for_the_first(store):
    ctx = multiprocessing.get_context("fork")
    started, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(str(store.root), started, release))
    holder.start()
    try:
        assert started.wait(10)
        import fcntl

        fd = os.open(store.root / "locks" / "THUDM--tiny-glm3.lock", os.O_RDWR)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        release.set()
        holder.join(10)
    with store.lock(NAME):  # free again
        pass


def test_list_show_rm(stored):
    r = invoke("list")
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[0].split() == ["NAME", "TYPE", "SIZE", "MODIFIED"]
    assert r.output.splitlines()[1].split()[:2] == [NAME, "f32"]
    rows = json.loads(invoke("list", "--json").output)
    assert [(x["name"], x["type"], x["source"]) for x in rows] == [(NAME, "f32", SOURCE)]

    r = invoke("show", f"{NAME}:f32")
    assert r.exit_code == 0, r.output
    assert f"name           {NAME}:f32" in r.output and f"source         {NAME} @ 0123abcd" in r.output
    assert "architecture   chatglm" in r.output
    assert json.loads(invoke("show", NAME, "--json").output)["store"]["source"] == SOURCE

    r = invoke("rm", NAME)
    assert r.exit_code == 0 and f"removed {NAME}:f32" in r.output
    assert not stored.models.joinpath("THUDM").exists()  # empty folders go too
    assert "no models in" in invoke("list").output
    r = invoke("rm", NAME)
    assert r.exit_code == 2 and "no such model in the store" in r.output


def test_a_corrupt_manifest_is_one_line_and_the_rest_is_listed(stored, glm3_gguf):
    stored.add_file(Ref("other", "f32"), glm3_gguf, {})
    bad = stored.manifest_path(Ref(NAME, "f32"))
    bad.write_text("{not json")
    r = invoke("list")
    assert r.exit_code == 0
    warnings = [line for line in r.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and str(bad) in warnings[0] and "not valid store manifest" in warnings[0]
    assert any(line.split()[:2] == ["other", "f32"] for line in r.output.splitlines())
    r = invoke("show", f"{NAME}:f32")
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and str(bad) in r.output


def test_several_types_need_one_named(stored, glm3_gguf):
    stored.add_file(Ref(NAME, "f16"), glm3_gguf, {})
    with pytest.raises(InputError, match=r"several types are stored \(f16, f32\)"):
        stored.find(NAME)
    assert stored.find(f"{NAME}:f16").type == "f16"


def test_a_store_name_works_where_a_path_does_and_a_path_wins(stored, glm3_gguf, tmp_path, monkeypatch):
    assert resolve(NAME) == stored.find(NAME).gguf
    assert resolve(glm3_gguf) == glm3_gguf
    monkeypatch.chdir(tmp_path)
    (tmp_path / "THUDM").mkdir()
    (tmp_path / "THUDM" / "tiny-glm3").write_bytes(glm3_gguf.read_bytes())  # a file of that name here wins
    assert resolve(NAME) == Path(NAME)
    assert resolve("missing.gguf") == Path("missing.gguf")  # left to the caller's "file not found"
    r = invoke("info", "missing.gguf")
    assert r.exit_code == 2 and "missing.gguf" in r.output and "store" not in r.output
    with pytest.raises(InputError, match="no such model in the store"):
        resolve("nothing/here")

    r = invoke("info", f"{NAME}:f32")
    assert r.exit_code == 0 and str(stored.find(NAME).gguf) in r.output
    r = invoke("run", f"{NAME}:f32", "-p", "hello", "--temp", "0", "-n", "3", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["usage"]["completion_tokens"] <= 3
    import chatglm

    with chatglm.load(f"{NAME}:f32", n_ctx=64, n_threads=1) as m:
        assert m.info.path == stored.find(NAME).gguf
    r = invoke("bench", "nothing/here", "-p", "8", "-n", "2")
    assert r.exit_code == 2 and "no such model in the store" in r.output


def test_a_store_that_cannot_be_written_is_one_error(tmp_path, glm3_gguf, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot lock the store"):
        Store(blocker).add_file(Ref(NAME, "f32"), glm3_gguf, {})

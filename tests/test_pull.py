"""`chatglm pull` against a local hub (tests/fixtures_hub.py, through HF_ENDPOINT): no network."""

from __future__ import annotations

import importlib
import json

import pytest
from typer.testing import CliRunner

from chatglm.cli.app import app
from tests.fixtures_hub import Hub

runner = CliRunner()
REPO = "THUDM/tiny-glm3"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def hub(glm3, glm3_gguf, tmp_path_factory):
    hub = Hub()
    hub.add(REPO, glm3.ckpt, {"modeling_chatglm.py": b"raise SystemExit('never run')\n"})
    gguf_dir = tmp_path_factory.mktemp("ggufrepo")
    (gguf_dir / "tiny-glm3-F32.gguf").write_bytes(glm3_gguf.read_bytes())
    (gguf_dir / "README.md").write_text("a GGUF repository\n")
    hub.add("someone/tiny-glm3-GGUF", gguf_dir)
    yield hub
    hub.close()


@pytest.fixture
def env(hub, tmp_path, monkeypatch):
    """A fresh store and Hugging Face cache per test, the hub at HF_ENDPOINT."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("CHATGLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    importlib.reload(constants)  # huggingface_hub reads its environment at import
    hub.requests.clear()
    yield tmp_path
    monkeypatch.undo()
    importlib.reload(constants)


def test_pull_converts_into_the_store_and_chats(env, hub):
    r = invoke("pull", f"{REPO}:q8_0")
    assert r.exit_code == 0, r.output
    assert f"pulled {REPO}:q8_0" in r.output
    fetched = {p.rsplit("/", 1)[-1] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    assert "modeling_chatglm.py" not in fetched and "config.json" in fetched and "model.safetensors" in fetched
    rows = json.loads(invoke("list", "--json").output)
    assert [(x["name"], x["type"], x["source"]["repo"]) for x in rows] == [(REPO, "q8_0", REPO)]
    manifest = json.loads((env / "home/models/THUDM/tiny-glm3/q8_0.json").read_text())
    assert manifest["source"]["revision"] == hub.sha(REPO) and "model.safetensors" in manifest["files"]
    assert not any(name.endswith(".py") for name in manifest["files"])
    r = invoke("run", f"{REPO}:q8_0", "-p", "hello", "--temp", "0", "-n", "3", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["reply"]["role"] == "assistant"


def test_a_cut_connection_resumes(env, hub, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # the tiny file arrives in several chunks
    hub.cut.add("model.safetensors")
    r = invoke("pull", f"{REPO}:f16")
    assert r.exit_code == 0, r.output
    ranges = [rng for m, p, rng in hub.requests if m == "GET" and p.endswith("/model.safetensors")]
    assert len(ranges) == 2 and ranges[0] == "" and ranges[1].startswith("bytes=") and ranges[1] != "bytes=0-"


@pytest.mark.parametrize("name, digest", [("model.safetensors", "sha256"), ("config.json", "sha1")])
def test_a_hash_mismatch_is_refused_and_nothing_enters_the_store(env, hub, name, digest):
    hub.corrupt.add(name)  # an LFS file (sha256) or a plain git blob (sha1)
    try:
        r = invoke("pull", f"{REPO}:q8_0")
    finally:
        hub.corrupt.clear()
    assert r.exit_code == 2 and f"does not match the hub's {digest}" in r.output, r.output
    errors = [line for line in r.output.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and name in errors[0] and "Traceback" not in r.output
    assert not (env / "home" / "models").exists() or not any((env / "home" / "models").rglob("*.json"))
    r = invoke("pull", f"{REPO}:q8_0")  # the bad file was removed from the cache: fetched again, now right
    assert r.exit_code == 0, r.output


def test_a_gguf_repository_is_taken_as_is(env, hub, glm3_gguf):
    r = invoke("pull", "someone/tiny-glm3-GGUF:F32")
    assert r.exit_code == 0, r.output
    stored = env / "home/models/someone/tiny-glm3-GGUF/f32.gguf"
    assert stored.read_bytes() == glm3_gguf.read_bytes()
    assert "source         someone/tiny-glm3-GGUF" in invoke("show", "someone/tiny-glm3-GGUF").output
    r = invoke("pull", "someone/tiny-glm3-GGUF:Q4_K_M")
    assert r.exit_code == 2 and "no GGUF of type q4_k_m in the repository (it has: tiny-glm3-F32.gguf)" in r.output


def test_offline_uses_the_cache_or_says_it_is_not_there(env, hub, monkeypatch):
    import huggingface_hub.constants as constants

    assert invoke("pull", f"{REPO}:q8_0").exit_code == 0
    invoke("rm", f"{REPO}:q8_0")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    importlib.reload(constants)
    hub.requests.clear()
    r = invoke("pull", f"{REPO}:q8_0")
    assert r.exit_code == 0, r.output
    assert hub.requests == []
    r = invoke("pull", "THUDM/not-cached")
    assert r.exit_code == 2 and "not in the Hugging Face cache" in r.output
    r = invoke("pull", "THUDM/not-cached:q9_z")  # a bad type is named first, not hidden behind the cache
    assert r.exit_code == 2 and "unknown type 'q9_z'" in r.output and "cache" not in r.output, r.output


@pytest.mark.parametrize("args, message", [
    (["THUDM/nothing-here"], "no such repository on the hub"),
    (["nonsense"], "unknown model name"),
    (["a/b/c:q4"], "not a model name"),
    (["../x"], "not a model name"),
    ([f"{REPO}:q9_z"], "unknown type 'q9_z'"),
])
def test_bad_names(env, args, message):
    r = invoke("pull", *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    assert len(r.output.strip().splitlines()) == 1


def test_list_known():
    r = invoke("pull", "--list-known")
    assert r.exit_code == 0 and any(line.split() == ["glm-4.7-flash", "zai-org/GLM-4.7-Flash"]
                                    for line in r.output.splitlines())

"""The Ollama API of `chatglm serve`, through the official `ollama` client, unchanged, on 127.0.0.1."""

from __future__ import annotations

import json

import ollama
import pytest

from fixtures_server import http, openai_client, serve

NAME = "tiny"


def store_pull(name: str):
    from chatglm.pull import pull

    return pull(name)


@pytest.fixture(scope="module")
def live(glm3_gguf):
    from chatglm.runtime.model import load

    with serve(lambda: [load(glm3_gguf, n_ctx=256, n_threads=1)], model_id=NAME, pull=store_pull) as live:
        assert live.wait_ready()["status"] == "ok"
        yield live


@pytest.fixture(scope="module")
def client(live):
    return ollama.Client(host=live.url)


OPTS = {"temperature": 0, "num_predict": 8, "seed": 1}


def test_chat_whole_and_streamed_agree(client):
    msgs = [{"role": "user", "content": "hello"}]
    whole = client.chat(model=NAME, messages=msgs, options=OPTS, stream=False, keep_alive="5m")
    assert whole.done and whole.message.role == "assistant" and whole.done_reason in ("stop", "length")
    assert 0 < whole.eval_count <= 8 and whole.prompt_eval_count > 0
    parts = list(client.chat(model=NAME, messages=msgs, options=OPTS, stream=True))
    assert parts[-1].done and not any(p.done for p in parts[:-1])
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].eval_count == whole.eval_count


def test_generate_whole_and_streamed_agree(client):
    whole = client.generate(model=NAME, prompt="hello", options=OPTS)
    assert whole.done and 0 < whole.eval_count <= 8
    parts = list(client.generate(model=NAME, prompt="hello", options=OPTS, stream=True))
    assert "".join(p.response for p in parts) == whole.response and parts[-1].done
    raw = client.generate(model=NAME, prompt="def f(x):", options=OPTS, raw=True)
    assert raw.done and raw.eval_count <= 8


def test_num_predict_bounds_the_reply(client):
    r = client.chat(model=NAME, messages=[{"role": "user", "content": "hi"}],
                    options={"temperature": 0, "num_predict": 2})
    assert r.eval_count <= 2


def test_list_show_ps_version(client, live):
    models = client.list().models
    assert [m.model for m in models] == [NAME] and models[0].details.format == "gguf"
    assert models[0].size > 0 and models[0].details.family
    shown = client.show(NAME)
    assert shown.details.format == "gguf" and shown.modelinfo["general.architecture"] == "chatglm"
    running = client.ps().models
    assert [m.model for m in running] == [NAME] and running[0].context_length == 256
    assert http().get(live.url + "/api/version").json()["version"]


def test_an_unknown_model_is_an_error_in_ollamas_shape(client, live):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nothing", messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 404 and "model 'nothing' not found" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nothing")
    assert err.value.status_code == 404
    r = http().post(live.url + "/api/chat", json={"model": NAME, "messages": "no"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = http().post(live.url + "/api/generate", json={"model": NAME, "prompt": "x", "options": {"temperature": 9}})
    assert r.status_code == 400 and "temperature" in r.json()["error"]


def test_ndjson_lines_on_the_wire(live):
    r = http().post(live.url + "/api/chat", json={"model": NAME, "messages": [{"role": "user", "content": "hi"}],
                                                  "options": OPTS})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[-1]["done"] is True and all(line["done"] is False for line in lines[:-1])


def test_the_openai_client_still_works(live):
    reply = openai_client(live).chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}],
                                                         max_tokens=4, temperature=0)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens <= 4


def test_pull_goes_to_the_store(client, glm3, tmp_path, monkeypatch):
    import importlib

    import huggingface_hub.constants as constants

    from chatglm.store import Store
    from tests.fixtures_hub import Hub

    hub = Hub()
    hub.add("THUDM/tiny-glm3", glm3.ckpt)
    monkeypatch.setenv("CHATGLM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    importlib.reload(constants)
    try:
        statuses = [p.status for p in client.pull("THUDM/tiny-glm3:q8_0", stream=True)]
        assert statuses == ["pulled THUDM/tiny-glm3:q8_0", "success"]
        assert Store().find("THUDM/tiny-glm3:q8_0").gguf.is_file()
        with pytest.raises(ollama.ResponseError) as err:
            client.pull("THUDM/none-such")
        assert err.value.status_code == 400 and "no such repository on the hub" in err.value.error
    finally:
        hub.close()
        monkeypatch.undo()
        importlib.reload(constants)


@pytest.fixture(scope="module")
def store_live(glm3_gguf, tmp_path_factory):
    """A server over a store of two models (the same tiny GGUF under two names), one resident at a time."""
    from chatglm.runtime.model import load
    from chatglm.store import Ref, Store

    store = Store(tmp_path_factory.mktemp("store"))
    for name in ("org/a", "org/b"):
        store.add_file(Ref(name, "f32"), glm3_gguf, {"source": {"repo": name}})
    opened = []

    def open_model(name):
        entry = store.find(name)
        opened.append(entry.ref)
        return entry.ref, load(entry.gguf, n_ctx=128, n_threads=1)

    with serve(lambda: [], open_model=open_model, max_models=1,
               list_store=lambda: [(e.ref, e.gguf) for e in store.entries()]) as live:
        assert live.wait_ready()["status"] == "ok"
        live.opened = opened
        yield live


def test_serving_the_store_loads_on_demand_and_unloads(store_live):
    import time

    client = ollama.Client(host=store_live.url)
    assert sorted(m.model for m in client.list().models) == ["org/a:f32", "org/b:f32"]
    assert client.ps().models == []
    msgs = [{"role": "user", "content": "hi"}]
    a = client.chat(model="org/a", messages=msgs, options=OPTS)
    assert a.model == "org/a:f32" and [m.model for m in client.ps().models] == ["org/a:f32"]
    client.chat(model="org/a:f32", messages=msgs, options=OPTS)  # resident: not loaded again
    assert store_live.opened == ["org/a:f32"]
    b = client.generate(model="org/b", prompt="hi", options=OPTS)  # --max-models 1: a makes room for b
    assert b.model == "org/b:f32" and [m.model for m in client.ps().models] == ["org/b:f32"]
    assert b.response == a.message.content or b.eval_count > 0
    assert client.show("org/a:f32").modelinfo["general.architecture"] == "chatglm"
    client.chat(model="org/b", messages=msgs, options=OPTS, keep_alive=0.3)
    deadline = time.monotonic() + 10
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.ps().models == []  # unloaded after its keep_alive
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="org/none", messages=msgs)
    assert err.value.status_code == 404 and "no such model in the store" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="org/a", messages=msgs, keep_alive="soon")
    assert err.value.status_code == 400 and "keep_alive" in err.value.error
    reply = openai_client(store_live).chat.completions.create(model="org/a", messages=msgs, max_tokens=3)
    assert reply.model == "org/a:f32"

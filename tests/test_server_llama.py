"""The server over a real llama.cpp model (the tiny random ChatGLM3 GGUF): the official client, streaming, usage,
stop strings, /v1/models, /v1/completions, and the bad requests of issue 8 each followed by a good one.

A random model's reply is gibberish, but a deterministic one: greedy decoding gives the same text every time, so the
streamed and the whole reply can be compared exactly.
"""

from __future__ import annotations

import json

import openai
import pytest
from fixtures_server import LLAMA_KEY, http, llama_server, openai_client, serve  # noqa: F401  (fixture)

AUTH = {"Authorization": f"Bearer {LLAMA_KEY}"}
GREEDY = {"model": "tiny", "temperature": 0, "max_tokens": 24}


@pytest.fixture(scope="module")
def client(llama_server):  # noqa: F811
    return openai_client(llama_server, api_key=LLAMA_KEY)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def content_of(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def assert_serving(live) -> None:
    """The next ordinary request succeeds."""
    r = http().post(live.url + "/v1/chat/completions", headers=AUTH,
                    json={"messages": user("ok?"), "max_tokens": 2})
    assert r.status_code == 200 and r.json()["object"] == "chat.completion"


# ------------------------------------------------------------------------------------------------ happy paths
def test_chat_counts_usage_and_reports_why_it_stopped(client, llama_server):  # noqa: F811
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "你好"}]
    r = client.chat.completions.create(messages=messages, **GREEDY)
    choice = r.choices[0]
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    assert choice.finish_reason in ("stop", "length") and isinstance(choice.message.content, str)
    model = llama_server.state.pool.first()
    assert r.usage.prompt_tokens == len(model.prompt_ids(messages))
    assert r.usage.completion_tokens == 24 if choice.finish_reason == "length" else r.usage.completion_tokens < 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_stream_gives_the_same_reply_as_a_whole_answer(client):
    whole = client.chat.completions.create(messages=user("今天天气"), **GREEDY)
    chunks = list(client.chat.completions.create(messages=user("今天天气"), stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert content_of(chunks) == whole.choices[0].message.content != ""
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_seeded_sampling_repeats(client):
    kw = {"model": "tiny", "messages": user("hello"), "temperature": 1.0, "max_tokens": 16}
    first = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    again = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    assert first == again


def test_token_by_token_streaming_and_stop_strings_on_llama(glm3_gguf):
    """The ChatGLM2 format shows every token as it comes (ChatGLM3 holds a reply's first line back)."""
    from chatglm.runtime.model import load

    with serve(lambda: [load(glm3_gguf, n_ctx=256, n_threads=1, chat_format="chatglm2")]) as live:
        live.wait_ready()
        client = openai_client(live)
        chunks = list(client.chat.completions.create(messages=user("hi"), stream=True, **GREEDY))
        text = content_of(chunks)
        deltas = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
        assert len(deltas) >= 8 and text == client.chat.completions.create(
            messages=user("hi"), **GREEDY).choices[0].message.content
        stop = text[len(text) // 2:len(text) // 2 + 2]
        cut = client.chat.completions.create(messages=user("hi"), stop=[stop], **GREEDY).choices[0]
        assert cut.message.content == text[:text.index(stop)] and cut.finish_reason == "stop"
        streamed = list(client.chat.completions.create(messages=user("hi"), stop=stop, stream=True, **GREEDY))
        assert content_of(streamed) == cut.message.content and streamed[-1].choices[0].finish_reason == "stop"


def test_models_lists_the_one_model(client, llama_server):  # noqa: F811
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"] and models.data[0].owned_by == "chatglm"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completions_plain_and_streamed(client):
    whole = client.completions.create(model="tiny", prompt="def f(x):", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage.completion_tokens <= 10 and whole.usage.prompt_tokens > 0
    chunks = list(client.completions.create(model="tiny", prompt="def f(x):", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert len([c for c in chunks if c.choices[0].text]) >= min(2, whole.usage.completion_tokens)  # piece by piece
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_health_reports_the_pool(llama_server):  # noqa: F811
    r = http().get(llama_server.url + "/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "instances": 1, "busy": 0, "queued": 0, "max_queue": 64}


# ------------------------------------------------------------------------------------------------ bad requests
BAD = [
    ("invalid JSON", {"content": b'{"messages": [', "headers": {"Content-Type": "application/json"}},
     400, None, "not valid JSON"),
    ("missing messages", {"json": {"model": "tiny"}}, 400, None, "messages: Field required"),
    ("unknown role", {"json": {"messages": [{"role": "wizard", "content": "x"}]}}, 400, None, "unknown role 'wizard'"),
    ("negative max_tokens", {"json": {"messages": user("x"), "max_tokens": -1}}, 400, None, "max_tokens"),
    ("40 MB body", {"json": {"messages": user("x" * (40 << 20))}}, 413, "request_too_large", "larger than"),
    ("wrong API key", {"json": {"messages": user("x")}, "headers": {"Authorization": "Bearer nope"}},
     401, "invalid_api_key", "invalid API key"),
    ("no API key", {"json": {"messages": user("x")}, "headers": {"Authorization": ""}},
     401, "invalid_api_key", "invalid API key"),
    ("prompt longer than the context", {"json": {"messages": user("你好 " * 300)}},
     400, "context_length_exceeded", "maximum context length is 256 tokens"),
    ("prompt longer than the context, streamed", {"json": {"messages": user("你好 " * 300), "stream": True}},
     400, "context_length_exceeded", "maximum context length"),
    ("conversation ending with the assistant", {"json": {"messages": [{"role": "user", "content": "a"},
                                                                      {"role": "assistant", "content": "b"}]}},
     400, None, "must end with a user"),
]  # fmt: skip


@pytest.mark.parametrize("name, request_kw, status, code, words", BAD, ids=[b[0] for b in BAD])
def test_bad_request_gets_its_status_and_error_body_and_the_server_goes_on(llama_server, name, request_kw,  # noqa: F811
                                                                           status, code, words):
    headers = {**AUTH, **request_kw.get("headers", {})}
    kw = {k: v for k, v in request_kw.items() if k != "headers"}
    r = http().post(llama_server.url + "/v1/chat/completions", headers=headers, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"
    assert_serving(llama_server)


def test_unknown_paths_and_methods_answer_in_the_openai_error_shape(llama_server):  # noqa: F811
    r = http().get(llama_server.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and json.loads(r.text)["error"]["message"] == "Not Found"
    r = http().get(llama_server.url + "/v1/chat/completions", headers=AUTH)
    assert r.status_code == 405 and "error" in r.json()
    assert_serving(llama_server)

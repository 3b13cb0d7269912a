"""The OpenAI API over a scripted model: tool-call round trips, cancellation, queueing, loading, auth, CORS.

A random tiny model cannot produce a real tool call, so these tests serve :class:`ScriptedModel`, whose replies are
fixed text parsed by the real ChatGLM3 chat format. The live llama.cpp path is in test_server_llama.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import openai
import pytest
from fixtures_server import ScriptedModel, answer, http, openai_client, serve, tool_call_reply

from chatglm.runtime.messages import ToolCall

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}
LONG = answer(" ".join(f"w{i}" for i in range(400)))


def post(live, body, **kwargs) -> httpx.Response:
    return http().post(live.url + "/v1/chat/completions", json=body, **kwargs)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def wait_until(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.005)


# -------------------------------------------------------------------------------------------------- tool calls
def test_tool_call_round_trip_with_the_openai_client():
    model = ScriptedModel([tool_call_reply("get_weather", city="Paris", unit="c"),
                           answer("It is 21 degrees in Paris.")])
    with serve([model]) as live:
        client = openai_client(live)
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        first = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL])
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}

        messages += [choice.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
        final = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER_TOOL])
        assert final.choices[0].message.content == "It is 21 degrees in Paris."
        assert final.choices[0].finish_reason == "stop" and not final.choices[0].message.tool_calls

    sent = model.received[1]
    assert [m.role for m in sent] == ["system", "user", "assistant", "observation"]
    assert sent[0].tools == [WEATHER_TOOL["function"]]
    assert sent[2].tool_calls == [ToolCall("get_weather", {"city": "Paris", "unit": "c"})]
    assert sent[3].content == '{"temperature": 21}'
    prompt = model.prompt_text(model.prompts[1])  # what the ChatGLM3 format rendered, token by token
    assert "<|assistant|>get_weather\n```python\ntool_call(city='Paris', unit='c')\n```" in prompt
    assert prompt.endswith('<|observation|>\n{"temperature": 21}<|assistant|>')
    assert '"name": "get_weather"' in prompt.split("<|user|>")[0]  # the tools, as JSON in the system turn


def test_streamed_tool_call_arrives_as_a_tool_calls_delta():
    model = ScriptedModel([tool_call_reply("get_weather", city="北京")])
    with serve([model]) as live:
        stream = openai_client(live).chat.completions.create(
            model="tiny", messages=user("北京天气"), tools=[WEATHER_TOOL], stream=True)
        chunks = list(stream)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].index == 0
    assert json.loads(calls[0].function.arguments) == {"city": "北京"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)


def test_tool_choice_none_offers_no_tools():
    model = ScriptedModel([answer("ok")])
    with serve([model]) as live:
        openai_client(live).chat.completions.create(model="tiny", messages=user("hi"), tools=[WEATHER_TOOL],
                                                    tool_choice="none")
    assert [m.role for m in model.received[0]] == ["user"]


# ------------------------------------------------------------------------------------------------ generation
def test_stop_strings_cut_the_reply_and_stop_the_model():
    model = ScriptedModel([answer("alpha beta END gamma delta"), answer("alpha beta END gamma delta")])
    with serve([model]) as live:
        client = openai_client(live)
        whole = client.chat.completions.create(model="tiny", messages=user("x"), stop=["END"])
        assert whole.choices[0].message.content == "alpha beta " and whole.choices[0].finish_reason == "stop"
        assert model.last_stats.finish_reason == "cancelled" and model.last_stats.generated_tokens <= 4
        chunks = list(client.chat.completions.create(model="tiny", messages=user("x"), stop="END", stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "alpha beta "
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_and_sampling_reach_the_model_and_length_is_reported():
    model = ScriptedModel([LONG])
    with serve([model]) as live:
        reply = openai_client(live).chat.completions.create(model="tiny", messages=user("x"), max_tokens=5,
                                                            temperature=0.3, top_p=0.5, seed=11)
    assert reply.choices[0].finish_reason == "length"
    assert reply.choices[0].message.content == "w0 w1 w2 w3 w4"  # one token per word
    assert reply.usage.completion_tokens == 5 and reply.usage.prompt_tokens == len(model.prompts[0])
    assert model.sampling[0] == {"max_tokens": 5, "temperature": 0.3, "top_p": 0.5, "seed": 11}


def test_completions_stream_piece_by_piece_and_honour_stop():
    model = ScriptedModel(["one two three four five", "one two three four five"])
    with serve([model]) as live:
        client = openai_client(live)
        chunks = list(client.completions.create(model="tiny", prompt="count:", stream=True,
                                                stream_options={"include_usage": True}))
        assert [c.choices[0].text for c in chunks] == ["one", " two", " three", " four", " five", ""]
        assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage.completion_tokens == 5
        cut = client.completions.create(model="tiny", prompt="count:", stop=[" four"])
        assert cut.choices[0].text == "one two three" and cut.choices[0].finish_reason == "stop"
        assert cut.usage.prompt_tokens == len("count:")
    assert model.last_stats.finish_reason == "cancelled"


def test_a_prompt_error_is_a_400_even_for_a_stream():
    with serve([ScriptedModel()]) as live:
        body = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "stream": True}
        r = post(live, body)
        assert r.status_code == 400 and "must end with a user" in r.json()["error"]["message"]
        assert post(live, {"messages": user("again")}).status_code == 200


def test_an_unexpected_failure_is_a_500_and_the_server_keeps_serving():
    class Flaky(ScriptedModel):
        fail = True

        def stream_chat(self, messages, **kwargs):
            if Flaky.fail:
                Flaky.fail = False
                raise ZeroDivisionError("boom")
            return super().stream_chat(messages, **kwargs)

    with serve([Flaky()]) as live:
        r = post(live, {"messages": user("x")})
        assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
        assert post(live, {"messages": user("x")}).json()["choices"][0]["message"]["content"]


# ------------------------------------------------------------------------------------ cancellation and the queue
def test_disconnecting_cancels_the_generation_within_a_token():
    model = ScriptedModel([LONG], token_delay=0.02)
    with serve([model]) as live:
        with http().stream("POST", live.url + "/v1/chat/completions",
                           json={"messages": user("x"), "stream": True}) as response:
            seen = 0
            for line in response.iter_lines():
                seen += '"content"' in line
                if seen >= 4:
                    break
            closed_at = time.monotonic()  # leaving the block closes the connection mid-stream
        assert model.finished.wait(3)
        late = [t for t in model.token_times if t > closed_at]
        assert model.last_stats.finish_reason == "cancelled"
        assert len(late) <= 1, f"{len(late)} tokens generated after the client left"
        wait_until(lambda: live.state.pool.busy == 0)
        assert post(live, {"messages": user("next")}).status_code == 200


def test_a_client_that_leaves_the_queue_is_never_served():
    gate = threading.Event()
    model = ScriptedModel([answer("first"), answer("second")], gate=gate)
    with serve([model]) as live:
        running = threading.Thread(target=post, args=(live, {"messages": user("running")}))
        running.start()
        assert model.started.wait(5)
        body = json.dumps({"messages": user("leaves"), "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", live.port)) as raw:
            raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: live.state.pool.queued == 1)
        wait_until(lambda: live.state.pool.queued == 0)
        gate.set()
        running.join(10)
        assert post(live, {"messages": user("after")}).json()["choices"][0]["message"]["content"] == "second"
    assert [m[-1].content for m in model.received] == ["running", "after"]


def test_a_full_queue_answers_429_and_then_drains():
    model = ScriptedModel([LONG], token_delay=0.01)
    with serve([model], max_queue=1) as live:
        results: dict[str, int] = {}

        def run(name: str) -> None:
            results[name] = post(live, {"messages": user(name), "max_tokens": 30}).status_code

        running = threading.Thread(target=run, args=("running",))
        running.start()
        assert model.started.wait(5)
        waiting = threading.Thread(target=run, args=("waiting",))
        waiting.start()
        wait_until(lambda: live.state.pool.queued == 1)
        rejected = post(live, {"messages": user("rejected")})
        running.join(10)
        waiting.join(10)
    assert rejected.status_code == 429 and rejected.headers["retry-after"] == "1"
    assert rejected.json()["error"]["code"] == "queue_full"
    assert results == {"running": 200, "waiting": 200}


def test_requests_are_served_one_at_a_time_in_arrival_order():
    gate = threading.Event()
    model = ScriptedModel([answer("slow " * 10)] * 4, token_delay=0.002, gate=gate)
    with serve([model]) as live:
        threads = []
        for i in range(4):
            threads.append(threading.Thread(target=post, args=(live, {"messages": user(f"q{i}")})))
            threads[-1].start()
            wait_until(lambda n=i + 1: live.state.pool.busy + live.state.pool.queued == n)
        assert live.state.pool.status()["queued"] == 3
        gate.set()
        for t in threads:
            t.join(10)
    assert [m[-1].content for m in model.received] == ["q0", "q1", "q2", "q3"]  # ScriptedModel refuses overlap


def test_parallel_instances_generate_at_the_same_time():
    models = [ScriptedModel([LONG], token_delay=0.01), ScriptedModel([LONG], token_delay=0.01)]
    with serve(models) as live:
        threads = [threading.Thread(target=post, args=(live, {"messages": user("x"), "max_tokens": 40}))
                   for _ in models]
        for t in threads:
            t.start()
        assert all(m.started.wait(5) for m in models)
        assert live.state.pool.busy == 2
        for t in threads:
            t.join(10)
    assert all(m.last_stats.finish_reason == "length" for m in models)


# ------------------------------------------------------------------------------------------ loading, auth, CORS
def test_503_while_loading_then_ready():
    release = threading.Event()

    def slow_loader():
        release.wait(10)
        return [ScriptedModel()]

    with serve(slow_loader) as live:
        health = http().get(live.url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "loading"
        busy = post(live, {"messages": user("x")})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "model_loading"
        release.set()
        assert live.wait_ready()["status"] == "ok"
        assert post(live, {"messages": user("x")}).status_code == 200


def test_a_failed_load_is_reported():
    failures = []

    def broken():
        raise OSError("cannot map the file")

    with serve(broken, on_load_failed=failures.append) as live:
        wait_until(lambda: bool(failures))
        health = http().get(live.url + "/health")
        r = post(live, {"messages": user("x")})
    assert health.status_code == 503 and health.json() == {
        "status": "failed", "instances": 0, "busy": 0, "queued": 0, "max_queue": 64, "error": "cannot map the file"}
    assert r.status_code == 503 and "cannot map the file" in r.json()["error"]["message"]


def test_api_key_guards_the_api_but_not_the_page_or_health():
    with serve([ScriptedModel()], api_key="sekret") as live:
        with pytest.raises(openai.AuthenticationError) as info:
            openai_client(live, api_key="wrong").models.list()
        assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
        assert post(live, {"messages": user("x")}).status_code == 401
        assert openai_client(live, api_key="sekret").models.list().data[0].id == "tiny"
        assert http().get(live.url + "/health").status_code == 200
        assert http().get(live.url + "/").status_code == 200


def test_cors_is_off_by_default_and_one_origin_can_be_allowed():
    preflight = {"Origin": "http://app.test", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    with serve([ScriptedModel()]) as live:
        r = http().options(live.url + "/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in r.headers
        r = http().get(live.url + "/v1/models", headers={"Origin": "http://app.test"})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    with serve([ScriptedModel()], cors_origin="http://app.test") as live:
        r = http().options(live.url + "/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.test"
        other = http().options(live.url + "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.test"})
        assert "access-control-allow-origin" not in other.headers

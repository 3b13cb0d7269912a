"""Server pieces without a server: request validation, OpenAI <-> GLM message mapping, stop strings, the fair queue."""

from __future__ import annotations

import asyncio
import json

import pytest

from chatglm.runtime.messages import ToolCall
from chatglm.server.errors import APIError
from chatglm.server.mapping import TOOLS_PREAMBLE, Outcome, chat_completion, to_messages
from chatglm.server.pool import ModelPool
from chatglm.server.schema import parse_chat, parse_completion
from chatglm.server.worker import StopScanner

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def chat(**fields):
    return parse_chat({"messages": [{"role": "user", "content": "hi"}], **fields})


def error_of(fn, *args) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args)
    return info.value


# ---------------------------------------------------------------------------------------------- request validation
@pytest.mark.parametrize("body, param, words", [
    ({}, "messages", "Field required"),
    ({"messages": []}, "messages", "at least 1"),
    ({"messages": "hi"}, "messages", "valid list"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, "max_tokens", "greater than or equal to 1"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p", "greater than 0"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n", "less than or equal to 1"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop", "non-empty"),
    ({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}, "tool_choice", "not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs", "not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
     "response_format", "only 'text'"),
])  # fmt: skip
def test_invalid_chat_requests_are_400_naming_the_field(body, param, words):
    err = error_of(parse_chat, body)
    assert err.status == 400 and err.param == param and words in err.message
    assert err.body()["error"]["type"] == "invalid_request_error"


def test_body_must_be_an_object():
    err = error_of(parse_chat, [1, 2])
    assert err.status == 400 and "JSON object, not list" in err.message


def test_sampling_fields_map_to_model_keywords_and_unknown_openai_fields_are_ignored():
    req = chat(temperature=0.2, top_p=0.9, seed=3, max_completion_tokens=7, stop="END", user="u1",
               presence_penalty=0.0, top_k=5, repeat_penalty=1.1)
    assert req.sampling_kwargs() == {"temperature": 0.2, "top_p": 0.9, "top_k": 5, "repeat_penalty": 1.1, "seed": 3,
                                     "max_tokens": 7}
    assert req.stops() == ["END"]
    assert chat(max_tokens=3, max_completion_tokens=9).sampling_kwargs()["max_tokens"] == 3
    assert chat().sampling_kwargs() == {}


def test_completion_prompt_forms():
    assert parse_completion({"prompt": "abc"}).prompt_text() == "abc"
    assert parse_completion({"prompt": ["abc"]}).prompt_text() == "abc"
    assert error_of(parse_completion({"prompt": ["a", "b"]}).prompt_text).param == "prompt"
    assert error_of(parse_completion, {"prompt": "a", "echo": True}).param == "echo"
    assert error_of(parse_completion, {}).param == "prompt"


# ------------------------------------------------------------------------------------------------------ mapping
def test_roles_map_to_glm_roles_and_text_parts_are_joined():
    req = parse_chat({"messages": [
        {"role": "developer", "content": "be terse"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "巴黎"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 20}'},
    ]})
    msgs = to_messages(req)
    assert [m.role for m in msgs] == ["system", "user", "assistant", "observation"]
    assert msgs[1].content == "ab"
    assert msgs[2].tool_calls == [ToolCall("get_weather", {"city": "巴黎"})] and msgs[2].content == ""
    assert msgs[3].content == '{"temp": 20}'


def test_tools_become_a_leading_system_message_unless_tool_choice_is_none():
    msgs = to_messages(chat(tools=[WEATHER, CLOCK]))
    assert msgs[0].role == "system" and msgs[0].content == TOOLS_PREAMBLE
    assert msgs[0].tools == [WEATHER["function"], {"name": "get_time"}]
    assert msgs[1].role == "user"
    assert to_messages(chat(tools=[WEATHER], tool_choice="none"))[0].role == "user"
    only_clock = {"type": "function", "function": {"name": "get_time"}}
    named = to_messages(chat(tools=[WEATHER, CLOCK], tool_choice=only_clock))
    assert named[0].tools == [{"name": "get_time"}]
    err = error_of(to_messages, chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}))
    assert err.param == "tool_choice"


@pytest.mark.parametrize("message, words", [
    ({"role": "wizard", "content": "x"}, "messages[0].role: unknown role 'wizard'"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "must be a data: URL"),
    ({"role": "user", "content": 5}, "must be a string or a list"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {}}]}, "function.name"),
])  # fmt: skip
def test_bad_messages_name_the_message(message, words):
    err = error_of(to_messages, parse_chat({"messages": [message]}))
    assert err.status == 400 and words in err.message and err.param.startswith("messages[0]")


def test_tool_arguments_that_are_not_json_are_kept_as_text():
    req = parse_chat({"messages": [{"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "not json"}}]}]})
    assert to_messages(req)[0].tool_calls == [ToolCall("f", "not json")]


def test_a_tool_call_reply_has_null_content_and_json_string_arguments():
    out = Outcome("", [ToolCall("get_weather", {"city": "巴黎", "days": 2})], "tool_calls", 10, 4)
    body = chat_completion("chatcmpl-1", "tiny", out)
    msg = body["choices"][0]["message"]
    assert msg["content"] is None and body["choices"][0]["finish_reason"] == "tool_calls"
    call = msg["tool_calls"][0]
    assert call["type"] == "function" and call["id"].startswith("call-")
    assert json.loads(call["function"]["arguments"]) == {"city": "巴黎", "days": 2}
    assert body["usage"] == {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}


# ------------------------------------------------------------------------------------------------- stop strings
def feed_all(stops, pieces):
    scan = StopScanner(stops)
    out = [scan.feed(p) for p in pieces]
    out.append(scan.flush())
    return out, scan


def test_stop_string_split_across_pieces_is_cut_and_never_shown():
    out, scan = feed_all(["STOP"], ["hello S", "TO", "P world"])
    assert "".join(out) == "hello " and scan.hit and scan.text == "hello "
    assert out[0] == "hello "  # "S" was held back: it might start "STOP"


def test_held_text_is_released_when_it_does_not_become_a_stop():
    out, scan = feed_all(["STOP"], ["ab S", "Tx", "yz"])
    assert out == ["ab ", "STx", "yz", ""] and not scan.hit


def test_earliest_of_several_stops_wins_and_tail_is_flushed():
    out, scan = feed_all(["\n\n", "END"], ["one END two\n\n"])
    assert "".join(out) == "one " and scan.hit
    out, scan = feed_all(["END"], ["trailing E"])
    assert "".join(out) == "trailing E" and not scan.hit
    out, scan = feed_all([], ["a", "b"])
    assert out == ["a", "b", ""]


# ------------------------------------------------------------------------------------------------------ the pool
def test_pool_serves_waiters_in_arrival_order_and_bounds_the_queue():
    async def scenario():
        pool: ModelPool[str] = ModelPool(max_queue=3)
        pool.set_ready(["m"])
        first = await pool.acquire()
        order: list[int] = []

        async def waiter(i: int):
            model = await pool.acquire()
            order.append(i)
            await asyncio.sleep(0)
            pool.release(model)

        tasks = [asyncio.create_task(waiter(i)) for i in range(3)]
        await asyncio.sleep(0)
        assert pool.queued == 3 and pool.busy == 1
        with pytest.raises(APIError) as full:
            await pool.acquire()
        pool.release(first)
        await asyncio.gather(*tasks)
        return order, full.value, pool.status()

    order, full, status = asyncio.run(scenario())
    assert order == [0, 1, 2]
    assert full.status == 429 and full.code == "queue_full" and full.headers["Retry-After"] == "1"
    assert status == {"status": "ok", "instances": 1, "busy": 0, "queued": 0, "max_queue": 3}


def test_a_waiter_that_leaves_does_not_hold_up_the_queue():
    async def scenario():
        pool: ModelPool[str] = ModelPool(max_queue=4)
        pool.set_ready(["m"])
        held = await pool.acquire()
        gone = asyncio.create_task(pool.acquire())
        stays = asyncio.create_task(pool.acquire())
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.sleep(0)
        pool.release(held)
        return await asyncio.wait_for(stays, 1), pool.queued

    model, queued = asyncio.run(scenario())
    assert model == "m" and queued == 0


def test_pool_answers_503_while_loading_and_after_a_failed_load():
    async def scenario():
        pool: ModelPool[str] = ModelPool(max_queue=4)
        with pytest.raises(APIError) as loading:
            await pool.acquire()
        pool.set_failed("bad file")
        with pytest.raises(APIError) as failed:
            await pool.acquire()
        return loading.value, failed.value, pool.status()

    loading, failed, status = asyncio.run(scenario())
    assert (loading.status, loading.code) == (503, "model_loading")
    assert (failed.status, failed.code) == (503, "model_load_failed") and "bad file" in failed.message
    assert status["status"] == "failed" and status["error"] == "bad file"

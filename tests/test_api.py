"""The Python API over a scripted toy engine: the decode loop, sessions, cancellation, concurrency, bad inputs."""

from __future__ import annotations

import json
import threading
import time

from dataclasses import replace

import pytest
from fixtures_chat import EOS, ToyEngine, toy_model

import chatglm
from chatglm.errors import ContextOverflowError, InputError, ModelRuntimeError
from chatglm.runtime.messages import Message, ToolCall
from chatglm.runtime.engine import common_prefix
from chatglm.runtime.model import Model, ModelBusyError, drain
from chatglm.families.chatglm2.chat import ChatGLM3Format
from chatglm.runtime.session import ChatSession, read_conversation


def test_public_names():
    for name in ("load", "Model", "ChatSession", "Message", "ToolCall", "SamplingParams", "InputError",
                 "ModelBusyError", "ChatGLMError", "Cancelled"):
        assert getattr(chatglm, name) is not None
    assert chatglm.__version__ and set(chatglm.__all__) == {*chatglm._EXPORTS, "__version__"}
    with pytest.raises(AttributeError, match="no attribute 'lod'"):
        chatglm.lod  # noqa: B018


# ------------------------------------------------------------------------------------------------- the decode loop


def test_reply_ends_at_the_stop_token():
    m = toy_model(reply_len=5)
    reply = m.chat("hi")
    assert isinstance(reply, Message) and reply.role == "assistant"
    assert len(reply.content) == 5 and reply.content.isalpha()
    assert (m.last_stats.finish_reason, m.last_stats.generated_tokens) == ("stop", 6)  # "\n" metadata + 5 letters
    assert m.last_reply == reply


def test_reply_ends_at_eos():
    m = toy_model(script=[ord("\n"), ord("o"), ord("k"), EOS, ord("x")])
    assert m.chat([{"role": "user", "content": "hi"}]).content == "ok"
    assert m.last_stats.finish_reason == "stop"


def test_max_tokens_ends_reply_with_length():
    m = toy_model(reply_len=None)
    reply = m.chat("hi", max_tokens=7)
    assert (len(reply.content), m.last_stats.finish_reason, m.last_stats.generated_tokens) == (6, "length", 7)


def test_context_limit_ends_reply():
    m = toy_model(n_ctx=32, reply_len=None)
    prompt = m.prompt_ids("hi")
    m.chat("hi")
    assert m.last_stats.finish_reason == "length"
    assert m.last_stats.generated_tokens == 32 - len(prompt)


def test_stream_chat_deltas_make_the_reply():
    m = toy_model(reply_len=12)
    deltas = list(m.stream_chat("hi"))
    assert len(deltas) >= 2 and "".join(deltas) == m.last_reply.content
    assert all(d for d in deltas)


def test_stream_chat_is_utf8_safe():
    text = "你好😀"
    m = toy_model(script=[ord("\n"), *text.encode("utf-8")])
    deltas = list(m.stream_chat("hi"))
    assert "".join(deltas) == text and "\ufffd" not in "".join(deltas)


def test_generate_and_tokens():
    m = toy_model(reply_len=None)
    assert m.tokenize("ab") == [97, 98] and m.detokenize([97, 98]) == "ab"
    out = m.generate("abc", max_tokens=4)
    assert len(out) == 4 and out.isalpha()
    ids = m.format.completion_ids("abc", m.engine)  # the published tokenizer's framing: [gMASK] sop + text
    assert ids == [m.info.special["[gMASK]"], m.info.special["sop"], 97, 98, 99]
    assert m.generate(ids, max_tokens=4) == out  # ids or text, same prompt
    assert "".join(m.stream_generate("abc", max_tokens=4)) == out
    assert m.info.n_ctx == 256 and m.info.family == "chatglm3"


def test_sampling_settings_are_checked():
    m = toy_model()
    with pytest.raises(InputError, match="unknown sampling option.*temprature"):
        m.chat("hi", temprature=0.5)
    with pytest.raises(InputError, match="top_p must be in"):
        m.chat("hi", top_p=0)


# ------------------------------------------------------------------------------------------------------ bad inputs


def test_bad_messages_are_clear_errors():
    m = toy_model()
    with pytest.raises(InputError, match="unknown message role 'robot'"):
        m.chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(InputError, match="empty conversation"):
        m.chat([])
    with pytest.raises(InputError, match="must end with a user"):
        m.chat([Message("user", "hi"), Message("assistant", "yo")])
    with pytest.raises(InputError, match="message content must be a string"):
        m.stream_chat([{"role": "user", "content": 3}])  # raised by the call, before any iteration
    with pytest.raises(InputError, match="empty prompt"):
        m.generate("")
    assert m.chat("still works").content  # nothing was left half done


# ------------------------------------------------------------------------------------------------------- sessions


def test_session_turn_evaluates_only_new_tokens_and_matches_a_fresh_run():
    m = toy_model(reply_len=5)
    s = m.session("be brief")
    first = s.chat("hello")
    cached = s.tokens
    assert cached == m.engine.tokens and m.engine.tokens[-1] != m.info.special["<|user|>"]
    before = m.engine.n_evaluated
    second = s.chat("and again")
    new_part = m.format.message_ids(Message("user", "and again"), m.engine) + [m.info.special["<|assistant|>"]]
    prompt = s.tokens[:len(s.tokens) - m.last_stats.generated_tokens]
    assert prompt == cached + new_part
    assert m.last_stats.evaluated_tokens == len(new_part)
    assert m.engine.n_evaluated - before == len(new_part) + m.last_stats.generated_tokens
    fresh = toy_model(reply_len=5)
    assert fresh.chat(s.messages[:-1]) == second  # the whole conversation from an empty cache
    assert [msg.role for msg in s.messages] == ["system", "user", "assistant", "user", "assistant"]
    assert s.messages[2] == first


def test_session_continuation_with_a_single_string_format():
    m = Model(ToyEngine(reply_len=None), chat_format="chatglm2")  # "[Round N]\n\n问：...\n\n答：" as one string
    s = m.session()
    s.chat("hello", max_tokens=5)
    cached = s.tokens
    s.chat("again", max_tokens=5)
    tail = m.engine.tokenize("\n\n[Round 2]\n\n问：again\n\n答：")
    assert s.tokens[:m.last_stats.prompt_tokens] == cached + tail
    assert m.last_stats.evaluated_tokens == len(tail) + 1  # + the reply's last token, cut by max_tokens


class UpperHistory(ChatGLM3Format):
    """A format that writes past replies differently from how they were generated (as GLM-4.5 drops thinking)."""

    def message_ids(self, m, tok):
        return super().message_ids(replace(m, content=m.content.upper()) if m.role == "assistant" else m, tok)


def test_session_uses_the_format_prompt_when_it_rewrites_replies():
    m = toy_model(reply_len=5)
    m.format = UpperHistory(m.info.special)
    s = m.session()
    s.chat("hello")
    cached = list(m.engine.tokens)
    s.chat("again")
    prompt = s.tokens[:m.last_stats.prompt_tokens]
    assert prompt == m.prompt_ids(s.messages[:-1])
    assert m.last_stats.evaluated_tokens == len(prompt) - common_prefix(cached, prompt)


def test_session_observation_after_a_tool_call():
    call_text = "get_weather\n```python\ntool_call(city='Paris')\n```"
    obs = 256 + 5  # <|observation|>
    engine = ToyEngine(script=[*call_text.encode(), obs])
    s = ChatSession(Model(engine), tools=[{"name": "get_weather", "parameters": {}}])
    reply = s.chat("weather?")
    assert reply.tool_calls == [ToolCall("get_weather", {"city": "Paris"})]
    assert s.last_stats.finish_reason == "stop"
    cached = s.tokens
    s.chat(Message("observation", "sunny"))
    assert s.last_stats.prompt_tokens - s.last_stats.evaluated_tokens == len(cached)  # the tool turn stayed cached
    assert [m.role for m in s.messages] == ["system", "user", "assistant", "observation", "assistant"]
    assert "get_weather" in s.messages[0].content + json.dumps(s.messages[0].tools)


def test_session_overflow_drops_oldest_rounds_and_keeps_system():
    m = toy_model(n_ctx=96, reply_len=8)
    calls = []
    s = ChatSession(m, system="sys", on_truncate=calls.append)
    for i in range(8):
        s.chat(f"question {i}", max_tokens=12)
        assert len(s.tokens) <= 96
    assert s.messages[0] == Message("system", "sys")
    assert s.messages[-2] == Message("user", "question 7")
    assert calls and sum(calls) == s.dropped_messages and all(n % 2 == 0 for n in calls)
    roles = [msg.role for msg in s.messages[1:]]
    assert roles == ["user", "assistant"] * (len(roles) // 2)  # whole rounds only


def test_session_message_too_long_for_the_context():
    s = toy_model(n_ctx=64).session()
    s.chat("hi")
    before = s.messages
    with pytest.raises(ContextOverflowError, match="more than the context of 64 tokens"):
        s.chat("x" * 100)
    assert s.messages == before
    assert s.chat("ok").content


def test_session_clear_system_and_roundtrip(tmp_path):
    s = toy_model().session("first system")
    s.chat("你好")
    s.set_system("second system")
    assert s.messages[0].content == "second system" and len(s.messages) == 3
    path = tmp_path / "conv.json"
    s.save(path)
    other = toy_model().session()
    other.load(path)
    assert other.messages == s.messages
    other.clear()
    assert other.messages == [Message("system", "second system")]
    assert json.loads(path.read_text(encoding="utf-8"))["messages"][1] == {"role": "user", "content": "你好"}


def test_conversation_the_format_cannot_continue(tmp_path):
    path = tmp_path / "conv.json"
    path.write_text(json.dumps([{"role": "user", "content": "a"}, {"role": "observation", "content": "b"}]))
    s = Model(ToyEngine(), chat_format="chatglm2").session()
    s.chat("hi", max_tokens=2)
    before = s.messages
    with pytest.raises(InputError) as err:
        s.load(path)
    assert str(err.value) == (f"{path}: this conversation does not fit the chatglm2 chat format: the chatglm2 chat "
                              "format has no 'observation' role (allowed: system, user, assistant)")
    assert s.messages == before


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ('{"kind": "other"}', "not a conversation file"),
    ('{"kind": "chatglm-conversation", "version": 9, "messages": []}',
     "conversation file version 9 is not supported (this version reads 1)"),
    ('"text"', "not a conversation file: expected a list of messages"),
    ('[{"role": "user", "content": "a"}, {"role": "wizard"}]', "messages[1].role: unknown role 'wizard'"),
])
def test_malformed_conversation_files(tmp_path, text, problem):
    path = tmp_path / "bad.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as err:
        read_conversation(path)
    assert str(err.value).startswith(f"{path}: {problem}")


# ------------------------------------------------------------------------------------------ cancellation, threads


def run_in_thread(fn):
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001  (handed to the test)
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, result


def wait_until(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("timed out")
        time.sleep(0.001)


@pytest.mark.parametrize("how", ["event", "stop"])
def test_cancel_from_another_thread_stops_within_one_token(how):
    m = toy_model(reply_len=None, delay=0.01)
    cancel = threading.Event()
    thread, result = run_in_thread(lambda: m.chat("hi", cancel=cancel, max_tokens=500))
    n_prompt = len(m.prompt_ids("hi"))
    wait_until(lambda: len(m.engine.tokens) >= n_prompt + 10)
    cancel.set() if how == "event" else m.stop()
    cancelled_at = time.monotonic()
    thread.join(5)
    assert sum(t > cancelled_at for t in m.engine.eval_times) <= 1  # at most the token already on its way
    assert "error" not in result and m.last_stats.finish_reason == "cancelled"
    assert 10 <= m.last_stats.generated_tokens < 500
    assert m.chat("again", max_tokens=3).content  # the model is free again


def test_cancel_during_prefill_leaves_the_session_unchanged():
    m = toy_model(delay=0.002)
    s = m.session()
    s.chat("hi")
    before = (s.messages, s.tokens)
    cancel = threading.Event()
    thread, result = run_in_thread(lambda: s.chat("x" * 150, cancel=cancel))
    wait_until(lambda: len(m.engine.tokens) > len(before[1]) + 20)
    cancel.set()
    thread.join(5)
    assert "error" not in result and m.last_stats.finish_reason == "cancelled"
    assert m.last_stats.generated_tokens == 0
    assert (s.messages, s.tokens) == before


def test_concurrent_calls_are_refused_not_interleaved():
    m = toy_model(reply_len=None, delay=0.005)
    thread, result = run_in_thread(lambda: m.chat("long", max_tokens=60))
    wait_until(lambda: m.busy)
    with pytest.raises(ModelBusyError, match="busy with another generation"):
        m.chat("second")
    with pytest.raises(ModelBusyError):
        list(m.session().stream_chat("third"))
    assert m.tokenize("ok") == [111, 107]  # tokenizing does not need the model
    thread.join(5)
    assert "error" not in result and len(result["value"].content) == 59
    assert not m.busy and m.chat("now", max_tokens=3).content


def test_a_stream_started_late_sees_the_conversation_as_it_is_then():
    s = toy_model().session()
    late = s.stream_chat("second")
    s.chat("first")
    "".join(late)
    assert [m.content for m in s.messages if m.role == "user"] == ["first", "second"]
    assert s.last_stats.cached_tokens > 0  # and the cache carried on from the first turn


def test_abandoned_stream_releases_the_model():
    m = toy_model(reply_len=None)
    stream = m.stream_chat("hi", max_tokens=50)
    unstarted = m.stream_chat("hi")  # a stream takes the model only once iterated
    next(stream)
    assert m.busy
    stream.close()
    assert not m.busy and m.last_stats.finish_reason == "cancelled"
    assert drain(unstarted).content


def test_close_frees_the_engine_and_later_calls_fail():
    m = toy_model()
    with m:
        m.chat("hi")
    assert m.engine.closed
    with pytest.raises(ModelRuntimeError, match="the model is closed"):
        m.chat("hi")
    m.close()  # twice is fine

"""Reasoning apart from the answer, and template options, through every front: the Python API (``Message.thinking``,
``on_thinking``), the REPL (thinking dimmed or between markers, ``/think``, ``/thoughts``), the OpenAI server
(``reasoning_content`` in messages and stream deltas, ``chat_template_kwargs``/``reasoning_effort`` in requests,
tool-call ids kept), with the GLM-4.7 format over scripted models.
"""

from __future__ import annotations

import io
from dataclasses import replace

import pytest
from fixtures_chat import ToyEngine
from fixtures_server import SPECIAL_BASE, ScriptedModel, openai_client, serve
from test_repl import ScriptedEditor

from chatglm.cli.chatout import ThinkingPrinter
from chatglm.cli.repl import Repl
from chatglm.runtime.messages import Message, ToolCall
from chatglm.runtime.model import Model

GLM_SPECIAL = {t: SPECIAL_BASE + i for i, t in enumerate(
    ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>",
     "</think>"))}
NAMES = {v: k for k, v in GLM_SPECIAL.items()}
THOUGHT_REPLY = "Let me add: 2 plus 3 is 5.</think>The answer is 5."


def extra(obj, name: str):
    """A field the OpenAI client may not declare (reasoning_content): an attribute or in model_extra."""
    value = getattr(obj, name, None)
    return value if value is not None else (obj.model_extra or {}).get(name)


def text_of(ids) -> str:
    return "".join(NAMES.get(i, chr(i) if i < SPECIAL_BASE else "?") for i in ids)


def glm47(replies=(), **kw) -> ScriptedModel:
    return ScriptedModel(replies, chat_format="glm47", special=GLM_SPECIAL, **kw)


# -------------------------------------------------------------------------------------------------- Python API


def toy_glm47(reply: bytes, n_ctx: int = 512) -> Model:
    """GLM-4.7's format over the toy engine; the toy's vocabulary has no ``<think>`` token, so the prompt's closing
    ``<think>`` is text and the script (counted from ``<|assistant|>``) starts with it."""
    engine = ToyEngine(n_ctx=n_ctx, script=list(b"<think>" + reply))
    special = {**engine.info.special, "<sop>": engine.info.special["sop"], "<|endoftext|>": engine.info.special["</s>"]}
    engine.info = replace(engine.info, special=special)
    return Model(engine, chat_format="glm47")


def test_python_api_keeps_thinking_apart_and_streams_it_to_on_thinking():
    model = toy_glm47(THOUGHT_REPLY.encode())
    pieces: list[str] = []
    shown = list(model.stream_chat("2+3?", on_thinking=pieces.append))
    reply = model.last_reply
    assert (reply.thinking, reply.content) == ("Let me add: 2 plus 3 is 5.", "The answer is 5.")
    assert "".join(pieces) == reply.thinking and len(pieces) > 1  # piece by piece, never a marker
    assert "".join(shown) == "The answer is 5." and not any("<" in p for p in pieces + shown)
    assert model.chat("2+3?").thinking == reply.thinking


TYPED_CALL = ("</think><tool_call>lookup<arg_key>code</arg_key><arg_value>42</arg_value><arg_key>n</arg_key>"
              "<arg_value>42</arg_value><arg_key>flag</arg_key><arg_value>true</arg_value><arg_key>zip</arg_key>"
              "<arg_value>[1]</arg_value><arg_key>kind</arg_key><arg_value>null</arg_value><arg_key>free</arg_key>"
              "<arg_value>7</arg_value></tool_call>")
TYPED_TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object", "properties": {
    "code": {"type": "string"}, "n": {"type": "integer"}, "flag": {"type": "boolean"}, "zip": {"type": ["string"]},
    "kind": {"enum": ["null", "a"]}, "free": {}}}}}]


def test_call_arguments_take_the_types_the_tools_declare():
    """The XML call format writes a string argument without quotes, so ``42`` may be the string "42": a value whose
    schema admits only strings stays as written; others are JSON where they parse; with no tools, JSON first."""
    expected = {"code": "42", "n": 42, "flag": True, "zip": "[1]", "kind": "null", "free": 7}
    system = {"role": "system", "content": "", "tools": TYPED_TOOLS}
    assert toy_glm47(TYPED_CALL.encode(), 4096).chat([system, {"role": "user", "content": "go"}]).tool_calls == [
        ToolCall("lookup", expected)]
    model = toy_glm47(TYPED_CALL.encode(), 4096)
    list(model.stream_chat([system, {"role": "user", "content": "go"}]))
    assert model.last_reply.tool_calls[0].arguments == expected
    session = toy_glm47(TYPED_CALL.encode(), 4096).session(tools=TYPED_TOOLS)
    assert session.chat("go").tool_calls[0].arguments == expected
    untyped = toy_glm47(TYPED_CALL.encode(), 4096).chat("go").tool_calls[0].arguments
    assert untyped == {"code": 42, "n": 42, "flag": True, "zip": [1], "kind": None, "free": 7}


def test_template_options_reach_the_prompt_from_the_api_and_sessions():
    model = toy_glm47(b"ok")
    think, no_think = model.prompt_ids("hi"), model.prompt_ids("hi", enable_thinking=False)
    assert bytes(think[-7:]) == b"<think>" and bytes(no_think[-8:]) == b"</think>"
    assert model.prompt_ids("hi", template_kwargs={"enable_thinking": False}) == no_think
    session = model.session(enable_thinking=False)
    session.chat("hi")
    assert session.tokens[:len(no_think)] == no_think
    session.chat("again", enable_thinking=True)  # a turn's own options over the session's
    cached = session._cached
    prompt = cached.tokens[:len(cached.tokens) - cached.n_reply]
    assert prompt[-7:] == list(b"<think>") and prompt[-8:] != list(b"</think>")


# -------------------------------------------------------------------------------------------------- REPL


def test_repl_shows_thinking_apart_and_toggles_it(capsys):
    model = toy_glm47(THOUGHT_REPLY.encode())
    session = model.session()
    Repl(session, editor=ScriptedEditor(["2+3?", "/thoughts hide", "again", "/think off", "/think", "/think maybe"]
                                        )).run()
    out, err = capsys.readouterr()
    assert "<think>\nLet me add: 2 plus 3 is 5.\n</think>\n\nThe answer is 5.\n" in out  # not a terminal: marked
    assert out.count("Let me add") == 1 and out.count("The answer is 5.") == 2  # hidden on the second turn
    assert session.template_kwargs == {"enable_thinking": False}
    assert "thinking off" in err and "/think takes on or off" in err


def test_thinking_is_dimmed_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    printer = ThinkingPrinter(stream=stream)
    printer("hmm")
    printer(" ok")
    printer.end()
    printer.end()
    assert stream.getvalue() == "\x1b[2mhmm ok\x1b[0m\n\n"


# -------------------------------------------------------------------------------------------------- server


def test_reasoning_content_in_a_reply_with_the_openai_client():
    model = glm47([THOUGHT_REPLY])
    with serve([model]) as live:
        reply = openai_client(live).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "2+3?"}])
    msg = reply.choices[0].message
    assert msg.content == "The answer is 5."
    assert extra(msg, "reasoning_content") == "Let me add: 2 plus 3 is 5."


def test_reasoning_content_streams_as_deltas_apart_from_content():
    model = glm47([THOUGHT_REPLY])
    with serve([model]) as live:
        stream = openai_client(live).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "2+3?"}], stream=True)
        deltas = [c.choices[0].delta for c in stream if c.choices]
    reasoning = [extra(d, "reasoning_content") for d in deltas if extra(d, "reasoning_content")]
    content = [d.content for d in deltas if d.content]
    assert "".join(reasoning) == "Let me add: 2 plus 3 is 5." and len(reasoning) > 1
    assert "".join(content) == "The answer is 5."
    assert not any("<" in piece or "think>" in piece for piece in reasoning + content)


def test_template_kwargs_and_ids_reach_the_model():
    call = ('<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value>'
            '<arg_key>days</arg_key><arg_value>2</arg_value></tool_call>')
    model = glm47([call, "Done.</think>Sunny."])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "string"}}}}}]
    with serve([model]) as live:
        client = openai_client(live)
        first = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "weather?"}], tools=tools,
            extra_body={"chat_template_kwargs": {"enable_thinking": False}, "reasoning_effort": "high"})
        calls = first.choices[0].message.tool_calls
        assert first.choices[0].finish_reason == "tool_calls"
        assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather",
                                                                              '{"city": "Paris", "days": "2"}')]
        assert extra(first.choices[0].message, "reasoning_content") is None  # thinking was off
        second = client.chat.completions.create(model="tiny", tools=tools, messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "reasoning_content": "need weather",
             "tool_calls": [c.model_dump() for c in calls]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny"}])
        assert extra(second.choices[0].message, "reasoning_content") == "Done."
        assert second.choices[0].message.content == "Sunny."
    assert model.template_kwargs[0] == {"enable_thinking": False, "reasoning_effort": "high"}
    assert text_of(model.prompts[0]).endswith("<|assistant|></think>")
    assert text_of(model.prompts[1]).endswith("<|assistant|><think>")
    assert "Answer the following" not in text_of(model.prompts[0])  # tools go to the template, not a system turn
    assert text_of(model.prompts[0]).startswith("[gMASK]<sop><|system|>\n# Tools")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text_of(model.prompts[0])
    sent = model.received[1]
    assert sent[2].tool_calls == [ToolCall("get_weather", {"city": "Paris", "days": "2"})]
    assert sent[2].tool_calls[0].id == calls[0].id and sent[3].tool_call_id == calls[0].id
    assert sent[2].thinking == "need weather"


@pytest.mark.parametrize("body, problem", [
    ({"chat_template_kwargs": {"enable_thinking": "no"}}, "enable_thinking must be true or false"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"chat_template_kwargs": ["x"]}, "chat_template_kwargs"),
])
def test_bad_template_options_are_a_400(body, problem):
    from fixtures_server import http

    with serve([glm47()]) as live:
        r = http().post(live.url + "/v1/chat/completions",
                        json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], **body})
    assert r.status_code == 400 and problem in r.json()["error"]["message"]


def test_message_round_trip_keeps_ids_and_thinking():
    m = Message.from_dict({"role": "tool", "content": "x", "tool_call_id": "c1"})
    assert (m.role, m.tool_call_id) == ("observation", "c1") and Message.from_dict(m.to_dict()) == m
    a = Message.from_dict({"role": "assistant", "reasoning_content": "r",
                           "tool_calls": [{"name": "f", "arguments": {}, "id": "c1"}]})
    assert a.thinking == "r" and a.tool_calls[0].id == "c1" and Message.from_dict(a.to_dict()).tool_calls[0].id == "c1"

"""ChatGLM3's tool and code-interpreter replies (chatglm.runtime.prompts): parsed with the ast module, literals only.

Published ChatGLM3 replies: ``get_weather\\n```python\\ntool_call(location='北京')\\n```\\n`` for a tool, and
``interpreter\\n```python\\n<code>\\n```\\n`` for the code interpreter.
"""

from __future__ import annotations

import pytest

from chatglm.runtime.messages import ToolCall
from chatglm.families.chatglm2.chat import parse_tool_call, render_tool_call
from chatglm.runtime.prompts import get_format

SPECIALS = {t: i for i, t in enumerate(
    ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"), start=100)}


def test_tool_call_with_literal_arguments():
    reply = get_format("chatglm3", SPECIALS).parse_reply(
        "get_weather\n```python\ntool_call(location='北京', days=3, units=None, opts={'a': [1, 2.5]})\n```")
    assert reply.metadata == "get_weather"
    assert reply.tool_calls == [ToolCall("get_weather",
                                         {"location": "北京", "days": 3, "units": None, "opts": {"a": [1, 2.5]}})]


@pytest.mark.parametrize("body", [
    "tool_call(path=__import__('os').getcwd())",  # a call inside: not a literal, never evaluated
    "tool_call(x=open('/etc/passwd').read())",
    "tool_call(*args)",
    "(" * 2000 + ")" * 2000,  # nesting the parser refuses
    "tool_call(a='\x00')",
])
def test_non_literal_arguments_stay_text(body):
    call = parse_tool_call("get_weather", f"```python\n{body}\n```")
    assert call == ToolCall("get_weather", body)


@pytest.mark.parametrize("code", ["print(1 + 1)", "x = 1\nprint(x)", "import math\nmath.sqrt(2)", "tool_call(a=1)"])
def test_code_interpreter_call_is_the_code(code):
    reply = get_format("chatglm3", SPECIALS).parse_reply(f"interpreter\n```python\n{code}\n```")
    assert reply.tool_calls == [ToolCall("interpreter", {"code": code})]


def test_render_round_trips():
    call = ToolCall("get_weather", {"location": "北京", "days": 3})
    assert parse_tool_call(call.name, render_tool_call(call)) == call
    code = ToolCall("interpreter", {"code": "for i in range(3):\n    print(i)"})
    assert render_tool_call(code) == "```python\nfor i in range(3):\n    print(i)\n```"
    assert parse_tool_call("interpreter", render_tool_call(code)) == code

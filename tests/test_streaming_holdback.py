"""Streaming holds back only what may still become a tool call or a marker (issue 16, "seen as a new user").

A scripted engine feeds a reply to the real :class:`chatglm.runtime.model.Model` one token at a time; the tests assert
what the stream has shown after each token, and that the shown text is a prefix of the parsed reply's content.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import pytest

from chatglm.runtime.engine import Engine, ModelInfo
from chatglm.runtime.messages import ToolCall
from chatglm.runtime.model import Model, drain
from chatglm.runtime.prompts import get_format

SPECIAL_BASE = 1_000_000  # special ids above every code point: the prompt tokenizer is one id per character
PIECE_BASE = 2_000_000  # the reply's scripted tokens
CHATGLM3 = ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
GLM4 = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>")
EOS = SPECIAL_BASE + 99


class ScriptedEngine(Engine):
    """An engine whose "model" generates ``pieces`` (one token each), then eos."""

    def __init__(self, chat_format: str, specials: Sequence[str], pieces: Sequence[str]):
        super().__init__()
        special = {t: SPECIAL_BASE + i for i, t in enumerate(specials)}
        self.info = ModelInfo(path=Path("scripted.gguf"), arch="chatglm", family=chat_format, chat_format=chat_format,
                              n_ctx=4096, n_ctx_train=4096, n_vocab=PIECE_BASE + len(pieces), n_params=0,
                              size_bytes=0, description="scripted", special=special, eog=frozenset({EOS}))
        self.pieces = list(pieces)
        self.sampled = 0  # tokens generated so far
        self.ended = False  # eos was sampled

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def token_bytes(self, token: int) -> bytes:
        return self.pieces[token - PIECE_BASE].encode() if token >= PIECE_BASE else b""

    def _truncate(self, n_keep: int) -> None:
        del self.tokens[n_keep:]

    def _eval(self, tokens, *, cancel=None, progress=None) -> None:
        self.tokens += list(tokens)

    def logits(self):  # pragma: no cover - the scripted sampler never asks
        raise NotImplementedError

    def sampler(self, params):
        engine = self

        class Next:
            def __call__(self) -> int:
                if engine.sampled == len(engine.pieces):
                    engine.ended = True
                    return EOS
                engine.sampled += 1
                return PIECE_BASE + engine.sampled - 1

            def close(self) -> None:
                pass

        return Next()

    def close(self) -> None:
        pass


def stream(chat_format: str, pieces: Sequence[str], specials: Sequence[str] = CHATGLM3):
    """(what is shown after each token, shown after the end, the parsed reply)."""
    engine = ScriptedEngine(chat_format, specials, pieces)
    model = Model(engine)
    shown: list[str] = [""] * (len(pieces) + 1)  # index i: after token i+1; the last: after the end
    gen = model.stream_chat("hi")
    total = ""
    try:
        while True:
            total += next(gen)
            shown[len(pieces) if engine.ended else engine.sampled - 1] = total
    except StopIteration as done:
        reply = done.value
    for i in range(1, len(shown)):  # carry forward: what the user sees after token i
        shown[i] = shown[i] or shown[i - 1]
    end = total
    assert reply.content.startswith(end.rstrip()) or reply.tool_calls, (end, reply)
    return shown[:-1], end, reply


# ------------------------------------------------------------------------------------------------- ChatGLM3

def test_chatglm3_answer_without_a_metadata_line_streams_at_once():
    # The first token cannot start a tool name: shown as soon as it arrives, no newline needed.
    shown, end, reply = stream("chatglm3", ["你好", "！", "我是", "模型", "。"])
    assert shown == ["你好", "你好！", "你好！我是", "你好！我是模型", "你好！我是模型。"]
    assert end == reply.content == "你好！我是模型。" and reply.tool_calls == []


def test_chatglm3_holds_only_a_word_that_may_be_a_tool_name():
    shown, end, reply = stream("chatglm3", ["Hello", " there", ",", " friend"])
    assert shown == ["", "Hello there", "Hello there,", "Hello there, friend"]
    assert reply.content == "Hello there, friend" and reply.metadata == ""


def test_chatglm3_empty_metadata_line_is_dropped():
    shown, end, reply = stream("chatglm3", [" ", "\n", "你好", "，世界"])
    assert shown == ["", "", "你好", "你好，世界"]
    assert reply.content == "你好，世界"


def test_chatglm3_name_line_then_text_is_an_answer():
    shown, _, reply = stream("chatglm3", ["Sure", "\n", "here", " it is"])
    assert shown == ["", "", "Sure\nhere", "Sure\nhere it is"]
    assert reply.content == "Sure\nhere it is" and reply.tool_calls == []


def test_chatglm3_tool_call_is_never_shown_as_text():
    pieces = ["get_weather", "\n", "```", "python", "\n", "tool_call(city='北京')", "\n", "```"]
    shown, end, reply = stream("chatglm3", pieces)
    assert set(shown) == {""} and end == ""
    assert reply.tool_calls == [ToolCall("get_weather", {"city": "北京"})] and reply.metadata == "get_weather"


def test_chatglm3_unfenced_tool_call_and_interpreter():
    _, end, reply = stream("chatglm3", ["add", "\n", "tool_call(", "a=1, b=2)"])
    assert end == "" and reply.tool_calls == [ToolCall("add", {"a": 1, "b": 2})]
    _, end, reply = stream("chatglm3", ["interpreter", "\n", "```python\n", "print(1)\n", "```"])
    assert end == "" and reply.tool_calls == [ToolCall("interpreter", {"code": "print(1)"})]


def test_chatglm3_held_name_alone_is_shown_at_the_end():
    shown, end, reply = stream("chatglm3", ["OK"])
    assert shown == [""] and end == "OK" and reply.content == "OK"


@pytest.mark.parametrize("text", ["Hello world", "get_weather\n``", "x\n tool_call", "  \n  hi", "a.b-c\nfoo"])
def test_chatglm3_visible_is_always_a_prefix_of_the_content(text):
    fmt = get_format("chatglm3", {t: SPECIAL_BASE + i for i, t in enumerate(CHATGLM3)})
    final = fmt.parse_reply(text)
    for n in range(len(text) + 1):
        part = fmt.visible(text[:n]).rstrip()
        assert final.content.startswith(part) or (final.tool_calls and not part), (text, n, part)


# ------------------------------------------------------------------------------------------------- GLM-4

def test_glm4_holds_a_name_then_streams_the_answer():
    shown, _, reply = stream("glm4", ["Hello", " world", "!"], GLM4)
    assert shown == ["", "Hello world", "Hello world!"]
    assert reply.content == "Hello world!"


def test_glm4_leading_newline_answer_streams_from_the_first_word():
    shown, _, _ = stream("glm4", ["\n", "你好", "！"], GLM4)
    assert shown == ["", "你好", "你好！"]


def test_glm4_json_tool_call_is_held():
    shown, end, reply = stream("glm4", ["get_weather", "\n", '{"city":', ' "北京"}'], GLM4)
    assert set(shown) == {""} and end == ""
    assert reply.tool_calls == [ToolCall("get_weather", {"city": "北京"})]


def test_glm4_0414_holds_only_a_partial_think_marker():
    shown, _, reply = stream("glm4-0414", ["<th", "ink>", "hmm", "</think>", "\n", "The", " answer"], GLM4)
    assert shown == ["", "", "", "", "", "", "The answer"]
    assert (reply.thinking, reply.content) == ("hmm", "The answer")
    shown, _, _ = stream("glm4-0414", ["<b>", "bold", "</b>"], GLM4)
    assert shown == ["<b>", "<b>bold", "<b>bold</b>"]


# ------------------------------------------------------------------------------------------------- GLM-4.5

def test_glm45_holds_only_the_partial_tool_call_marker():
    pieces = ["\n", "<think></think>", "\n", "我来", "查一下", "。", "\n", "<tool", "_call>", "get_weather\n",
              "<arg_key>city</arg_key>\n<arg_value>北京</arg_value>\n", "</tool_call>"]
    shown, end, reply = stream("glm45", pieces, GLM4)
    assert shown == ["", "", "", "我来", "我来查一下", *["我来查一下。"] * 7]
    assert end == "我来查一下。" and reply.tool_calls == [ToolCall("get_weather", {"city": "北京"})]


def test_glm45_less_than_sign_is_shown_once_it_cannot_be_a_marker():
    shown, _, reply = stream("glm45", ["\n<think></think>\n", "a ", "<", " b", " <t", "iny>"], GLM4)
    assert shown == ["", "a", "a", "a < b", "a < b", "a < b <tiny>"]
    assert reply.content == "a < b <tiny>"

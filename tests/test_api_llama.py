"""The Python API over llama.cpp with a tiny random ChatGLM3 GGUF: KV reuse, fresh-run equality, cancel, bad files."""

from __future__ import annotations

import logging
import threading

import gguf
import pytest
from fixtures_chat import chat_gguf, chat_model  # noqa: F401  (fixtures)

import chatglm
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.runtime.messages import Message
from chatglm.runtime.model import drain
from chatglm.runtime.sampling import SamplingParams

QUESTIONS = ["你好，请介绍一下你自己。", "What is 2 + 2?", "再说一遍，用英文。"]


def test_each_turn_evaluates_only_its_new_tokens_and_matches_a_fresh_run(chat_model):
    m = chat_model
    s = m.session("You are a helpful assistant.")
    assistant = m.info.special["<|assistant|>"]
    turns = []
    for question in QUESTIONS:
        history, cached, before = s.tokens, list(m.engine.tokens), m.engine.n_evaluated
        s.chat(question, max_tokens=12)
        st = m.last_stats
        prompt, reply = s.tokens[:st.prompt_tokens], s.tokens[st.prompt_tokens:]
        new = m.format.message_ids(Message("user", question), m.engine) + [assistant]
        if history:  # the previous turn exactly as generated, then only the new message
            assert prompt == history + new
            assert st.evaluated_tokens <= len(new) + 1  # + the last reply token when it was cut by max_tokens
        assert prompt[:len(cached)] == cached
        assert st.evaluated_tokens == len(prompt) - len(cached)
        assert m.engine.n_evaluated - before == st.evaluated_tokens + len(reply) - (st.finish_reason == "length")
        turns.append((prompt, reply))
    assert len(turns[-1][0]) > 3 * len(new)
    for prompt, reply in turns:  # the same prompt from an empty cache gives the same reply
        m.engine.reset()
        fresh = drain(m.run(prompt, SamplingParams(temperature=0.0, max_tokens=12)))
        assert fresh.stats.evaluated_tokens == len(prompt)
        assert fresh.tokens == reply


def test_stateless_chat_reuses_the_common_prefix(chat_model):
    m = chat_model
    convo = [Message("system", "sys"), Message("user", "第一个问题")]
    first = m.chat(convo, max_tokens=6)
    again = m.chat(convo + [first, Message("user", "second")], max_tokens=6)
    assert again.role == "assistant"
    assert m.last_stats.cached_tokens >= len(m.prompt_ids(convo))


def test_stream_generate_text_ids_and_cancel(chat_model):
    m = chat_model
    text = m.generate("今天天气", max_tokens=8)
    assert "".join(m.stream_generate(m.format.completion_ids("今天天气", m.engine), max_tokens=8)) == text
    assert m.detokenize(m.tokenize("hello 世界")) .strip() == "hello 世界"
    cancel = threading.Event()
    cancel.set()  # llama.cpp's abort callback stops the prompt's evaluation at once
    assert m.generate("今天天气", cancel=cancel, max_tokens=8) == ""
    assert m.last_stats.finish_reason == "cancelled" and m.last_stats.generated_tokens == 0
    pieces = []
    for piece in m.stream_generate("今天天气", cancel=cancel.__class__(), max_tokens=8):
        pieces.append(piece)
        m.stop()
    assert len(pieces) == 1 and m.last_stats.finish_reason == "cancelled"
    assert m.generate("今天天气", max_tokens=8) == text  # the cache was left consistent


def test_info_and_repr(chat_model, chat_gguf):
    info = chat_model.info
    assert (info.path, info.arch, info.family, info.chat_format) == (chat_gguf, "chatglm", "chatglm3", "chatglm3")
    assert info.n_ctx >= 512 and info.n_params > 0 and info.n_vocab == len(info.special) + 1000 + 7
    assert "chatglm3" in repr(chat_model)


def test_load_reports_progress_and_routes_native_logs(chat_gguf, caplog, capfd):
    calls = []
    with caplog.at_level(logging.DEBUG, logger="llama.cpp"):
        with chatglm.load(chat_gguf, n_ctx=256, n_threads=1, on_progress=lambda d, t: calls.append((d, t))) as m:
            assert m.chat("hi", max_tokens=2, temperature=0).role == "assistant"
    assert calls and calls[-1][0] == calls[-1][1] and calls == sorted(calls)
    assert any(r.name == "llama.cpp" for r in caplog.records)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")  # nothing printed: llama.cpp's log went through logging


def test_bad_model_files(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("hello", encoding="utf-8")
    with pytest.raises(InputError, match="not a GGUF file"):
        chatglm.load(text)
    other = tmp_path / "llama.gguf"
    writer = gguf.GGUFWriter(str(other), "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(UnsupportedModelError) as err:
        chatglm.load(other)
    assert str(err.value).startswith(f"{other}: GGUF architecture 'llama' is not a GLM model this tool runs")

"""The same API over the GLM-1 (ChatGLM-6B) engine: chat, stream, sessions, cancel, the REPL's one-shot mode."""

from __future__ import annotations

import threading

from fixtures_glm1 import glm1, glm1_dir, glm1_gguf, ice_model  # noqa: F401  (fixtures)

import chatglm
from chatglm.runtime.messages import Message
from chatglm.runtime.model import drain


def test_glm1_chat_stream_session_and_cancel(glm1_gguf):
    with chatglm.load(glm1_gguf, n_ctx=256, n_threads=1, kv_type="f32",
                      sampling=chatglm.SamplingParams(temperature=0, max_tokens=6)) as m:
        assert (m.info.arch, m.format.name) == ("chatglm1", "chatglm1")
        first = m.chat("你好")
        assert isinstance(first, Message) and m.last_stats.generated_tokens >= 1
        stream = m.stream_chat("你好")
        assert "".join(stream) == m.last_reply.content == first.content
        s = m.session()
        assert s.chat("你好") == first
        second = s.chat("再见")
        prompt = s.tokens[:m.last_stats.prompt_tokens]
        assert prompt == m.prompt_ids(s.messages[:-1])  # the conversation sits before [gMASK]: the format's prompt
        assert m.chat(s.messages[:-1]) == second  # the same reply without the session
        cancel = threading.Event()
        gen = m.stream_generate("你好", cancel=cancel, max_tokens=50)
        next(gen)
        cancel.set()
        assert drain(gen) is not None and m.last_stats.finish_reason == "cancelled"
        assert m.last_stats.generated_tokens <= 2

"""ChatGLM-6B's chat format (prompt ids, reply post-processing) and the Python API over the GLM-1 engine."""

from __future__ import annotations

import pytest
from fixtures_glm1 import glm1, glm1_dir, glm1_gguf, ice_model  # noqa: F401  (fixtures)

from chatglm.errors import InputError
from chatglm.runtime.messages import Message
from chatglm.runtime.prompts import get_format
from chatglm.families.chatglm1.chat import process_response


@pytest.fixture(scope="module")
def model(glm1_gguf):
    from chatglm.runtime.model import load

    with load(glm1_gguf, n_ctx=256, n_threads=1, kv_type="f32") as m:
        yield m


def published_prompt(query: str, history: list[tuple[str, str]]) -> str:
    """ChatGLMForConditionalGeneration.chat's prompt string (THUDM/chatglm-6b), written out by hand."""
    if not history:
        return query
    prompt = ""
    for i, (old_query, response) in enumerate(history):
        prompt += "[Round {}]\n问：{}\n答：{}\n".format(i, old_query, response)
    return prompt + "[Round {}]\n问：{}\n答：".format(len(history), query)


@pytest.mark.parametrize("history", [[], [("你好", "你好！有什么可以帮你？")], [("1+1=?", "2"), ("再加一呢?", "3")]])
def test_prompt_ids_are_the_published_ones(glm1, model, history):
    messages = [Message(r, c) for q, a in history for r, c in (("user", q), ("assistant", a))]
    messages.append(Message("user", "今天天气怎么样?\n请简短回答"))
    want = glm1.tok.encode(published_prompt(messages[-1].content, history)) + [glm1.ids["gmask"], glm1.ids["bos"]]
    assert model.prompt_ids(messages) == want


def test_system_text_is_a_prefix(glm1, model):
    ids = model.prompt_ids([Message("system", "你是一个助手。"), Message("user", "你好")])
    assert ids == glm1.tok.encode("你是一个助手。你好") + [glm1.ids["gmask"], glm1.ids["bos"]]


@pytest.mark.parametrize("roles", [["assistant", "user"], ["user", "user"], ["user", "assistant"],
                                   ["observation"], []])
def test_malformed_conversations_are_refused(model, roles):
    with pytest.raises(InputError):
        model.prompt_ids([Message(r, "x") for r in roles])


@pytest.mark.parametrize("raw, final", [
    ("  你好,世界!  ", "你好，世界！"),
    ("我是在[[训练时间]]训练的", "我是在2023年训练的"),
    ("a, b: c? 中文?english", "a, b: c? 中文？english"),
    ("答案:42", "答案：42"),
])
def test_reply_post_processing(raw, final):
    assert process_response(raw) == final


def test_streamed_text_is_always_a_prefix_of_the_reply(glm1):
    fmt = get_format("chatglm1", {"[gMASK]": 1, "<sop>": 2, "<eop>": 3})
    for raw in ("你好,世界!再见?好", "训练于[[训练时间]],完毕", "plain text, here", "[[训练"):
        final = fmt.parse_reply(raw).content
        for n in range(len(raw) + 1):
            assert final.startswith(fmt.visible(raw[:n]).rstrip()), (raw, n)


def test_chat_and_stream_agree_and_stop_at_eop(model, glm1):
    assert model.info.chat_format == "chatglm1"
    assert glm1.ids["eos"] in model.stop_ids  # <eop>
    messages = [{"role": "user", "content": "你好"}]
    reply = model.chat(messages, temperature=0, max_tokens=6)
    streamed = "".join(model.stream_chat(messages, temperature=0, max_tokens=6))
    assert reply.role == "assistant" and reply.content == streamed == model.last_reply.content
    assert model.last_stats.generated_tokens == 6 or model.last_stats.finish_reason == "stop"
    # The second call found the prompt in the cache up to <sop>.
    assert model.last_stats.evaluated_tokens == 1


def test_greedy_reply_is_the_argmax_path(model, glm1):
    """chat() at temperature 0 emits the argmax tokens of full forward passes (the reference generation loop)."""
    ids = model.prompt_ids([{"role": "user", "content": "春眠不觉晓"}])
    engine = model.engine
    seq = list(ids)
    for _ in range(5):
        logits = engine.all_logits(seq)[-1]
        seq.append(int(logits.argmax()))
        if seq[-1] in model.stop_ids:
            seq.pop()
            break
    want = process_response(engine.detokenize(seq[len(ids):]))
    assert model.chat([{"role": "user", "content": "春眠不觉晓"}], temperature=0, max_tokens=5).content == want

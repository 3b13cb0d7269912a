"""Token ids equal sentencepiece's; chat prompts equal the published tokenizers' constructions, id for id."""

from __future__ import annotations

import json

import pytest
import sentencepiece as spm

from chatglm.devtools.corpus import bilingual_corpus
from chatglm.errors import InputError
from chatglm.runtime.messages import Message


@pytest.fixture(scope="module")
def sp(glm3):
    return spm.SentencePieceProcessor(model_file=str(glm3.sp_model))


EXTRA = ["", " ", "  leading", "trailing  ", "\n", "\t\tindent", "a\n\nb", "x" * 300, "🤖🦄 mixed 混合 text",
         "ｆｕｌｌ－ｗｉｄｔｈ　ｓｐａｃｅ", "𠀀𪚥 rare", "def f():\n    return {'k': [1, 2]}\n"]


def test_token_ids_equal_sentencepiece(glm3_model, sp):
    lines = [line for text in bilingual_corpus() for line in text.split("\n")] + EXTRA
    assert len(lines) > 150
    mismatched = [line for line in lines if glm3_model.tokenize(line) != sp.encode(line)]
    assert mismatched == []


def test_detokenize_round_trips(glm3_model, sp):
    for text in bilingual_corpus()[:60] + EXTRA[2:]:
        ids = sp.encode(text)
        assert glm3_model.detokenize(ids) == sp.decode(ids)  # the dummy-prefix space dropped, as sentencepiece does


def reference_chatglm3(sp, special, messages, tools=None):
    """The published ChatGLM3 build_chat_input, written from its documented behaviour."""
    ids = [special["[gMASK]"], special["sop"]]
    for role, metadata, content in messages:
        if role == "system" and tools is not None:
            content = content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
        ids += [special[f"<|{role}|>"]] + sp.encode(f"{metadata}\n") + sp.encode(content)
    return ids + [special["<|assistant|>"]]


def test_chatglm3_prompt_ids(glm3, glm3_model, sp):
    tools = [{"name": "get_weather", "description": "查询天气", "parameters": {"city": {"type": "string"}}}]
    convo = [("system", "", "You are ChatGLM3."), ("user", "", "北京天气怎么样？"),
             ("assistant", "get_weather", "```python\ntool_call(city='北京')\n```"),
             ("observation", "", '{"temperature": 22}'), ("assistant", "", "北京今天 22 度。"),
             ("user", "", "Thanks!\nAnd tomorrow?")]
    messages = [Message(r, c, metadata=m, tools=tools if r == "system" else None) for r, m, c in convo]
    assert glm3_model.prompt_ids(messages) == reference_chatglm3(sp, glm3.special, convo, tools)


def test_chatglm2_prompt_ids(glm2, workdir, sp):
    from chatglm.convert.pipeline import convert
    from chatglm.runtime.model import load

    path = convert(glm2.ckpt, workdir / "glm2-prompts.gguf", "f16").path
    with load(path, n_ctx=256) as m:
        got = m.prompt_ids([Message("user", "你好"), Message("assistant", "你好！"), Message("user", "1+1=?")])
    text = "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：1+1=?\n\n答："
    assert got == [glm2.special["[gMASK]"], glm2.special["sop"]] + sp.encode(text)


def test_bad_conversations(glm3_model):
    with pytest.raises(InputError, match="empty conversation"):
        glm3_model.prompt_ids([])
    with pytest.raises(InputError, match="unknown message role"):
        glm3_model.prompt_ids([{"role": "wizard", "content": "hi"}])


def test_chatglm3_tool_call_reply_is_parsed_without_eval(glm3_model):
    reply = glm3_model.format.parse_reply("get_weather\n```python\ntool_call(city='北京', days=2)\n```")
    assert reply.tool_calls[0].name == "get_weather"
    assert reply.tool_calls[0].arguments == {"city": "北京", "days": 2}
    hostile = glm3_model.format.parse_reply("f\n```python\ntool_call(x=__import__('os').system('echo hi'))\n```")
    assert isinstance(hostile.tool_calls[0].arguments, str)  # kept as text, never evaluated

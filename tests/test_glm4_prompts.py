"""GLM-4 chat formats, token-exact: the runtime's prompt ids (llama.cpp tokenizer over a converted tiny model) equal
a reference written here from the published chat templates' behaviour, tokenized the way ``apply_chat_template``
does (the rendered string split at the added tokens, each stretch encoded by tiktoken or ``tokenizers``).
Reply parsing (answers, tool calls, thinking) and streaming visibility are checked on text.
"""

from __future__ import annotations

import json
import re

import pytest

from chatglm.convert.pipeline import convert
from chatglm.devtools.glm4 import GLM45_EXTRA_SPECIALS, build_checkpoint, special_ids, tiktoken_encoding, train_glm4_bpe
from chatglm.errors import InputError
from chatglm.runtime.messages import Message, ToolCall
from chatglm.runtime.model import load
from chatglm.runtime.prompts import get_format

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "查询城市的天气 (weather of a city)",
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市名"},
                                                        "days": {"type": "integer"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "add", "description": "Add two numbers",
                                      "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}},
]
CALL_JSON = '{"city": "北京", "days": 3}'
FOOTER = "在调用上述函数时，请使用 Json 格式表示调用的参数。"
GLM4_HEADER = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
               "你的任务是针对用户的问题和要求提供适当的答复和支持。")
Z1_HEADER = ("你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"
             "你的任务是针对用户的问题和要求提供适当的答复和支持。")

CONVERSATIONS = {
    "single": [{"role": "user", "content": "你好"}],
    "system": [{"role": "system", "content": "You are a helpful assistant. 请简短回答。"},
               {"role": "user", "content": "What is 2+3?  Answer in English.  "}],
    "multi": [{"role": "system", "content": "你是助手。"}, {"role": "user", "content": "今天天气怎么样？"},
              {"role": "assistant", "content": "很好，阳光明媚。"},
              {"role": "user", "content": "\n\n  Indented\n\tcode:\n    def f(x):\n        return x\n"}],
    "tools": [{"role": "system", "content": "", "tools": TOOLS}, {"role": "user", "content": "北京天气如何？"}],
    "observation": [{"role": "system", "content": "你可以调用工具。", "tools": TOOLS},
                    {"role": "user", "content": "北京未来三天天气如何？"},
                    {"role": "assistant", "metadata": "get_weather", "content": CALL_JSON},
                    {"role": "observation", "content": '{"weather": "晴", "temperature": 25}'}],
}


# ------------------------------------------------------------------------------------------ references


def glm4_reference(messages: list[dict]) -> str:
    """glm-4-9b-chat's template: a message with tools opens a system block listing them; empty content is skipped."""
    out = "[gMASK]<sop>"
    for item in messages:
        if "tools" in item:
            out += f"<|system|>\n{GLM4_HEADER}\n\n# 可用工具"
            for tool in item["tools"]:
                fn = tool["function"]
                out += f"\n\n## {fn['name']}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n{FOOTER}"
        if item.get("content"):
            out += f"<|{item['role']}|>{item.get('metadata', '')}\n{item['content']}"
    return out + "<|assistant|>"


def edge_reference(messages: list[dict]) -> str:
    return "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages) + "<|assistant|>"


def glm0414_reference(messages: list[dict], z1: bool = False) -> str:
    """GLM-4-0414 / Z1: the tool list first, then every system message, then the rest; Z1 keeps the text after
    </think> (stripped) and opens the reply with <think>."""
    tools = [t for m in messages for t in m.get("tools", [])]
    out = "[gMASK]<sop>"
    if tools:
        out += "<|system|>\n" + (f"{Z1_HEADER}\n\n" if z1 else "") + "# 可用工具"
        for tool in tools:
            fn = tool.get("function") or tool
            out += f"\n\n## {fn['name']}\n\n{json.dumps(fn, ensure_ascii=False, indent=4)}\n{FOOTER}"
    out += "".join(f"<|system|>\n{m['content']}" for m in messages if m["role"] == "system")
    for m in messages:
        content = m["content"].split("</think>")[-1].strip() if z1 else m["content"]
        meta = m.get("metadata", "")
        if m["role"] == "assistant" and meta:
            out += f"<|assistant|>{meta} \n{content}"
        elif m["role"] != "system":
            out += f"<|{m['role']}|>\n{content}"
    return out + "<|assistant|>" + ("\n<think>" if z1 else "")


def glm45_reference(messages: list[dict]) -> str:
    """GLM-4.5's template rendered by hand (trim_blocks/lstrip_blocks whitespace)."""
    tools = [t for m in messages for t in m.get("tools", [])]
    out = "[gMASK]<sop>"
    if tools:
        out += ("<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
        out += "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools)
        out += ("</tools>\n\nFor each function call, output the function name and arguments within the following "
                "XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}"
                "</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            reasoning, content = m.get("reasoning_content"), m["content"]
            if not isinstance(reasoning, str):  # no reasoning_content: taken out of the content, if it has one
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            out += "<|assistant|>" + (f"\n<think>{reasoning.strip()}</think>" if i > last_user and reasoning
                                      else "\n<think></think>")
            out += f"\n{content.strip()}" if content.strip() else ""
            for call in m.get("tool_calls", []):
                out += f"\n<tool_call>{call['name']}\n"
                for k, v in call["arguments"].items():
                    value = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
                    out += f"<arg_key>{k}</arg_key>\n<arg_value>{value}</arg_value>\n"
                out += "</tool_call>"
        elif m["role"] == "observation":
            out += "<|observation|>" if messages[i - 1]["role"] != "observation" else ""
            out += f"\n<tool_response>\n{m['content']}\n</tool_response>"
        else:
            out += f"<|{m['role']}|>\n{m['content']}"
    return out + "<|assistant|>"


def tiktoken_ids(enc, specials: dict[str, int], rendered: str) -> list[int]:
    """PreTrainedTokenizer.tokenize: split at the added tokens, encode each stretch with tiktoken."""
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    ids: list[int] = []
    for part in re.split(pattern, rendered):
        if part in specials:
            ids.append(specials[part])
        elif part:
            ids += enc.encode(part, disallowed_special=())
    return ids


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tok():
    return train_glm4_bpe(user_defined=GLM45_EXTRA_SPECIALS)


@pytest.fixture(scope="module")
def models(tok, tmp_path_factory):
    """layout -> (loaded Model, checkpoint folder)."""
    root = tmp_path_factory.mktemp("glm4chat")
    out = {}
    for layout in ("glm4", "glm4-hf", "glm-edge", "glm4-0414", "glm4-z1", "glm45"):
        _, folder = build_checkpoint(layout, root / layout, tok)
        out[layout] = (load(convert(folder, root / f"{layout}.gguf", "f32").path, n_ctx=1024, n_threads=1), folder)
    yield out
    for model, _ in out.values():
        model.close()


def hf_ids(tok, rendered: str) -> list[int]:
    return tok.encode(rendered, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------ prompt ids


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_glm4_thudm_prompt_ids_equal_tiktoken_reference(name, tok, models):
    model, folder = models["glm4"]
    assert model.format.name == "glm4"
    conversation = CONVERSATIONS[name]
    enc = tiktoken_encoding(folder / "tokenizer.model")
    expected = tiktoken_ids(enc, special_ids(tok), glm4_reference(conversation))
    assert model.prompt_ids(conversation) == expected


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_glm4_hf_prompt_ids_equal_tokenizers_reference(name, tok, models):
    model, _ = models["glm4-hf"]
    assert model.prompt_ids(CONVERSATIONS[name]) == hf_ids(tok, glm4_reference(CONVERSATIONS[name]))


def test_structured_tool_call_renders_like_the_model_wrote_it(models):
    model, _ = models["glm4"]
    history = CONVERSATIONS["observation"]
    structured = history[:2] + [Message("assistant", tool_calls=[ToolCall("get_weather", json.loads(CALL_JSON))])] \
        + history[3:]
    assert model.prompt_ids(structured) == model.prompt_ids(history)


@pytest.mark.parametrize("name", ["single", "system", "multi"])
def test_glm_edge_prompt_ids(name, tok, models):
    model, _ = models["glm-edge"]
    assert model.format.name == "glm-edge"
    assert model.prompt_ids(CONVERSATIONS[name]) == hf_ids(tok, edge_reference(CONVERSATIONS[name]))
    with pytest.raises(InputError, match="no tool calling"):
        model.prompt_ids(CONVERSATIONS["tools"])


@pytest.mark.parametrize("layout", ["glm4-0414", "glm4-z1"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_glm4_0414_and_z1_prompt_ids(layout, name, tok, models):
    model, _ = models[layout]
    conversation = CONVERSATIONS[name]
    if layout == "glm4-z1" and name == "multi":
        conversation = [dict(m) for m in conversation]
        conversation[2]["content"] = "<think>reasoning that history drops</think>\n\n很好，阳光明媚。 "
    rendered = glm0414_reference(conversation, z1=layout == "glm4-z1")
    assert model.format.name == layout
    assert model.prompt_ids(conversation) == hf_ids(tok, rendered)


def glm45_conversations() -> dict[str, tuple[list[dict], list[Message]]]:
    """(reference dicts, runtime messages): a tool loop with reasoning after the last user turn, and a plain chat."""
    call = {"name": "get_weather", "arguments": {"city": "北京", "days": 3}}
    ref = [{"role": "system", "content": "你可以调用工具。", "tools": TOOLS},
           {"role": "user", "content": "第一个问题"},
           {"role": "assistant", "content": "<think>old reasoning</think>旧的回答"},
           {"role": "user", "content": "北京天气？"},
           {"role": "assistant", "content": "我来查一下。", "reasoning_content": "需要调用工具", "tool_calls": [call]},
           {"role": "observation", "content": "晴"}, {"role": "observation", "content": "25度"}]
    ours = [Message("system", "你可以调用工具。", tools=TOOLS), Message("user", "第一个问题"),
            Message("assistant", "<think>old reasoning</think>旧的回答"), Message("user", "北京天气？"),
            Message("assistant", "我来查一下。", tool_calls=[ToolCall("get_weather", {"city": "北京", "days": 3})],
                    thinking="需要调用工具"),
            Message("observation", "晴"), Message("observation", "25度")]
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+3?"}]
    return {"tools": (ref, ours), "plain": (plain, [Message.from_dict(m) for m in plain])}


@pytest.mark.parametrize("name", ["tools", "plain"])
def test_glm45_prompt_ids(name, tok, models):
    model, _ = models["glm45"]
    ref, ours = glm45_conversations()[name]
    assert model.format.name == "glm45"
    assert model.prompt_ids(ours) == hf_ids(tok, glm45_reference(ref))


# ------------------------------------------------------------------------------------------ stops and replies


@pytest.mark.parametrize("layout", ["glm4", "glm4-hf", "glm4-0414", "glm45"])
def test_stops_at_endoftext_user_and_observation(layout, tok, models):
    model, _ = models[layout]
    ids = special_ids(tok)
    assert {ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]} <= model.stop_ids
    assert ids["<|assistant|>"] not in model.stop_ids


def fmt(tok, name: str):
    return get_format(name, special_ids(tok))


def streamed(form, text: str) -> list[str]:
    """What stream_chat would show after each character, checked to be a prefix of the final content."""
    final = form.parse_reply(text).content
    shown = [form.visible(text[:i]).rstrip() for i in range(len(text) + 1)]
    assert all(final.startswith(s) for s in shown), (shown, final)
    return shown


def test_glm4_answer_hides_the_leading_newline(tok):
    form = fmt(tok, "glm4")
    reply = form.parse_reply("\n你好！I am GLM.\n")
    assert (reply.content, reply.tool_calls, reply.metadata) == ("你好！I am GLM.", [], "")
    assert streamed(form, "\nHello world")[-1] == "Hello world"
    assert streamed(form, "\nHello world")[1] == ""


def test_glm4_tool_call_is_parsed_as_json(tok):
    form = fmt(tok, "glm4")
    text = f"get_weather\n{CALL_JSON}"
    reply = form.parse_reply(text)
    assert reply.tool_calls == [ToolCall("get_weather", {"city": "北京", "days": 3})]
    assert (reply.metadata, reply.content) == ("get_weather", CALL_JSON)
    assert set(streamed(form, text)) == {""}  # a tool call is never shown as text


@pytest.mark.parametrize("text", [
    'get_weather\n{"city": __import__("os").getcwd()}',  # not JSON: never evaluated
    "get_weather\n{'city': 'Beijing'}",  # a Python literal is not JSON either
    "Sure\nhere it is",
    "print(1)\n{}",
])
def test_glm4_non_json_replies_are_answers(tok, text):
    form = fmt(tok, "glm4")
    reply = form.parse_reply(text)
    assert reply.tool_calls == [] and reply.content == text.strip()
    streamed(form, text)


def test_z1_thinking_is_kept_apart(tok):
    form = fmt(tok, "glm4-z1")
    text = "Let me think: 2+3=5.\n</think>\n\nThe answer is 5."
    reply = form.parse_reply(text)
    assert (reply.thinking, reply.content) == ("Let me think: 2+3=5.", "The answer is 5.")
    shown = streamed(form, text)
    assert shown[text.index("</think>")] == "" and shown[-1] == "The answer is 5."
    call = form.parse_reply(f"need weather</think>\nget_weather\n{CALL_JSON}")
    assert call.tool_calls == [ToolCall("get_weather", {"city": "北京", "days": 3})]


def test_glm4_0414_thinking_block_in_reply(tok):
    reply = fmt(tok, "glm4-0414").parse_reply("<think>hmm</think>\nAnswer")
    assert (reply.thinking, reply.content) == ("hmm", "Answer")


def test_glm45_reply_with_thinking_and_xml_tool_calls(tok):
    form = fmt(tok, "glm45")
    text = ("<think>需要查天气</think>\n我来查一下。\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
            "<arg_value>北京</arg_value>\n<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>"
            "<tool_call>add\n<arg_key>a</arg_key>\n<arg_value>[1, 2]</arg_value>\n</tool_call>")
    reply = form.parse_reply(text)
    assert reply.thinking == "需要查天气" and reply.content == "我来查一下。"
    assert reply.tool_calls == [ToolCall("get_weather", {"city": "北京", "days": 3}), ToolCall("add", {"a": [1, 2]})]
    shown = streamed(form, text)
    assert shown[-1] == "我来查一下。" and "<" not in "".join(shown)
    assert fmt(tok, "glm45").parse_reply("\n<think></think>\nHello").content == "Hello"


def test_unknown_tool_type_is_refused(tok, models):
    model, _ = models["glm4"]
    with pytest.raises(InputError, match="tool type 'python' is not supported"):
        model.prompt_ids([{"role": "system", "content": "", "tools": [{"type": "python"}]},
                          {"role": "user", "content": "hi"}])

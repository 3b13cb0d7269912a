"""GLM-4.5 .. GLM-5.3-Flash chat templates: our prompt ids equal transformers' ``apply_chat_template`` with each
reference template (../shared/reference/chat-templates, read through CHATGLM_REFERENCE), for the token-exact builders
and for the sandboxed Jinja path; hostile templates are refused in one line; the converter writes the template and
generation_config.json's eos ids into the GGUF, and the runtime picks its path from them.

Tokenizer: the tiny GLM-4 BPE with every special token these templates use (media ones included); prompt ids come from
llama.cpp's tokenizer over a converted tiny GLM-4.5, the reference ids from ``tokenizers`` on transformers' rendering.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from chatglm import families
from chatglm.convert.pipeline import convert
from chatglm.devtools.glm4 import GLM4_SPECIALS, GLM45_EXTRA_SPECIALS, build_checkpoint, special_ids, train_glm4_bpe
from chatglm.errors import InputError
from chatglm.families.glm5_next import FAMILY as GLM5_NEXT
from chatglm.families.glm5_next.chat import GLM53FlashFormat
from chatglm.gguf_file import read_header
from chatglm.runtime import jinja_chat
from chatglm.runtime.loader import chat_format_of
from chatglm.runtime.messages import Message, ToolCall
from chatglm.runtime.model import load
from chatglm.runtime.prompts import get_format
from chatglm.schema import keys
from hostile import ROOT, assert_refused, cli

REFERENCE = Path(os.environ.get("CHATGLM_REFERENCE") or next(
    (p for p in (ROOT.parent / "shared" / "reference", ROOT.parents[1] / "shared" / "reference") if p.is_dir()),
    ROOT.parent / "shared" / "reference"))
TEMPLATES = REFERENCE / "chat-templates"
needs_reference = pytest.mark.skipif(not TEMPLATES.is_dir(),
                                     reason=f"reference chat templates not found at {TEMPLATES} (set CHATGLM_REFERENCE)")

MEDIA = ("<|image|>", "<|video|>", "<|begin_of_audio|>", "<|end_of_audio|>")
# reference template file -> the token-exact builder that must reproduce it (None: the Jinja path only)
BUILDERS = {
    "GLM-4.6.llamacpp.jinja": "glm45",
    "GLM-4.7.unverified-dart-comment.jinja": "glm47",
    "GLM-5.3-Flash.jinja": "glm53flash",
    "GLM-5.3-Flash.04c4e9e9.jinja": "glm53flash",
    "GLM-4.5.llamacpp-modified.jinja": None,
    "GLM-5.3-Flash.weschera-modified.jinja": None,
    "GLM-OCR.unverified-dart-test.jinja": None,
}

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "查询天气 (weather)", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add numbers",
                                        "parameters": {"type": "object", "properties": {"a": {"type": "number"}}}}}
DEFERRED = {"type": "function", "function": {"name": "search", "description": "Search", "defer_loading": True,
                                             "parameters": {"type": "object", "properties": {}}}}


def call(name, args, cid=None):
    return {**({"id": cid} if cid else {}), "type": "function", "function": {"name": name, "arguments": args}}


# Conversations as transformers takes them: (messages, tools). "null" stands for an assistant turn that only calls
# tools (content None where the template handles None, see hf_reference).
DIALOGUES = {
    "single": ([{"role": "user", "content": "你好"}], None),
    "system": ([{"role": "system", "content": "You are brief. 请简短回答。"},
                {"role": "user", "content": "What is 2+3?  "}], None),
    "multi_reasoning": ([
        {"role": "system", "content": "你是助手。"},
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "old answer", "reasoning_content": "old reasoning"},
        {"role": "user", "content": "second /nothink"},
        {"role": "assistant", "content": "<think>\nthought in content\n</think>\n\nsecond answer"},
        {"role": "user", "content": "third"}], None),
    "tools_listing": ([{"role": "user", "content": "北京天气？"}], [WEATHER, ADD, DEFERRED]),
    "parallel_calls_reordered": ([
        {"role": "user", "content": "weather and sum"},
        {"role": "assistant", "content": "null", "reasoning_content": "two calls needed",
         "tool_calls": [call("get_weather", {"city": "北京", "days": 3}, "call_a"), call("add", {"a": [1, 2.5]}, "call_b")]},
        {"role": "tool", "content": "3.5", "tool_call_id": "call_b"},
        {"role": "tool", "content": "晴 25度", "tool_call_id": "call_a"}], [WEATHER, ADD]),
    "results_without_ids": ([
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("get_weather", {"city": "Paris"})]},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "It rains.", "reasoning_content": "after the tool"},
        {"role": "user", "content": "thanks"}], [WEATHER]),
}
OPTIONS = {"default": {}, "no_think": {"enable_thinking": False}, "keep": {"clear_thinking": False},
           "clear": {"clear_thinking": True}, "low": {"reasoning_effort": "low"}, "high": {"reasoning_effort": "high"}}


def template(name: str) -> str:
    return (TEMPLATES / name).read_text(encoding="utf-8")


def hf_dialogue(name: str, template_name: str) -> tuple[list[dict], list | None]:
    messages, tools = DIALOGUES[name]
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") == "null":  # None only where the template writes nothing for it (690b7052)
            m["content"] = None if template_name == "GLM-5.3-Flash.jinja" else ""
        out.append(m)
    return out, tools


def ours(name: str) -> list[Message]:
    """The same conversation as our messages (built by hand, not by the code under test)."""
    messages, tools = DIALOGUES[name]
    out = [Message("system", "", tools=list(tools))] if tools else []
    for m in messages:
        role = {"tool": "observation"}.get(m["role"], m["role"])
        content = "" if m.get("content") == "null" else m["content"]
        calls = [ToolCall(c["function"]["name"], c["function"]["arguments"], c.get("id", ""))
                 for c in m.get("tool_calls", [])]
        out.append(Message(role, content, tool_calls=calls, thinking=m.get("reasoning_content", ""),
                           tool_call_id=m.get("tool_call_id", "")))
    return out


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tok():
    return train_glm4_bpe(specials=GLM4_SPECIALS + MEDIA, user_defined=GLM45_EXTRA_SPECIALS)


@pytest.fixture(scope="module")
def hf(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def ckpt(tok, tmp_path_factory):
    return build_checkpoint("glm45", tmp_path_factory.mktemp("tpl") / "ckpt", tok)[1]


@pytest.fixture(scope="module")
def model(ckpt, tmp_path_factory):
    m = load(convert(ckpt, tmp_path_factory.mktemp("tplg") / "m.gguf", "f32").path, n_ctx=2048, n_threads=1)
    yield m
    m.close()


def builder(name: str, special: dict):
    """The token-exact format ``name``; GLM-5.3-Flash's is not registered on this branch (its family's face is the
    next helper's), so it is taken from its module."""
    if name == GLM53FlashFormat.name:
        return GLM53FlashFormat(special)
    return get_format(name, special)


def hf_reference(hf, tok, template_name: str, dialogue: str, options: dict) -> tuple[str, list[int]]:
    messages, tools = hf_dialogue(dialogue, template_name)
    text = hf.apply_chat_template(messages, tools=tools, chat_template=template(template_name),
                                  add_generation_prompt=True, tokenize=False, **options)
    return text, tok.encode(text, add_special_tokens=False).ids


# ------------------------------------------------------------------------------------------ prompt ids


@needs_reference
@pytest.mark.parametrize("template_name", [t for t, b in BUILDERS.items() if b])
def test_builders_are_token_exact_with_their_templates(template_name, hf, tok, model):
    fmt = builder(BUILDERS[template_name], model.info.special)
    checked = 0
    for dialogue in DIALOGUES:
        for option_name, options in OPTIONS.items():
            text, expected = hf_reference(hf, tok, template_name, dialogue, options)
            with fmt.using(options):
                got = fmt.prompt_ids(ours(dialogue), model.engine)
            assert got == expected, (dialogue, option_name, text, model.detokenize(got))
            checked += 1
    assert checked == len(DIALOGUES) * len(OPTIONS)


@needs_reference
@pytest.mark.parametrize("template_name", list(BUILDERS))
def test_the_jinja_path_equals_apply_chat_template(template_name, hf, tok, model):
    fmt = jinja_chat.JinjaFormat(model.info.special, template(template_name), model.info.added)
    for dialogue in DIALOGUES:
        for options in OPTIONS.values():
            text, expected = hf_reference(hf, tok, template_name, dialogue, options)
            hf_msgs, tools = jinja_chat.hf_messages(ours(dialogue))
            assert jinja_chat.render(template(template_name), hf_msgs, tools, True, **options) == text
            with fmt.using(options):
                assert fmt.prompt_ids(ours(dialogue), model.engine) == expected, (dialogue, options)


@needs_reference
def test_what_the_templates_say(hf, tok, model):
    """The differences the builders encode, seen in the rendered text."""
    def text(name, dialogue, **options):
        return hf_reference(hf, tok, name, dialogue, options)[0]

    flash = text("GLM-5.3-Flash.jinja", "parallel_calls_reordered")
    assert flash.startswith("[gMASK]<sop><|system|>Reasoning Effort: Max<|system|>")
    assert flash.index("<tool_response>晴 25度") < flash.index("<tool_response>3.5")  # call order, not message order
    assert '"strict"' not in flash and "search" not in flash
    assert text("GLM-5.3-Flash.jinja", "single", reasoning_effort="low").startswith(
        "[gMASK]<sop><|system|>Reasoning Effort: Low<|user|>")
    assert "<think>old reasoning</think>" in text("GLM-5.3-Flash.jinja", "multi_reasoning")  # kept by default
    assert "old reasoning" not in text("GLM-5.3-Flash.jinja", "multi_reasoning", clear_thinking=True)
    assert "old reasoning" not in text("GLM-4.7.unverified-dart-comment.jinja", "multi_reasoning")
    assert "<think>old reasoning</think>" in text("GLM-4.7.unverified-dart-comment.jinja", "multi_reasoning",
                                                  clear_thinking=False)
    assert text("GLM-4.7.unverified-dart-comment.jinja", "single", enable_thinking=False).endswith(
        "<|assistant|></think>")
    assert "<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京</arg_value>" in text(
        "GLM-4.7.unverified-dart-comment.jinja", "parallel_calls_reordered")
    nothink = text("GLM-4.6.llamacpp.jinja", "multi_reasoning", enable_thinking=False)
    assert "second /nothink<|assistant|>" in nothink and "third/nothink" in nothink  # not added twice
    assert text("GLM-5.3-Flash.04c4e9e9.jinja", "single") == text("GLM-5.3-Flash.jinja", "single")


@needs_reference
def test_known_templates_are_recognised_and_others_take_the_jinja_path():
    flash = {name for name, fmt in BUILDERS.items() if fmt == GLM53FlashFormat.name}
    assert {name: families.recognise_template(template(name)) for name in BUILDERS if name not in flash} == {
        name: fmt for name, fmt in BUILDERS.items() if name not in flash}
    assert {families.template_fingerprint(template(name)) for name in flash} == {fp for fp, _ in GLM5_NEXT.template_fingerprints}
    assert families.recognise_template(template("GLM-4.7.unverified-dart-comment.jinja").replace("\n", "\r\n")
                                       + "\n") == "glm47"
    assert families.recognise_template("") is None


# ------------------------------------------------------------------------------------------ replies


def test_glm47_replies_thinking_and_compact_calls(tok):
    fmt = get_format("glm47", special_ids(tok))
    fmt.prompt_ids([Message("user", "hi")], _CharTokenizer())  # the prompt ends inside <think>
    text = ('need the weather</think>Checking.<tool_call>get_weather<arg_key>city</arg_key><arg_value>北京'
            '</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call><tool_call>add<arg_key>a'
            '</arg_key><arg_value>{"x": [1, 2]}</arg_value></tool_call>')
    reply = fmt.parse_reply(text)
    assert reply.thinking == "need the weather" and reply.content == "Checking."
    assert reply.tool_calls == [ToolCall("get_weather", {"city": "北京", "days": 3}), ToolCall("add", {"a": {"x": [1, 2]}})]
    shown = [fmt.visible(text[:i]) for i in range(len(text) + 1)]
    thoughts = [fmt.visible_thinking(text[:i]) for i in range(len(text) + 1)]
    assert all("<" not in s and "Checking.".startswith(s.rstrip()) for s in shown)
    assert all("need the weather".startswith(t) for t in thoughts) and thoughts[-1] == "need the weather"
    bad = fmt.parse_reply('x</think><tool_call>f<arg_key>a</arg_key><arg_value>__import__("os")</arg_value></tool_call>')
    assert bad.tool_calls == [ToolCall("f", {"a": '__import__("os")'})]  # not JSON: the string, never evaluated


class _CharTokenizer:
    def tokenize(self, text: str) -> list[int]:
        return [ord(c) for c in text]


# ------------------------------------------------------------------------------------------ hostile templates

HOSTILE = {
    # the step bound, or on a loaded machine the time bound, whichever comes first
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": ("steps", "longer than 5 s"),
    "{{ 'x' * 100000000 }}": "longer than",
    "{{ 9 ** 999999 }}": "too large",
    "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}":
        "longer than",
    "{% for i in range(99999) %}{{ 'y' * 5000 }}{% endfor %}": "longer than",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}": "unsafe",
    "{{ messages.__class__.__init__.__globals__ }}": "unsafe",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}": "RecursionError",
    "{{ raise_exception('no system messages') }}": "no system messages",
    "{{ '%999999999d' % 1 }}": "format width",
    "{% for %}": "not valid Jinja",
}


@pytest.mark.parametrize("source", list(HOSTILE))
def test_hostile_templates_are_refused_in_one_line(source):
    start = time.monotonic()
    with pytest.raises(InputError) as info:
        jinja_chat.render(source, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 8
    message = str(info.value)
    expected = HOSTILE[source] if isinstance(HOSTILE[source], tuple) else (HOSTILE[source],)
    assert any(e in message for e in expected) and "\n" not in message and len(message) < 300, message


def test_template_size_is_bounded():
    with pytest.raises(InputError, match="larger than"):
        jinja_chat.compile_template("x" * (jinja_chat.MAX_TEMPLATE + 1))


def test_transformers_helpers_work():
    out = jinja_chat.render("{{ tools | tojson(indent=2, sort_keys=True) }}{% generation %}{{ strftime_now('%Y') }}"
                            "{% endgeneration %}{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                            "{{ m.content }}{% endfor %}", [{"role": "user", "content": "a"}, {"role": "user",
                                                                                              "content": "b"}],
                            tools=[{"b": 1, "a": "é"}])
    assert out == '[\n  {\n    "a": "é",\n    "b": 1\n  }\n]' + time.strftime("%Y") + "a"


# ------------------------------------------------------------------------------------------ conversion and choice


def variant(src: Path, dst: Path, chat_template: str) -> Path:
    """A copy of checkpoint ``src`` with this chat_template.jinja."""
    shutil.copytree(src, dst)
    (dst / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return dst


@needs_reference
def test_converter_writes_the_template_and_eos_ids_and_stops_on_them(ckpt, tok, tmp_path):
    ids = special_ids(tok)
    gen = {"eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], 10**8, ids["<|end_of_video|>"]]}
    folder = variant(ckpt, tmp_path / "ck", template("GLM-4.7.unverified-dart-comment.jinja"))
    (folder / "generation_config.json").write_text(json.dumps(gen))
    header = read_header(convert(folder, tmp_path / "m.gguf", "f32").path)
    assert header.get("tokenizer.chat_template") == template("GLM-4.7.unverified-dart-comment.jinja")
    assert header.get(keys.CHAT_FORMAT) == "glm47"
    assert list(header.array(keys.STOP_TOKEN_IDS)) == [i for i in gen["eos_token_id"] if i < 10**8]  # in the vocab
    with load(tmp_path / "m.gguf", n_ctx=256, n_threads=1) as m:
        assert m.format.name == "glm47" and ids["<|end_of_video|>"] in m.stop_ids
        assert ids["<|observation|>"] in m.stop_ids and ids["<|assistant|>"] not in m.stop_ids
    result = cli(["info", tmp_path / "m.gguf"])
    assert "chat           glm47 (token-exact builder)" in result.out


def test_a_named_template_list_gives_its_default(ckpt, tmp_path):
    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "{{ 'D' }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    header = read_header(convert(folder, tmp_path / "m.gguf", "f32").path)
    assert header.get("tokenizer.chat_template") == "{{ 'D' }}"
    assert header.get(keys.CHAT_FORMAT) == keys.JINJA_CHAT_FORMAT


@needs_reference
def test_unknown_templates_take_the_sandboxed_path(ckpt, tok, hf, tmp_path):
    name = "GLM-5.3-Flash.weschera-modified.jinja"
    folder = variant(ckpt, tmp_path / "ck", template(name))
    path = convert(folder, tmp_path / "m.gguf", "f32").path
    assert read_header(path).get(keys.CHAT_FORMAT) == keys.JINJA_CHAT_FORMAT
    with load(path, n_ctx=512, n_threads=1) as m:
        assert m.format.name == "jinja"
        conversation = [{"role": "user", "content": "hi"}]
        expected = hf.apply_chat_template(conversation, chat_template=template(name), add_generation_prompt=True,
                                          tokenize=False, enable_thinking=False)
        assert m.prompt_ids(conversation, enable_thinking=False) == tok.encode(expected, add_special_tokens=False).ids
        reply = m.chat(conversation, max_tokens=4)
        assert isinstance(reply.content, str)
    assert "the GGUF's Jinja template (sandboxed)" in cli(["info", path]).out


@needs_reference
def test_a_gguf_without_our_format_key_is_recognised_by_its_template(model):
    class Header:
        def __init__(self, template_text, arch="glm4moe"):
            self.kv = {"tokenizer.chat_template": template_text}
            self.arch = arch

        def get(self, key, default=None):
            return self.kv.get(key, default)

    special = model.info.special
    assert chat_format_of(Header(template("GLM-4.6.llamacpp.jinja")), special) == "glm45"
    assert chat_format_of(Header(template("GLM-4.7.unverified-dart-comment.jinja")), special) == "glm47"
    assert chat_format_of(Header(template("GLM-OCR.unverified-dart-test.jinja")), special) == "jinja"
    assert chat_format_of(Header(None), special) == "glm45"
    # GLM-5.3-Flash's template in a glm4moe file: not its builder (another family's format), the sandbox instead
    assert chat_format_of(Header(template("GLM-5.3-Flash.jinja")), special) == "jinja"
    # before GLM-4.5 the builders stand for their published prompts (tool calls as JSON or code): kept
    assert chat_format_of(Header("{{ messages }}", "glm4"), special) == "glm4-0414"


@needs_reference
@pytest.mark.parametrize("template_name, expected", [("GLM-4.7.unverified-dart-comment.jinja", "glm47"),
                                                     ("GLM-OCR.unverified-dart-test.jinja", "jinja")])
def test_a_converted_file_without_our_format_key_loads_with_the_right_path(ckpt, tok, hf, tmp_path, monkeypatch,
                                                                          template_name, expected):
    """As a file from llama.cpp's converter: tokenizer.chat_template, no glm.chat_format."""
    folder = variant(ckpt, tmp_path / "ck", template(template_name))
    with monkeypatch.context() as patch:
        patch.setattr(keys, "CHAT_FORMAT", "general.not_our_format_key")
        path = convert(folder, tmp_path / "m.gguf", "f32").path
    assert keys.CHAT_FORMAT not in read_header(path).kv
    with load(path, n_ctx=512, n_threads=1) as m:
        assert m.format.name == expected
        conversation, tools = hf_dialogue("parallel_calls_reordered", template_name)
        text = hf.apply_chat_template(conversation, tools=tools, chat_template=template(template_name),
                                      add_generation_prompt=True, tokenize=False)
        assert m.prompt_ids(ours("parallel_calls_reordered")) == tok.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("name, data, problem", [
    ("generation_config.json", b'{"eos_token_id": "two"}', "'eos_token_id' must be a token id"),
    ("chat_template.jinja", b"x" * ((1 << 20) + 1), "chat template is larger than"),
    ("chat_template.jinja", b"{{ messages }}\xff\xfe", "not UTF-8"),
    ("tokenizer_config.json", {"chat_template": 5}, "chat_template"),
    ("tokenizer_config.json", {"chat_template": [{"name": "default", "template": ["x"]}]}, "chat_template[0]"),
])
def test_bad_chat_files_are_refused_in_one_line(ckpt, tmp_path, name, data, problem):
    folder = tmp_path / "ck"
    shutil.copytree(ckpt, folder)
    if isinstance(data, dict):  # a field of the JSON file
        data = json.dumps({**json.loads((folder / name).read_text()), **data}).encode()
    (folder / name).write_bytes(data)
    out = tmp_path / "x.gguf"
    assert_refused(cli(["convert", folder, "-t", "f32", "-o", out]), name, problem=problem, dest=out)


def test_template_options_are_checked(model):
    with pytest.raises(InputError, match="reasoning_effort must be one of low, high, max"):
        model.prompt_ids("hi", reasoning_effort="medium")
    with pytest.raises(InputError, match="enable_thinking must be true or false"):
        model.prompt_ids("hi", template_kwargs={"enable_thinking": "yes"})
    with pytest.raises(InputError, match="messages is not a template option"):
        model.prompt_ids("hi", template_kwargs={"messages": []})
    assert model.prompt_ids("hi", enable_thinking=False) != model.prompt_ids("hi")  # glm45: /nothink


def test_run_takes_thinking_and_effort_options(model):
    import json as json_

    def prompt_tokens(*flags):
        out = cli(["run", model.info.path, "-p", "hi", "--json", "-n", "1", "-t", "1", *flags])
        assert out.code == 0, out.text
        return json_.loads(out.out)["usage"]["prompt_tokens"]

    think, no_think = prompt_tokens("--think"), prompt_tokens("--no-think")
    assert no_think > think == prompt_tokens()  # glm45: "/nothink" and "\n<think></think>" added
    assert prompt_tokens("--reasoning-effort", "low") == think  # read by GLM-5.3-Flash's template only
    bad = cli(["run", model.info.path, "-p", "hi", "--reasoning-effort", "medium"])
    assert bad.code == 2 and "medium" in bad.text and "Traceback" not in bad.text

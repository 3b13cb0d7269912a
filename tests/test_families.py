"""The family registry: what the descriptors give the shared code equals the tables it replaced, detection reads
config.json keys and tokenizer files only, and says what it saw when nothing matches."""

from __future__ import annotations

import json
import shutil

import pytest

from chatglm import families
from chatglm.convert.checkpoint import Checkpoint
from chatglm.convert.family import detect
from chatglm.convert.pipeline import convert
from chatglm.errors import UnsupportedModelError
from chatglm.gguf_file import read_header

# The tables the descriptors replaced, as they were written out by hand before.
OLD_SPECIAL_TEXTS = {"[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<sop>", "<eop>", "<|endoftext|>", "<|system|>",
                     "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>", "<|begin_of_image|>",
                     "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
                     "<tool_response>", "</tool_response>", "/nothink"}
OLD_ENGINES = {"chatglm": "chatglm.runtime.llama_engine:LlamaEngine",
               "glm4": "chatglm.runtime.llama_engine:LlamaEngine",
               "glm4moe": "chatglm.runtime.llama_engine:LlamaEngine",
               "chatglm1": "chatglm.runtime.glm1.engine:GLM1Engine"}
# GLM-5.3-Flash's media placeholders (issue #18): control tokens of its vocabulary that its format keeps special.
NEW_SPECIAL_TEXTS = {"<|image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|video|>", "<|end_of_video|>",
                     "<|begin_of_audio|>", "<|end_of_audio|>", "<|pad|>"}  # <|pad|>: GLM-ASR's audio placeholder
# Architectures added since (issue #18), each run by llama.cpp.
NEW_LLAMA_ARCHS = {"glm-dsa", "deepseek2", "glm5-next", "llama"}  # llama: GLM-ASR's language model


def test_descriptors_give_the_old_tables():
    from chatglm.convert.qtypes import MODEL_ARCHS
    from chatglm.runtime.llama_engine import LLAMA_ARCHES
    from chatglm.runtime.loader import ENGINES
    from chatglm.runtime.perplexity import CAUSAL_PREFIX

    assert families.special_tokens() == OLD_SPECIAL_TEXTS | NEW_SPECIAL_TEXTS
    assert ENGINES == {**OLD_ENGINES, **dict.fromkeys(NEW_LLAMA_ARCHS, OLD_ENGINES["glm4moe"])}
    assert CAUSAL_PREFIX == {"chatglm1": ("[gMASK]", "<sop>")}
    assert set(LLAMA_ARCHES) == {"chatglm", "glm4", "glm4moe", *NEW_LLAMA_ARCHS}
    assert len(LLAMA_ARCHES) == 3 + len(NEW_LLAMA_ARCHS)
    assert MODEL_ARCHS == {"chatglm", "chatglm1", "glm4", "glm4moe", *NEW_LLAMA_ARCHS}


@pytest.mark.parametrize("arch,special,expected", [
    ("chatglm", {"<|endoftext|>", "<|user|>"}, "glm4"),
    ("chatglm", {"<|user|>"}, "chatglm3"),
    ("chatglm", set(), "chatglm2"),
    ("glm4", set(), "glm4-0414"),
    ("glm4moe", {"<|user|>"}, "glm45"),
    ("chatglm1", set(), "chatglm1"),
    ("llama", set(), None),
])
def test_a_gguf_without_a_chat_format_gets_the_old_guess(arch, special, expected):
    assert families.guess_format(arch, dict.fromkeys(special, 0)) == expected


def test_an_unknown_config_says_which_keys_were_seen(glm2, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(glm2.ckpt, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["padded_vocab_size"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with Checkpoint(ckpt) as c, pytest.raises(UnsupportedModelError) as err:
        detect(c)
    message = str(err.value)
    assert "model_type='chatglm', architectures=['ChatGLMModel']" in message
    assert "keys present: multi_query_attention" in message and "absent: " in message
    assert "padded_vocab_size" in message.split("absent: ")[1] and "position_encoding_2d" in message


def test_chatglm3_is_told_from_chatglm2_by_tokenizer_config_not_by_python_files(glm2, tmp_path):
    plain = tmp_path / "plain"
    shutil.copytree(glm2.ckpt, plain)
    (plain / "tokenization_chatglm.py").write_text(  # the published ChatGLM3 source names the role tokens
        'role_special_tokens = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]\n')
    assert read_header(convert(plain, tmp_path / "plain.gguf", "f32").path).get("glm.family") == "chatglm2"

    added = tmp_path / "added"
    shutil.copytree(glm2.ckpt, added)
    cfg = json.loads((added / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {"64795": {"content": "<|user|>"}, "64797": {"content": "<|observation|>"}}
    (added / "tokenizer_config.json").write_text(json.dumps(cfg))
    header = read_header(convert(added, tmp_path / "added.gguf", "f32").path)
    assert header.get("glm.family") == "chatglm3" and header.get("glm.chat_format") == "chatglm3"

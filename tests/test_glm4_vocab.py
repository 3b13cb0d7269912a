"""GLM-4 byte-level BPE export: merges recovered from tiktoken ranks, tokenizer parity through llama.cpp, bad inputs.

The tiny tokenizer is trained with the ``tokenizers`` library (chatglm.devtools.glm4) and written in both published
formats; the references are tiktoken (THUDM layout) and ``tokenizers`` (tokenizer.json layouts), test-only.
"""

from __future__ import annotations

import base64
import json

import gguf
import pytest

from chatglm.convert.pipeline import convert
from chatglm.convert.vocab_bpe import GLM4_PATTERN, is_tiktoken, merges_from_ranks, read_tiktoken, spell
from chatglm.devtools.corpus import bilingual_corpus
from chatglm.devtools.glm4 import GLM45_EXTRA_SPECIALS, build_checkpoint, special_ids, tiktoken_encoding, train_glm4_bpe
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.gguf_file import read_header
from chatglm.runtime.loader import open_engine

EDGE_CASES = [
    " ", "  two leading spaces", "trailing spaces   ", "a\r\nb\rc", "\n\n\nthree newlines", "tab\tseparated\t\t",
    "I'M HERE, you'LL see; they'Re 'quoted' don't", "1234567890 12 345 3.14159", "３．１４ 全角数字１２３",
    "emoji 😀👍🏽 and flags 🇨🇳", "混合mixed中英文text，标点！", "    def f(x):\n        return x * 2\n", "x  \n  y",
    "\u00a0nbsp\u2009thin", "zero\u200bwidth", "Ünïcödé àccents", "a   b    c     d", "??!!...---", "\t\n \r\n",
    "literal <|user|> and [gMASK] text", "URL https://example.org/a_b?c=1&d=2#frag",
]


@pytest.fixture(scope="module")
def tok():
    return train_glm4_bpe(user_defined=GLM45_EXTRA_SPECIALS)


@pytest.fixture(scope="module")
def engines(tok, tmp_path_factory):
    """llama.cpp engines over the converted THUDM (tiktoken) and tokenizer.json layouts."""
    root = tmp_path_factory.mktemp("glm4vocab")
    out = {}
    for layout in ("glm4", "glm4-hf"):
        _, folder = build_checkpoint(layout, root / layout, tok)
        result = convert(folder, root / f"{layout}.gguf", "f32")
        out[layout] = (folder, open_engine(result.path, n_ctx=64, n_threads=1))
    yield out
    for _, engine in out.values():
        engine.close()


def corpus() -> list[str]:
    return bilingual_corpus() + EDGE_CASES


def test_merges_replay_tiktoken_ranks():
    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"ab": 256, b"abc": 257, b"bc": 258, b"xyz": 259, b"abcbc": 260})
    merges = merges_from_ranks(ranks)
    # "abc" is built as ab+c (ab has the lower rank), and a+bc (its other split into two tokens) follows it;
    # "xyz" has no path from bytes and gets no merge; "abcbc" joins abc+bc, the pair left once only ranks below 260
    # may merge.
    assert merges == ["a b", "ab c", "a bc", "b c", "abc bc"]


def test_spelling_is_gpt2_byte_level():
    assert spell(b" \n\t") == "ĠĊĉ"
    assert spell("你".encode()) == "ä½ł"
    assert len({spell(bytes([b])) for b in range(256)}) == 256


def test_tiktoken_parity(tok, engines):
    folder, engine = engines["glm4"]
    enc = tiktoken_encoding(folder / "tokenizer.model")
    mismatches = [line for line in corpus() if engine.tokenize(line) != enc.encode(line, disallowed_special=())]
    assert mismatches == []
    assert engine.detokenize(enc.encode(corpus()[5])) == corpus()[5]


def test_tokenizer_json_parity(tok, engines):
    _, engine = engines["glm4-hf"]
    lines = [line for line in corpus() if "<|" not in line] + ["a<think>b</think>c", "<tool_call>get\n<arg_key>k"]
    mismatches = [line for line in lines if engine.tokenize(line) != tok.encode(line, add_special_tokens=False).ids]
    assert mismatches == []
    for line in corpus():
        assert engine.detokenize(engine.tokenize(line)) == line


def test_control_token_text_in_content_stays_text(tok, engines):
    """``tokenizers`` turns "<|user|>" in text into the special token; the runtime tokenizes it as text (content
    cannot inject control tokens), which is ``tokenizers`` with special-token parsing off."""
    _, engine = engines["glm4-hf"]
    line = "literal <|user|> and [gMASK] text"
    assert special_ids(tok)["<|user|>"] in tok.encode(line, add_special_tokens=False).ids
    tok.encode_special_tokens = True
    try:
        assert engine.tokenize(line) == tok.encode(line, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False


def test_special_tokens_are_control_and_end_generation(tok, engines):
    ids = special_ids(tok)
    for layout in ("glm4", "glm4-hf"):
        info = engines[layout][1].info
        assert {ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]} <= info.eog
        assert ids["<|assistant|>"] not in info.eog
        assert info.special["[gMASK]"] == ids["[gMASK]"] and info.special["<sop>"] == ids["<sop>"]
        header = read_header(info.path)
        types = header.array("tokenizer.ggml.token_type")
        assert int(types[ids["<|user|>"]]) == gguf.TokenType.CONTROL
        assert header.kv["tokenizer.ggml.tokens"][-1] == f"[PAD{len(types) - 1}]"
        assert engines[layout][1].token_bytes(ids["<|user|>"]) == b""
    header = read_header(engines["glm4"][1].info.path)
    assert header.kv["tokenizer.ggml.pre"] == "glm4"  # tiktoken emits a pre-token found in the vocab whole
    assert header.kv["tokenizer.ggml.eot_token_id"] == ids["<|user|>"]
    assert header.kv["tokenizer.ggml.eom_token_id"] == ids["<|observation|>"]


def test_user_defined_markers_keep_their_text(tok, engines):
    _, engine = engines["glm4-hf"]
    think = special_ids(tok)["<think>"]
    assert engine.tokenize("<think>") == [think]
    assert engine.token_bytes(think) == b"<think>"


# ----------------------------------------------------------------------------------------------- bad inputs


def test_is_tiktoken_by_content(tmp_path):
    good = tmp_path / "good.model"
    good.write_text(f"{base64.b64encode(b'ab').decode()} 0\n{base64.b64encode(b'c').decode()} 1\n")
    assert is_tiktoken(good)
    for content in (b"\x0a\x05hello", b"hello world\n", b"", b"QQ== x\n"):
        bad = tmp_path / "bad.model"
        bad.write_bytes(content)
        assert not is_tiktoken(bad)


@pytest.mark.parametrize("lines, message", [
    (["QQ== 0", "QQ== 1"], "duplicate token"),
    (["QQ== 0", "Qg== 2"], "without gaps"),
    (["QQ== 0", "not base64 1"], "line 2 is not a tiktoken"),
])
def test_read_tiktoken_rejects(tmp_path, lines, message):
    path = tmp_path / "tokenizer.model"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(InputError, match=message) as err:
        read_tiktoken(path)
    assert err.value.path == str(path)


def test_read_tiktoken_needs_every_byte(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(255)))
    with pytest.raises(InputError, match="1 single bytes have no token .first: 0xff."):
        read_tiktoken(path)


def test_tokenizer_model_of_neither_format(tok, tmp_path):
    _, folder = build_checkpoint("glm4", tmp_path / "ck", tok)
    (folder / "tokenizer.model").write_bytes(b"this is neither format\n")
    with pytest.raises(InputError, match="neither a SentencePiece model nor tiktoken") as err:
        convert(folder, tmp_path / "out.gguf", "f32")
    assert err.value.path == str(folder / "tokenizer.model")
    assert not (tmp_path / "out.gguf").exists()


def test_tokenizer_config_without_role_tokens(tok, tmp_path):
    _, folder = build_checkpoint("glm4", tmp_path / "ck", tok)
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    roles = {"<|user|>", "<|assistant|>", "<|observation|>"}
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items() if v["content"] not in roles}
    path.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=r"<\|user\|>, <\|assistant\|>, <\|observation\|> are not defined") as err:
        convert(folder, tmp_path / "out.gguf", "f32")
    assert err.value.path == str(path)


def test_tokenizer_config_without_added_tokens(tok, tmp_path):
    _, folder = build_checkpoint("glm4", tmp_path / "ck", tok)
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    with pytest.raises(InputError, match="no 'added_tokens_decoder'"):
        convert(folder, tmp_path / "out.gguf", "f32")


def test_tokenizer_json_with_another_pre_tokenizer(tok, tmp_path):
    _, folder = build_checkpoint("glm4-hf", tmp_path / "ck", tok)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text())
    assert data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] == GLM4_PATTERN
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\w+|\s+"
    path.write_text(json.dumps(data))
    with pytest.raises(UnsupportedModelError, match="pre-tokenizer is not GLM-4's"):
        convert(folder, tmp_path / "out.gguf", "f32")


def test_added_token_beyond_the_embedding(tok, tmp_path):
    _, folder = build_checkpoint("glm4", tmp_path / "ck", tok, extra_rows=0)
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    n = tok.get_vocab_size()
    cfg["added_tokens_decoder"][str(n)] = {"content": "<|extra|>", "special": True}
    path.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=f"token id {n} does not fit the model's {n} embedding rows"):
        convert(folder, tmp_path / "out.gguf", "f32")


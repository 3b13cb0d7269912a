"""The GLM-1 tokenizer (from the GGUF) against the published SPTokenizer semantics, in both id arrangements."""

from __future__ import annotations

import pytest
from fixtures_glm1 import glm1, glm1_dir, glm1_gguf, ice_model  # noqa: F401  (fixtures)

from chatglm.convert.pipeline import convert
from chatglm.devtools.corpus import RARE_LINES, bilingual_corpus
from chatglm.devtools.glm1 import ReferenceTokenizer, tiny_glm1_checkpoint, train_ice_tokenizer
from chatglm.gguf_file import read_header
from chatglm.runtime.glm1.tokenizer import GLM1Tokenizer

WHITESPACE = [
    "a b", "a  b", "a   b", "a" + " " * 80 + "b", "a" + " " * 81 + "b", " " * 200, "x" + " " * 79,
    "\t", "\t\tindented", "  \t  mixed \t", "\n", "\n\n\n", "line1\nline2\n", " leading", "trailing ", "  both  ",
    "def f(x):\n    return x\n\n\tpass", "中文  空格\n换行\t制表", "", "<n>", "[gMASK]", "<|blank_3|>",
]


def corpus() -> list[str]:
    lines = list(bilingual_corpus()) + list(RARE_LINES) + WHITESPACE
    joined = "\n".join(lines[:40])  # a long multi-line text as well
    return lines + [joined]


def test_final_release_ids_and_text_match_reference(glm1, glm1_gguf):
    tok = GLM1Tokenizer(read_header(glm1_gguf))
    ref = glm1.tok
    mismatched = [t for t in corpus() if tok.encode(t) != ref.encode(t)]
    assert not mismatched
    undecoded = [t for t in corpus() if tok.decode(tok.encode(t)) != ref.decode(ref.encode(t))]
    assert not undecoded
    # Newlines, tabs and space runs went through their pieces, and byte fallback was used somewhere.
    pieces = {ref.sp.id_to_piece(i) for t in corpus() for i in ref.sp.encode(tok.preprocess(t))}
    assert {"<n>", "<|tab|>", "<|blank_2|>", "<|blank_79|>", "<|blank_80|>"} <= pieces
    assert any(ref.sp.is_byte(i) for t in RARE_LINES for i in ref.sp.encode(t))


def test_streamed_bytes_rebuild_the_text(glm1, glm1_gguf):
    """token_bytes (used while streaming) joins to the decoded text, up to the leading dummy-prefix space."""
    tok = GLM1Tokenizer(read_header(glm1_gguf))
    for text in corpus():
        ids = tok.encode(text)
        streamed = b"".join(tok.token_bytes(i) for i in ids).decode("utf-8", errors="replace")
        decoded = tok.decode(ids)
        assert streamed == decoded or streamed == " " + decoded, text


def test_special_tokens_sit_at_the_final_release_ids(glm1, glm1_gguf):
    header = read_header(glm1_gguf)
    tokens = header.get("tokenizer.ggml.tokens")
    c = glm1.config
    assert [tokens[c[k]] for k in ("mask_token_id", "gmask_token_id", "bos_token_id", "eos_token_id")] == \
        ["[MASK]", "[gMASK]", "<sop>", "<eop>"]
    assert header.get("tokenizer.ggml.bos_token_id") == c["bos_token_id"]
    assert header.get("tokenizer.ggml.eos_token_id") == c["eos_token_id"]
    tok = GLM1Tokenizer(header)
    assert tok.token_bytes(c["gmask_token_id"]) == b"" and tok.token_bytes(c["eos_token_id"]) == b""
    assert tok.encode("\n") == glm1.tok.encode("\n")


@pytest.fixture(scope="module")
def first_release(glm1_dir):
    """The first release's arrangement: a text-only ice_text.model, 20 image tokens before it (20000 published)."""
    model = train_ice_tokenizer(glm1_dir / "ice_text_v1.model", first_release=True)
    folder, config, _ = tiny_glm1_checkpoint(glm1_dir / "v1", model, image_tokens=20, num_layers=1)
    return folder, config, ReferenceTokenizer(model, 20), convert(folder, glm1_dir / "v1.gguf", "f32").path


def test_first_release_is_completed_and_shifted(first_release):
    _, config, ref, path = first_release
    header = read_header(path)
    tok = GLM1Tokenizer(header)
    assert tok.image_tokens == 20
    tokens = header.get("tokenizer.ggml.tokens")
    assert tokens[:2] == ["<image_0>", "<image_1>"] and tokens[config["gmask_token_id"]] == "[gMASK]"
    assert config["gmask_token_id"] - 20 == ref.sp.piece_to_id("[gMASK]")  # appended after the text pieces
    for text in corpus():
        ids = tok.encode(text)
        assert ids == ref.encode(text) and all(i >= 20 for i in ids)
        assert tok.decode(ids) == ref.decode(ids)
    assert tok.token_bytes(3) == b""  # an image token adds no text


def test_ids_from_another_release_are_refused(glm1_dir, ice_model):
    """config.json's special ids must be the ones the tokenizer gives (releases moved them by 20000)."""
    import json

    from chatglm.errors import InputError

    folder, config, _ = tiny_glm1_checkpoint(glm1_dir / "mixed", ice_model, num_layers=1)
    config["gmask_token_id"] += 20000
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(InputError, match="gmask_token_id=.* but ice_text.model .* gives"):
        convert(folder, glm1_dir / "mixed.gguf", "f32")

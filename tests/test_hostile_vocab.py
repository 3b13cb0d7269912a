"""Hostile vocabularies and tokenizer files through ``chatglm convert`` (issue #16).

Each case edits the tokenizer files of a tiny checkpoint in code and checks the promise: exit 2, one ``error:`` line
naming the file and the problem, nothing at the destination, sources unchanged. Vocabularies that used to reach
llama.cpp's aborting paths (repeated token texts, missing byte pieces) are loaded in a child process. The tests
against the real published tokenizers skip when the test-only reference data is absent.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from chatglm.convert.vocab_bpe import merges_from_ranks
from chatglm.convert.vocab_ice import USER_DEFINED, Piece, pieces_of, with_pieces
from chatglm.devtools.corpus import bilingual_corpus
from fixtures_glm1 import glm1, glm1_dir, ice_model  # noqa: F401  (fixtures)
from hostile import ROOT, assert_refused, cli, digest

REFERENCE = Path(os.environ.get("CHATGLM_REFERENCE") or next(
    (p for p in (ROOT.parent / "shared" / "reference", ROOT.parents[1] / "shared" / "reference") if p.is_dir()),
    ROOT.parent / "shared" / "reference"))
TOKENIZERS = REFERENCE / "tokenizers"
needs_reference = pytest.mark.skipif(not TOKENIZERS.is_dir(),
                                     reason=f"real tokenizers not found at {TOKENIZERS} (set CHATGLM_REFERENCE)")


# --------------------------------------------------------------------------------------------------- helpers
def variant(src: Path, tmp_path: Path) -> Path:
    """A copy of checkpoint ``src`` to edit."""
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    return folder


def edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    out = change(data)
    path.write_text(json.dumps(data if out is None else out, ensure_ascii=False), encoding="utf-8")


def edit_pieces(path: Path, change: Callable[[list[Piece]], list[Piece]], byte_fallback: bool | None = None) -> None:
    proto = path.read_bytes()
    path.write_bytes(with_pieces(proto, change(pieces_of(proto)), byte_fallback=byte_fallback))


def renamed(index: int, text: str, kind: int | None = None) -> Callable[[list[Piece]], list[Piece]]:
    def change(pieces: list[Piece]) -> list[Piece]:
        old = pieces[index]
        pieces[index] = Piece(text, old.score, old.type if kind is None else kind)
        return pieces
    return change


def first_normal(path: Path) -> int:
    """Index of a plain multi-character piece (safe to rename)."""
    return next(i for i, p in enumerate(pieces_of(path.read_bytes())) if p.type == 1 and len(p.text) > 2)


def refused(folder: Path, tmp_path: Path, names: str | Path, problem: str, isolated: bool = False) -> None:
    dest = tmp_path / "out.gguf"
    before = digest([folder])
    outcome = cli(["convert", folder, "-o", dest, "-t", "f32"], isolated=isolated, timeout=120)
    assert_refused(outcome, names, code=2, problem=problem, dest=dest, sources=before)


def loads_in_llama(gguf_path: Path, text: str = "hello 你好 [PAD] \x01\xff") -> list[int]:
    """Open the GGUF with llama.cpp in a child process (an abort fails the test, not pytest) and tokenize."""
    code = ("import sys, json; from chatglm.runtime.loader import open_engine; "
            "e = open_engine(sys.argv[1], n_ctx=32, n_threads=1); print(json.dumps(e.tokenize(sys.argv[2]))); "
            "e.close()")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, str(gguf_path), text], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def converted(folder: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "ok.gguf"
    outcome = cli(["convert", folder, "-o", dest, "-t", "f32"])
    assert outcome.code == 0, outcome.text
    return dest


def token_list(gguf_path: Path) -> list[str]:
    from chatglm.gguf_file import read_header

    return list(read_header(gguf_path).get("tokenizer.ggml.tokens"))


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def bpe_tok():
    from chatglm.devtools.glm4 import train_glm4_bpe

    return train_glm4_bpe(vocab_size=600)


@pytest.fixture(scope="module")
def glm4_dirs(bpe_tok, tmp_path_factory) -> dict[str, Path]:
    from chatglm.devtools.glm4 import build_checkpoint

    root = tmp_path_factory.mktemp("hostile-vocab")
    return {layout: build_checkpoint(layout, root / layout, bpe_tok)[1] for layout in ("glm4", "glm4-hf")}


# ------------------------------------------------------------------------------- 1. repeated token texts
@pytest.mark.parametrize("special", ["[gMASK]", "sop", "<|user|>", "<|observation|>"])
def test_sentencepiece_piece_spelled_like_a_special_token(glm3, tmp_path, special):
    folder = variant(glm3.ckpt, tmp_path)
    model = folder / "tokenizer.model"
    edit_pieces(model, renamed(first_normal(model), special, USER_DEFINED))
    refused(folder, tmp_path, model, f"the SentencePiece model already has a piece '{special}'")


def test_padding_fillers_never_repeat_a_piece(glm3, tmp_path):
    """A piece named like a filler row ([PAD{id}]) keeps its id; the filler gets a free name; llama.cpp loads it."""
    folder = variant(glm3.ckpt, tmp_path)
    model = folder / "tokenizer.model"
    n_pieces = len(pieces_of(model.read_bytes()))
    filler = f"[PAD{n_pieces + 9}]"  # ChatGLM3 appends 9 special tokens; the first filler follows them
    index = first_normal(model)
    edit_pieces(model, renamed(index, filler, USER_DEFINED))
    tokens = token_list(converted(folder, tmp_path))
    assert tokens[index] == filler and tokens[n_pieces + 9] == filler + ".1"
    assert len(set(tokens)) == len(tokens)
    loads_in_llama(tmp_path / "ok.gguf")


def test_tokenizer_json_added_token_repeats_a_vocab_piece(glm4_dirs, tmp_path):
    folder = variant(glm4_dirs["glm4-hf"], tmp_path)
    path = folder / "tokenizer.json"
    edit_json(path, lambda d: d["added_tokens"].append(
        {"id": len(d["model"]["vocab"]) + 20, "content": next(iter(d["model"]["vocab"])), "special": False}))
    refused(folder, tmp_path, path, "repeats the text of token")


def test_tokenizer_json_added_tokens_repeat_each_other(glm4_dirs, tmp_path):
    folder = variant(glm4_dirs["glm4-hf"], tmp_path)
    path = folder / "tokenizer.json"

    def twice(d):
        first = d["added_tokens"][0]
        d["added_tokens"].append({**first, "id": max(t["id"] for t in d["added_tokens"]) + 1})
    edit_json(path, twice)
    refused(folder, tmp_path, path, "repeats the text of token")


def test_tokenizer_config_added_tokens_repeat_each_other(glm4_dirs, tmp_path):
    folder = variant(glm4_dirs["glm4"], tmp_path)
    path = folder / "tokenizer_config.json"

    def twice(d):
        table = d["added_tokens_decoder"]
        key = next(iter(table))
        table[str(max(map(int, table)) + 1)] = dict(table[key])
    edit_json(path, twice)
    refused(folder, tmp_path, path, "repeats the text of token")


def test_tiktoken_added_token_spelled_like_a_bpe_token(glm4_dirs, tmp_path):
    """Added tokens are written as they are, BPE tokens in byte-level spelling: "Ġ" + "a" can meet."""
    folder = variant(glm4_dirs["glm4"], tmp_path)
    path = folder / "tokenizer_config.json"
    edit_json(path, lambda d: d["added_tokens_decoder"].update(
        {str(max(map(int, d["added_tokens_decoder"])) + 1): {"content": "Ġa", "special": False}}))
    refused(folder, tmp_path, path, "repeats the text of token")


def test_added_token_named_like_a_filler(glm4_dirs, tmp_path):
    """An added token "[PAD{id}]" at another id: the filler of that id is renamed, and llama.cpp loads the file."""
    folder = variant(glm4_dirs["glm4-hf"], tmp_path)
    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    top = max(t["id"] for t in data["added_tokens"])
    data["added_tokens"].append({"id": top + 1, "content": f"[PAD{top + 2}]", "special": False})
    path.write_text(json.dumps(data), encoding="utf-8")
    tokens = token_list(converted(folder, tmp_path))
    assert tokens[top + 1] == f"[PAD{top + 2}]" and tokens[top + 2] == f"[PAD{top + 2}].1"
    loads_in_llama(tmp_path / "ok.gguf", f"x [PAD{top + 2}] y")


def test_tokenizer_json_empty_vocab_text(glm4_dirs, tmp_path):
    folder = variant(glm4_dirs["glm4-hf"], tmp_path)
    path = folder / "tokenizer.json"

    def empty(d):
        vocab = d["model"]["vocab"]
        text = next(t for t, i in vocab.items() if i == len(vocab) - 1)
        vocab[""] = vocab.pop(text)
        pairs = [m.split(" ") if isinstance(m, str) else m for m in d["model"]["merges"]]
        d["model"]["merges"] = [p for p in pairs if text not in (p[0], p[1], p[0] + p[1])]
    edit_json(path, empty)
    refused(folder, tmp_path, path, "has an empty text")


def test_ice_model_with_a_repeated_piece(glm1_dir, ice_model, tmp_path):
    from chatglm.devtools.glm1 import tiny_glm1_checkpoint

    model = tmp_path / "src" / "ice_text.model"
    model.parent.mkdir()
    shutil.copy(ice_model, model)
    edit_pieces(model, renamed(first_normal(model), "<sop>"))
    folder, _, _ = tiny_glm1_checkpoint(tmp_path / "ckpt", ice_model, seed=0)
    shutil.copy(model, folder / "ice_text.model")
    refused(folder, tmp_path, folder / "ice_text.model", "piece '<sop>' appears twice")


# ------------------------------------------------------------------------------- 2. byte pieces
def test_sentencepiece_without_byte_pieces(glm3, tmp_path):
    folder = variant(glm3.ckpt, tmp_path)
    model = folder / "tokenizer.model"
    edit_pieces(model, lambda ps: [p for p in ps if p.type != 6], byte_fallback=False)
    refused(folder, tmp_path, model, "of the 256 byte pieces <0x00>..<0xFF> (first <0x00>); llama.cpp's tokenizer "
            "needs them", isolated=True)


def test_sentencepiece_missing_one_byte_piece(glm3, tmp_path):
    """With byte_fallback on, sentencepiece itself refuses a model without all 256; we pass its reason on."""
    folder = variant(glm3.ckpt, tmp_path)
    model = folder / "tokenizer.model"
    index = next(i for i, p in enumerate(pieces_of(model.read_bytes())) if p.text == "<0xC3>")
    edit_pieces(model, renamed(index, "<0xC3>?", 1))
    refused(folder, tmp_path, model, "not a SentencePiece model (INTERNAL: there are not 256 byte pieces",
            isolated=True)



def test_sentencepiece_piece_that_is_not_utf8(glm3, tmp_path):
    """sentencepiece loads a piece of raw bytes and fails only when Python asks for its text (found by fuzzing)."""
    folder = variant(glm3.ckpt, tmp_path)
    model = folder / "tokenizer.model"
    raw = model.read_bytes()
    text = pieces_of(raw)[first_normal(model)].text.encode("utf-8")
    field = bytes([0x0A, len(text)]) + text  # SentencePiece.piece = 1, length-delimited
    assert raw.count(field) == 1
    model.write_bytes(raw.replace(field, bytes([0x0A, len(text), 0xFF]) + text[1:]))
    refused(folder, tmp_path, model, "of the SentencePiece model is not valid UTF-8 (byte 0)")

# ------------------------------------------------------------------------------- 3. quadratic merging
def test_tiktoken_piece_too_long(glm4_dirs, tmp_path):
    folder = variant(glm4_dirs["glm4"], tmp_path)
    path = folder / "tokenizer.model"
    lines = path.read_text().splitlines()
    lines[-1] = base64.b64encode(b"a" * 5000).decode() + " " + lines[-1].split()[1]
    path.write_text("\n".join(lines) + "\n")
    refused(folder, tmp_path, path, "is 5000 bytes long, more than the 1024")


def test_tiktoken_rank_not_an_id(glm4_dirs, tmp_path):
    folder = variant(glm4_dirs["glm4"], tmp_path)
    path = folder / "tokenizer.model"
    lines = path.read_text().splitlines()
    lines[-1] = lines[-1].split()[0] + " " + "9" * 5000
    path.write_text("\n".join(lines) + "\n")
    refused(folder, tmp_path, path, "is not a token id")


def test_tokenizer_json_piece_too_long(glm4_dirs, tmp_path):
    folder = variant(glm4_dirs["glm4-hf"], tmp_path)
    path = folder / "tokenizer.json"

    def long(d):
        vocab = d["model"]["vocab"]
        text = next(t for t, i in vocab.items() if i == len(vocab) - 1)
        vocab["a" * 3000] = vocab.pop(text)
    edit_json(path, long)
    refused(folder, tmp_path, path, "is 3000 bytes long, more than the 1024")


def test_tiktoken_file_size_is_bounded(glm4_dirs, tmp_path, monkeypatch):
    import chatglm.convert.vocab_bpe as bpe

    monkeypatch.setattr(bpe, "MAX_TIKTOKEN_FILE_BYTES", 1 << 20)
    folder = variant(glm4_dirs["glm4"], tmp_path)
    path = folder / "tokenizer.model"
    with open(path, "a") as fh:
        fh.write("\n" * (1 << 20))
    refused(folder, tmp_path, path, "tokenizer file is larger than 1 MiB")


def naive_last_merge(token: bytes, rank: int, ranks: dict) -> tuple[bytes, bytes] | None:
    """tiktoken's rule replayed literally (rescan every pair after each join): the oracle of the heap version."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        found = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if ranks.get(a + b, rank) < rank]
        if not found:
            return None
        _, i = min(found)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def test_heap_merge_replay_equals_tiktokens_rule(glm4_dirs):
    from chatglm.convert.vocab_bpe import _last_merge, read_tiktoken

    ranks = read_tiktoken(glm4_dirs["glm4"] / "tokenizer.model")
    ranks.update({b"a" * n: len(ranks) + n for n in range(2, 40)})
    assert all(_last_merge(t, r, ranks) == naive_last_merge(t, r, ranks) for t, r in ranks.items() if len(t) > 1)


def test_merge_recovery_is_not_quadratic():
    """Long tokens built by thousands of joins: about n log n per token (the rescan per join took ~0.8 s for one
    4000-byte token, ~500 s for 100k bytes), and the alternative splits stay within their size budget."""
    from chatglm.convert.vocab_bpe import SPLIT_BUDGET

    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"aa"] = 256
    for k in range(200):
        ranks[bytes([65 + k % 26]) + b"a" * 1000 + bytes([k])] = 257 + k
    start = time.perf_counter()
    assert merges_from_ranks(ranks) == ["a a"]  # the long tokens are reachable only as whole words
    assert time.perf_counter() - start < 3.0
    chain = {bytes([b]): b for b in range(256)}
    chain.update({b"a" * n: 254 + n for n in range(2, 1025)})  # every split of every run is two tokens
    start = time.perf_counter()
    merges = merges_from_ranks(chain)
    assert time.perf_counter() - start < 10.0
    assert len(merges) >= 1023  # at least the first split of every run
    assert sum(map(len, merges)) <= (SPLIT_BUDGET + 2) * sum(map(len, chain))  # not the 268 MB of every split


# ------------------------------------------------------------------------------- 4. JSON fields of the wrong type
def _set(path: list, value):
    def change(d):
        node = d
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


def _first_added(key: str, value=None, delete: bool = False):
    def change(d):
        entry = d["added_tokens"][0]
        if delete:
            del entry[key]
        else:
            entry[key] = value
    return change


TOKENIZER_JSON_CASES = {
    "top-level list": (lambda d: [d], "tokenizer.json must be a JSON object, not a list"),
    "model list": (_set(["model"], []), "field 'model' must be an object, not a list"),
    "vocab list": (_set(["model", "vocab"], ["a", "b"]), "field 'model.vocab' must be an object, not a list"),
    "vocab id string": (lambda d: d["model"]["vocab"].update({"!": "0"}), "to a string, not a token id"),
    "vocab id null": (lambda d: d["model"]["vocab"].update({"!": None}), "to null, not a token id"),
    "merges object": (_set(["model", "merges"], {"a": "b"}), "field 'model.merges' must be a list, not an object"),
    "merges missing": (lambda d: d["model"].__delitem__("merges"), "field 'model.merges' is missing"),
    "merge number": (lambda d: d["model"]["merges"].insert(0, 5), "entry 0 is not a merge"),
    "merge of three": (lambda d: d["model"]["merges"].insert(0, "a b c"), "entry 0 is not a merge"),
    "merge pair of one": (lambda d: d["model"]["merges"].insert(0, ["a"]), "entry 0 is not a merge"),
    "merge pair with space": (lambda d: d["model"]["merges"].insert(0, ["a b", "c"]), "entry 0 is not a merge"),
    "merge out of vocab": (lambda d: d["model"]["merges"].insert(0, "a \u4e00\u4e01"), "which is not in the vocab"),
    "ignore_merges string": (_set(["model", "ignore_merges"], "true"),
                             "field 'model.ignore_merges' must be true or false, not a string"),
    "dropout string": (_set(["model", "dropout"], "0.1"), "field 'model.dropout' must be a number or null"),
    "added_tokens object": (_set(["added_tokens"], {}), "field 'added_tokens' must be a list or null, not an object"),
    "added token list": (lambda d: d["added_tokens"].insert(0, [1, "x"]), "added_tokens[0] must be a JSON object"),
    "added token no id": (_first_added("id", delete=True), "field 'added_tokens[0].id' is missing"),
    "added token no content": (_first_added("content", delete=True), "field 'added_tokens[0].content' is missing"),
    "added token id string": (_first_added("id", "151329"), "'added_tokens[0].id' must be an integer, not a string"),
    "added token id bool": (_first_added("id", True), "'added_tokens[0].id' must be an integer, not true or false"),
    "added token id float": (_first_added("id", 3.0), "'added_tokens[0].id' must be an integer, not a number"),
    "added token id negative": (_first_added("id", -3), "field 'added_tokens[0].id' is negative"),
    "added token content null": (_first_added("content", None), "'added_tokens[0].content' must be a string, not null"),
    "added token content list": (_first_added("content", ["<|user|>"]), "must be a string, not a list"),
    "added token special string": (_first_added("special", "yes"), "'added_tokens[0].special' must be true or false"),
    "pre_tokenizer list": (_set(["pre_tokenizer"], []), "field 'pre_tokenizer' must be an object or null, not a list"),
    "pretokenizers object": (_set(["pre_tokenizer", "pretokenizers"], {}),
                             "field 'pre_tokenizer.pretokenizers' must be a list, not an object"),
    "pretokenizer string": (_set(["pre_tokenizer", "pretokenizers"], ["Split", "ByteLevel"]),
                            "each of 'pre_tokenizer.pretokenizers' must be a JSON object, not a string"),
    "split pattern string": (lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(pattern="\\s+"),
                             "field 'pre_tokenizer.pretokenizers[].pattern' must be an object, not a string"),
    "split regex list": (lambda d: d["pre_tokenizer"]["pretokenizers"][0].update(pattern={"Regex": ["x"]}),
                         "'pre_tokenizer.pretokenizers[].pattern.Regex' must be a string, not a list"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_JSON_CASES))
def test_tokenizer_json_field_types(glm4_dirs, tmp_path, case):
    change, problem = TOKENIZER_JSON_CASES[case]
    folder = variant(glm4_dirs["glm4-hf"], tmp_path)
    edit_json(folder / "tokenizer.json", change)
    refused(folder, tmp_path, folder / "tokenizer.json", problem)


def _first_decoder(key: str, value=None, delete: bool = False):
    def change(d):
        entry = d["added_tokens_decoder"][next(iter(d["added_tokens_decoder"]))]
        if delete:
            del entry[key]
        else:
            entry[key] = value
    return change


TOKENIZER_CONFIG_CASES = {
    "top-level list": (lambda d: [d], "tokenizer_config.json must be a JSON object, not a list"),
    "decoder list": (_set(["added_tokens_decoder"], [{"content": "x"}]),
                     "field 'added_tokens_decoder' must be an object, not a list"),
    "decoder null": (_set(["added_tokens_decoder"], None), "field 'added_tokens_decoder' must be an object, not null"),
    "key not a number": (lambda d: d["added_tokens_decoder"].update({"abc": {"content": "x"}}),
                         "has the key 'abc', not a token id"),
    "key full-width digits": (lambda d: d["added_tokens_decoder"].update({"\uff11\uff12": {"content": "x"}}),
                              "not a token id"),
    "key 5000 digits": (lambda d: d["added_tokens_decoder"].update({"9" * 5000: {"content": "x"}}),
                        "not a token id"),
    "entry string": (lambda d: d["added_tokens_decoder"].update({"9": "<|user|>"}),
                     "field 'added_tokens_decoder.9' must be a JSON object, not a string"),
    "no content": (_first_decoder("content", delete=True), "content' is missing"),
    "content number": (_first_decoder("content", 7), "content' must be a string, not an integer"),
    "special string": (_first_decoder("special", "true"), "special' must be true or false, not a string"),
    "chat_template number": (_set(["chat_template"], 5),
                             "field 'chat_template' must be a string or a list or null, not an integer"),
    "chat_template list of strings": (_set(["chat_template"], ["{{ x }}"]),
                                      "field 'chat_template[0]' must be a JSON object, not a string"),
    "chat_template entry without template": (_set(["chat_template"], [{"name": "default"}]),
                                             "field 'chat_template[0].template' is missing"),
}


@pytest.mark.parametrize("case", sorted(TOKENIZER_CONFIG_CASES))
def test_tokenizer_config_field_types(glm4_dirs, tmp_path, case):
    change, problem = TOKENIZER_CONFIG_CASES[case]
    folder = variant(glm4_dirs["glm4"], tmp_path)
    edit_json(folder / "tokenizer_config.json", change)
    refused(folder, tmp_path, folder / "tokenizer_config.json", problem)


@pytest.mark.parametrize("change,problem", [
    (lambda d: [d], "tokenizer_config.json must be a JSON object, not a list"),
    (_set(["chat_template"], {"default": "x"}), "field 'chat_template' must be a string or a list or null"),
])
def test_chatglm3_tokenizer_config_field_types(glm3, tmp_path, change, problem):
    folder = variant(glm3.ckpt, tmp_path)
    edit_json(folder / "tokenizer_config.json", change)
    refused(folder, tmp_path, folder / "tokenizer_config.json", problem)


def test_named_chat_templates_are_read(glm3, tmp_path):
    """Hugging Face's list form of chat_template: the "default" entry is the template."""
    folder = variant(glm3.ckpt, tmp_path)
    edit_json(folder / "tokenizer_config.json",
              lambda d: d.update(chat_template=[{"name": "tool_use", "template": "x"},
                                                {"name": "default", "template": d["chat_template"]}]))
    from chatglm.gguf_file import read_header

    assert read_header(converted(folder, tmp_path)).get("glm.chat_format") == "chatglm3"


@pytest.mark.parametrize("text,problem", [
    ("[]", "tokenizer_config.json must be a JSON object, not a list"),
    ("[" * 100000 + "]" * 100000, "not valid tokenizer_config.json"),
])
def test_chatglm1_tokenizer_config(glm1, tmp_path, text, problem):
    folder = variant(glm1.ckpt, tmp_path)
    (folder / "tokenizer_config.json").write_text(text)
    refused(folder, tmp_path, folder / "tokenizer_config.json", problem)


# ------------------------------------------------------------------------------- 5. decode of the real tokenizers
SMALL = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
         "head_dim": 8, "num_hidden_layers": 1}  # the real vocabularies are large: keep the rest tiny
def _real_spm_engine(name: str, tmp_path: Path):
    from chatglm.convert.pipeline import convert
    from chatglm.devtools.checkpoints import save_chatglm_checkpoint, sp_vocab_size, tiny_glm_model
    from chatglm.runtime.loader import open_engine

    model_file = TOKENIZERS / name / "tokenizer.model"
    model = tiny_glm_model(vocab_size=sp_vocab_size(model_file) + 16, **SMALL)
    ckpt = save_chatglm_checkpoint(model, tmp_path / name, model_file, family="chatglm2", dtype="float16")
    return model_file, open_engine(convert(ckpt, tmp_path / f"{name}.gguf", "f16").path, n_ctx=32, n_threads=1)


@needs_reference
@pytest.mark.parametrize("name", ["chatglm2-6b", "codegeex2-6b"])
def test_real_sentencepiece_decode_matches_sentencepiece(name, tmp_path):
    import sentencepiece as spm

    model_file, engine = _real_spm_engine(name, tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    try:
        if name == "chatglm2-6b":
            assert engine.detokenize(sp.encode("你好")) == "你好"
        lines = bilingual_corpus() + [" 你好", "  two", "\n你好", "\t\ttabs", "a\u00a0b"]
        crafted = [[13, 30910], [30910, 30910, 13], [1, 30910, 39701], [2, 13]]
        for ids in [sp.encode(line) for line in lines] + crafted:
            assert engine.detokenize(ids) == sp.decode(ids), ids
        assert all(engine.tokenize(line) == sp.encode(line) for line in lines)
    finally:
        engine.close()


@needs_reference
def test_real_glm4_tokenizer_round_trips(bpe_tok, tmp_path):
    """GLM-4-9B's tiktoken ranks and special ids through the converter: llama.cpp's ids and text equal tiktoken's."""
    from chatglm.convert.pipeline import convert
    from chatglm.devtools.glm4 import build_checkpoint, tiktoken_encoding
    from chatglm.runtime.loader import open_engine

    specials = json.loads((TOKENIZERS / "glm-4-9b-chat" / "special_tokens.json").read_text())
    n_vocab = max(specials.values()) + 1
    _, folder = build_checkpoint("glm4", tmp_path / "glm4", bpe_tok, extra_rows=n_vocab - bpe_tok.get_vocab_size(),
                                 **SMALL)
    shutil.copy(TOKENIZERS / "glm-4-9b-chat" / "tokenizer.model", folder / "tokenizer.model")
    edit_json(folder / "tokenizer_config.json", lambda d: d.update(added_tokens_decoder={
        str(i): {"content": t, "special": True} for t, i in specials.items()}))
    start = time.perf_counter()
    path = convert(folder, tmp_path / "glm4.gguf", "f16").path
    assert time.perf_counter() - start < 60
    enc = tiktoken_encoding(folder / "tokenizer.model")
    with open_engine(path, n_ctx=32, n_threads=1) as engine:
        for line in bilingual_corpus():
            ids = enc.encode(line, disallowed_special=())
            assert engine.tokenize(line) == ids, line
            assert engine.detokenize(ids) == enc.decode(ids) == line


@needs_reference
def test_real_chatglm6b_decode_matches_sentencepiece():
    """ChatGLM-6B runs on our own engine: its decode is sentencepiece's plus the published whitespace pieces."""
    import numpy as np

    from chatglm.convert.vocab_ice import load_ice_vocab
    from chatglm.schema.ice import MAX_BLANK
    from chatglm.schema.keys import GLM1_IMAGE_TOKENS as KEY_IMAGE_TOKENS
    from chatglm.schema.keys import GLM1_MAX_BLANK as KEY_MAX_BLANK
    from chatglm.runtime.glm1.tokenizer import GLM1Tokenizer

    vocab = load_ice_vocab(TOKENIZERS / "chatglm-6b" / "ice_text.model", 0)

    class Header:
        path = "ice"
        meta = {KEY_IMAGE_TOKENS: 0, KEY_MAX_BLANK: MAX_BLANK, "tokenizer.ggml.tokens": [p.text for p in vocab.pieces]}

        def get(self, key, default=None):
            return self.meta.get(key, default)

        def array(self, key):
            return np.frombuffer(vocab.proto, dtype=np.uint8)

    tok = GLM1Tokenizer(Header())
    sp_round_trips = [line for line in bilingual_corpus()
                      if tok.sp.decode(tok.sp.encode(tok.preprocess(line))) == tok.preprocess(line)]
    assert len(sp_round_trips) > len(bilingual_corpus()) // 2
    assert [line for line in sp_round_trips if tok.decode(tok.encode(line)) != line] == []


# ------------------------------------------------------------------------------- GGUF files made elsewhere
def patched_gguf(src: Path, dest: Path, old: str, new: str) -> Path:
    """``src`` with one token text replaced by another of the same length (a length-prefixed GGUF string)."""
    import struct

    raw = src.read_bytes()
    old_b, new_b = old.encode(), new.encode()
    assert len(old_b) == len(new_b)
    key = struct.pack("<Q", len(old_b)) + old_b
    assert raw.count(key) == 1, old
    dest.write_bytes(raw.replace(key, struct.pack("<Q", len(new_b)) + new_b))
    return dest


def test_gguf_with_a_repeated_token_text_is_refused(glm3_gguf, tmp_path):
    tokens = token_list(glm3_gguf)
    a, b = len(tokens) - 2, len(tokens) - 1
    path = patched_gguf(glm3_gguf, tmp_path / "dup.gguf", tokens[b], tokens[a])
    before = digest([path])
    outcome = cli(["run", path, "-p", "hi", "-n", "1"], isolated=True)
    assert_refused(outcome, path, code=2, problem=f"vocabulary has token {tokens[a]!r} twice (ids {a} and {b})",
                   sources=before)


def test_gguf_without_a_byte_token_is_refused(glm3_gguf, tmp_path):
    path = patched_gguf(glm3_gguf, tmp_path / "nobyte.gguf", "<0xF0>", "<0xf0>")
    before = digest([path])
    outcome = cli(["run", path, "-p", "\U00020001", "-n", "1"], isolated=True)  # aborted llama.cpp before
    assert_refused(outcome, path, code=2, problem="lacks byte piece(s) <0xF0> (1 of 256 missing)",
                   sources=before)

"""`chatglm perplexity`: the strided sliding-window number equals a plain numpy computation from llama.cpp's logits
and from transformers' logits of the same tiny model; bad inputs give one clear line and exit code 2."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fixtures_bench import corpus_text, exact_engine, text_file  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from chatglm.cli.app import app
from chatglm.errors import InputError
from chatglm.runtime.perplexity import Window, perplexity, perplexity_of_file, plan_windows, token_nll

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def reference_perplexity(logits_of, tokens, window: int, stride: int) -> tuple[float, int]:
    """The Hugging Face guide's loop written out: each window from scratch, its not-yet-scored tokens scored."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(tokens), stride):
        end = min(begin + window, len(tokens))
        ids = list(tokens[begin:end])
        n_new = min(end - prev_end, len(ids) - 1)
        logits = np.asarray(logits_of(ids), dtype=np.float64)  # (len(ids), n_vocab)
        logp = logits - logits.max(axis=-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))
        for pos in range(len(ids) - n_new, len(ids)):
            nll -= logp[pos - 1, ids[pos]]
            count += 1
        prev_end = end
        if end == len(tokens):
            break
    return math.exp(nll / count), count


@pytest.fixture(scope="module")
def tokens(exact_engine, corpus_text):
    ids = exact_engine.tokenize(corpus_text)[:301]
    assert len(ids) == 301
    return ids


def test_windows_score_every_token_once():
    assert plan_windows(10, 4, 2) == [Window(0, 4, 3), Window(2, 6, 2), Window(4, 8, 2), Window(6, 10, 2)]
    for n, window, stride in [(301, 64, 24), (100, 10, 10), (50, 50, 7), (64, 16, 1)]:
        scored = [i for w in plan_windows(n, window, stride) for i in range(w.end - w.n_scored, w.end)]
        assert len(scored) == len(set(scored))  # no token scored twice
        starts = set(range(0, n, window)) if stride == window else {0}  # tokens with no context in their window
        assert sorted(scored) == [i for i in range(n) if i not in starts]
        assert all(w.end - w.begin <= window and w.n_scored < w.end - w.begin for w in plan_windows(n, window, stride))


def test_token_nll_is_negative_log_softmax():
    logits = np.array([[0.0, math.log(3.0)], [2.0, 2.0]], dtype=np.float32)
    assert np.allclose(token_nll(logits, [1, 0]), [-math.log(0.75), math.log(2.0)], atol=1e-7)


@pytest.mark.parametrize("window,stride", [(64, 24), (48, 48)])
def test_equals_numpy_from_engine_logits(exact_engine, tokens, window, stride):
    result = perplexity(exact_engine, tokens, window=window, stride=stride)
    assert exact_engine.tokens == []  # the cache is left cleared
    ref, count = reference_perplexity(exact_engine.all_logits, tokens, window, stride)
    assert result.n_scored == count
    assert result.perplexity == pytest.approx(ref, rel=1e-9)


def test_equals_transformers_on_the_same_weights(exact_engine, glm3, tokens):
    result = perplexity(exact_engine, tokens, window=64, stride=24)
    ref, count = reference_perplexity(glm3.logits, tokens, 64, 24)
    assert result.n_scored == count == len(tokens) - 1
    assert result.perplexity == pytest.approx(ref, rel=2e-5)
    # A window that is one token shorter gives a different number: the comparison sees the windowing.
    assert perplexity(exact_engine, tokens, window=63, stride=24).perplexity != pytest.approx(ref, rel=1e-6)


def test_one_window_is_the_plain_perplexity(exact_engine, tokens):
    ids = tokens[:200]
    logits = exact_engine.all_logits(ids)
    expected = math.exp(float(token_nll(logits[:-1], ids[1:]).mean()))
    assert perplexity(exact_engine, ids, window=200, stride=100).perplexity == pytest.approx(expected, rel=1e-12)


def test_file_api_and_cli_agree(exact_engine, text_file, glm3_gguf):
    expected = perplexity_of_file(exact_engine, text_file, window=128, stride=64)
    r = invoke("perplexity", glm3_gguf, text_file, "-w", 128, "-s", 64, "-t", 1, "--kv-type", "f32",
               "--no-flash-attn", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["n_tokens"] == expected.n_tokens and data["n_scored"] == expected.n_tokens - 1
    assert data["n_windows"] == len(expected.scored) == len(data["window_perplexities"])
    assert data["perplexity"] == pytest.approx(expected.perplexity, rel=1e-6)
    r = invoke("perplexity", glm3_gguf, text_file, "-w", 128, "-s", 64, "-t", 1)
    assert r.exit_code == 0 and r.stdout.startswith("perplexity: ") and "windows of 128, stride 64" in r.stdout


def test_empty_file_is_an_error(glm3_gguf, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n", encoding="utf-8")
    r = invoke("perplexity", glm3_gguf, empty)
    assert r.exit_code == 2
    assert r.stderr.strip() == f"error: {empty}: the file is empty: there is no text to score"


def test_text_shorter_than_a_window_is_an_error(glm3_gguf, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("你好, world", encoding="utf-8")
    r = invoke("perplexity", glm3_gguf, short, "-w", 64, "-s", 32)
    assert r.exit_code == 2
    assert r.stderr.startswith(f"error: {short}: the text is ") and "shorter than one window of 64 tokens" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["-w", 64, "-s", 65], "the stride must be between 1 and the window (64), got 65"),
    (["-w", 64, "-s", 0], "--stride: must be between 1 and 16777216, got 0"),
    (["-w", 1, "-s", 1], "--window: must be between 2 and 16777216, got 1"),
])
def test_bad_window_settings(glm3_gguf, text_file, args, message):
    r = invoke("perplexity", glm3_gguf, text_file, *args)
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {message}"


def test_missing_and_non_utf8_files(glm3_gguf, tmp_path):
    r = invoke("perplexity", glm3_gguf, tmp_path / "nope.txt")
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {tmp_path / 'nope.txt'}: file not found"
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café crème".encode("latin-1"))
    r = invoke("perplexity", glm3_gguf, latin)
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {latin}: not UTF-8 text (byte 3)"


def test_window_must_fit_the_context(exact_engine, tokens):
    with pytest.raises(InputError, match="does not fit the context of"):
        perplexity(exact_engine, tokens, window=300, stride=100)

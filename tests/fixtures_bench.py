"""Fixtures of the bench and perplexity tests: an exact engine over the tiny f32 ChatGLM3 GGUF and a text to score.

Builds on conftest's session fixtures (``glm3``: the tiny checkpoint and its transformers twin; ``glm3_gguf``: its f32
GGUF). Import the fixtures by name into a test module.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chatglm.devtools.corpus import bilingual_corpus
from chatglm.runtime.loader import open_engine

PPL_CTX = 256


@pytest.fixture(scope="module")
def exact_engine(glm3_gguf):
    """f32 weights, f32 KV cache, no flash attention: llama.cpp's logits agree with transformers' to ~1e-6.

    One thread: the two cores of a loaded test machine make a second thread wait at every barrier.
    """
    with open_engine(glm3_gguf, n_ctx=PPL_CTX, n_threads=1, kv_type="f32", flash_attn=False) as engine:
        yield engine


@pytest.fixture(scope="module")
def corpus_text() -> str:
    return "\n".join(bilingual_corpus())


@pytest.fixture
def text_file(tmp_path, corpus_text) -> Path:
    """About 600 tokens of the corpus (a few windows of 128)."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(corpus_text.splitlines()[:30]), encoding="utf-8")
    return path

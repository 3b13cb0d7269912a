"""Session fixtures: tiny checkpoints in the published layouts, built once per test run (no network, no real weights)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from chatglm.devtools.checkpoints import (reference_logits, save_chatglm_checkpoint, sp_vocab_size, special_token_ids,
                                          tiny_glm_model, train_sentencepiece)
from chatglm.devtools.corpus import bilingual_corpus


@dataclass
class Tiny:
    """A tiny random ChatGLM2/3 checkpoint with its transformers twin and tokenizer."""

    family: str
    model: object  # transformers GlmForCausalLM
    ckpt: Path
    sp_model: Path
    special: dict[str, int]

    def logits(self, ids):
        return reference_logits(self.model, ids)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def sp_model(workdir) -> Path:
    return train_sentencepiece(workdir / "tokenizer.model", bilingual_corpus())


def make_tiny(workdir: Path, sp_model: Path, family: str, *, seed: int = 0, dtype: str = "float32", shards: int = 1,
              **config) -> Tiny:
    n_vocab = sp_vocab_size(sp_model) + 16  # room for the specials, padded as the published models pad
    model = tiny_glm_model(seed=seed, vocab_size=n_vocab, **config)
    name = f"{family}-{dtype}-{shards}-{seed}" + "".join(f"-{k}{v}" for k, v in sorted(config.items()))
    ckpt = save_chatglm_checkpoint(model, workdir / name, sp_model, family=family, dtype=dtype, shards=shards)
    return Tiny(family, model, ckpt, sp_model, special_token_ids(sp_model, family))


@pytest.fixture(scope="session")
def glm3(workdir, sp_model) -> Tiny:
    return make_tiny(workdir, sp_model, "chatglm3")


@pytest.fixture(scope="session")
def glm2(workdir, sp_model) -> Tiny:
    return make_tiny(workdir, sp_model, "chatglm2", seed=1)


@pytest.fixture(scope="session")
def glm3_gguf(glm3, workdir) -> Path:
    from chatglm.convert.pipeline import convert

    return convert(glm3.ckpt, workdir / "glm3-f32.gguf", "f32").path


@pytest.fixture(scope="session")
def glm3_model(glm3_gguf):
    from chatglm.runtime.model import load

    # f32 KV cache and no flash attention (llama.cpp's CPU flash attention rounds Q·K through f16): with f32 weights
    # nothing then rounds below float32 precision.
    with load(glm3_gguf, n_ctx=512, n_threads=1, kv_type="f32", flash_attn=False) as m:
        yield m


def read_json(path: Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))

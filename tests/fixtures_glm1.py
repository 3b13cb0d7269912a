"""Fixtures of the GLM-1 (ChatGLM-6B) tests: a tiny ice_text tokenizer, tiny checkpoints in the published layout,
their GGUFs and engines. Built once per session; import the fixtures by name into a test module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from chatglm.devtools.glm1 import ReferenceTokenizer, tiny_glm1_checkpoint, train_ice_tokenizer


@dataclass
class TinyGLM1:
    ckpt: Path
    config: dict
    weights: dict  # published name -> float32 array
    tok: ReferenceTokenizer

    @property
    def ids(self) -> dict[str, int]:
        c = self.config
        return {"bos": c["bos_token_id"], "eos": c["eos_token_id"], "mask": c["mask_token_id"],
                "gmask": c["gmask_token_id"]}


@pytest.fixture(scope="session")
def glm1_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("glm1")


@pytest.fixture(scope="session")
def ice_model(glm1_dir) -> Path:
    """A tokenizer in the final release's ice_text arrangement (specials, blanks and bytes baked in)."""
    return train_ice_tokenizer(glm1_dir / "ice_text.model")


@pytest.fixture(scope="session")
def glm1(glm1_dir, ice_model) -> TinyGLM1:
    """28 layers (alpha = sqrt(2 * 28) either way), hidden 64, 4 heads, final-release ids (no image tokens)."""
    folder, config, weights = tiny_glm1_checkpoint(glm1_dir / "ckpt", ice_model, seed=0)
    return TinyGLM1(folder, config, weights, ReferenceTokenizer(ice_model, 0))


@pytest.fixture(scope="session")
def glm1_gguf(glm1, glm1_dir) -> Path:
    from chatglm.convert.pipeline import convert

    return convert(glm1.ckpt, glm1_dir / "glm1-f32.gguf", "f32").path


@pytest.fixture(scope="session")
def glm1_engine(glm1_gguf):
    """f32 weights and KV cache: nothing rounds below float32. One thread (a loaded 2-core test machine)."""
    from chatglm.runtime.loader import open_engine

    with open_engine(glm1_gguf, n_ctx=256, n_threads=1, kv_type="f32") as engine:
        yield engine

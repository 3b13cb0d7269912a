"""Long context: rope_ratio carried into the GGUF, positions past 4,096 match transformers, KV types, flash attention,
and the memory estimate."""

from __future__ import annotations

import numpy as np
import pytest

from chatglm.convert.pipeline import convert
from chatglm.gguf_file import read_header
from chatglm.runtime.memory import estimate, kv_per_token
from chatglm.runtime.model import load

from conftest import make_tiny

N = 4400  # past 4,096


@pytest.fixture(scope="module")
def long_tiny(workdir, sp_model):
    tiny = make_tiny(workdir, sp_model, "chatglm3", seed=5, max_position_embeddings=8192,
                     rope_theta=10000.0 * 50,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    path = convert(tiny.ckpt, workdir / "long.gguf", "f32").path
    ids = list(np.random.default_rng(0).integers(3, 900, N))
    return tiny, path, ids, tiny.logits(ids)


def rel(got, ref):
    return float(np.max(np.abs(got - ref).max(-1) / np.abs(ref).max(-1)))


def test_rope_ratio_in_metadata(long_tiny):
    tiny, path, _, _ = long_tiny
    from conftest import read_json

    assert read_json(tiny.ckpt / "config.json")["rope_ratio"] == 50
    h = read_header(path)
    assert h.arch_get("rope.freq_base") == pytest.approx(500000.0)
    assert h.arch_get("context_length") == 8192


@pytest.mark.parametrize("kv_type,flash,bound", [("f32", False, 1e-4), ("f16", True, 5e-3), ("q8_0", True, 5e-2)])
def test_logits_past_4096(long_tiny, kv_type, flash, bound):
    _, path, ids, ref = long_tiny
    with load(path, n_ctx=N + 64, kv_type=kv_type, flash_attn=flash) as m:
        got = m.engine.all_logits(ids)
    assert rel(got[4096:], ref[4096:]) < bound


@pytest.fixture(scope="module")
def interpolated_glm2(workdir, sp_model):
    """ChatGLM2-6B-32K's kind of rope_ratio: its modeling code divides the positions (base stays 10000)."""
    tiny = make_tiny(workdir, sp_model, "chatglm2", seed=6, max_position_embeddings=4096, rope_linear=4.0,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    return tiny, convert(tiny.ckpt, workdir / "glm2-32k.gguf", "f32").path


def test_chatglm2_rope_ratio_is_linear_interpolation(interpolated_glm2):
    tiny, path = interpolated_glm2
    from conftest import read_json

    assert read_json(tiny.ckpt / "config.json")["rope_ratio"] == 4
    h = read_header(path)
    assert h.arch_get("rope.freq_base") == pytest.approx(10000.0)
    assert h.arch_get("rope.scaling.type") == "linear" and h.arch_get("rope.scaling.factor") == pytest.approx(4.0)
    from chatglm.cli.info import describe_file, rope_text

    assert rope_text(describe_file(path, None, "f16")["rope"]) == ", rope base 10000, linear position scaling ×4"
    ids = list(np.random.default_rng(1).integers(3, 900, 1500))
    with load(path, n_ctx=1536, kv_type="f32", flash_attn=False) as m:
        got = m.engine.all_logits(ids)
    assert rel(got, tiny.logits(ids)) < 1e-4


@pytest.mark.parametrize("tokenizer_config,code,divides", [
    # ChatGLM3-6B-32K / 128K: tokenizer_config.json names the role tokens (chat template or added tokens): base
    ({"chat_template": "[gMASK]sop<|{{ message['role'] }}|>{% if add_generation_prompt %}<|assistant|>{% endif %}"},
     "", False),
    ({"added_tokens_decoder": {"64797": {"content": "<|observation|>", "special": True}}}, "", False),
    (None, "", True),  # ChatGLM2-6B-32K: the ChatGLM2 tokenizer files: positions divided
    # The checkpoint's Python files are never read: modeling code that says otherwise changes nothing.
    (None, "        base = base * self.rope_ratio\n", True),
])
def test_rope_ratio_reading_follows_the_checkpoints_generation(interpolated_glm2, tmp_path, tokenizer_config, code,
                                                               divides):
    import json
    import shutil

    tiny, _ = interpolated_glm2
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny.ckpt, ckpt)
    if tokenizer_config:
        cfg = json.loads((ckpt / "tokenizer_config.json").read_text())
        (ckpt / "tokenizer_config.json").write_text(json.dumps({**cfg, **tokenizer_config}))
    if code:
        (ckpt / "modeling_chatglm.py").write_text("class RotaryEmbedding:\n    def forward_impl(self):\n" + code)
    h = read_header(convert(ckpt, tmp_path / "m.gguf", "f32").path)
    if divides:
        assert h.arch_get("rope.scaling.factor") == pytest.approx(4.0) and h.arch_get("rope.freq_base") == 10000.0
    else:
        assert h.arch_get("rope.scaling.factor") is None and h.arch_get("rope.freq_base") == pytest.approx(40000.0)


def test_flash_attention_on_off_same_greedy_reply(long_tiny):
    _, path, _, _ = long_tiny
    replies = []
    for flash in (False, True):
        with load(path, n_ctx=1024, flash_attn=flash) as m:
            replies.append(m.generate("你好，今天天气怎么样？", temperature=0, max_tokens=24))
    assert replies[0] == replies[1] and replies[0]


def test_memory_estimate(long_tiny):
    _, path, _, _ = long_tiny
    h = read_header(path)
    cfg = (h.arch_get("block_count"), h.arch_get("attention.head_count_kv"),
           h.arch_get("embedding_length") // h.arch_get("attention.head_count"))
    assert kv_per_token(h, "f16") == cfg[0] * cfg[1] * cfg[2] * 2 * 2
    small, big = estimate(h, 1024, "f16"), estimate(h, 4096, "q8_0")
    assert small.weights == big.weights == sum(t.nbytes for t in h.tensors.values())
    assert big.kv_cache == int(kv_per_token(h, "q8_0") * 4096)


def test_prompt_longer_than_context_is_a_clear_error(glm3_gguf):
    from chatglm.errors import ContextOverflowError

    with load(glm3_gguf, n_ctx=64) as m:
        with pytest.raises(ContextOverflowError, match=r"prompt of \d+ tokens does not fit the context of \d+ tokens"):
            m.generate("你好 " * 200, max_tokens=1)


def test_kv_type_that_does_not_divide_the_head_is_refused(glm3_gguf):
    from chatglm.errors import InputError

    with pytest.raises(InputError, match="multiple of 32"):
        load(glm3_gguf, kv_type="q8_0")

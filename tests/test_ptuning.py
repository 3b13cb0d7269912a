"""P-Tuning v2 (issue 22): a ChatGLM2/3 checkpoint with a trained prefix converts into one GGUF and runs with the
prefix as the first cells of every layer's KV cache, against transformers' GLM (float64) fed the same prefix as its
past key values, the way the published modeling_chatglm.py feeds it (never rotated, positions from 0)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from chatglm.convert.pipeline import convert
from chatglm.errors import InputError
from chatglm.gguf_file import read_header
from chatglm.runtime import ptuning as rt_ptuning
from chatglm.schema import keys

P = 6


def _layout(model):
    cfg = model.config
    return cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim


def _prefix_dir(ckpt, out, emb: np.ndarray, **config) -> object:
    out.mkdir()
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(config)
    (out / "config.json").write_text(json.dumps(cfg))
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.from_numpy(emb)}, out / "pytorch_model.bin")
    return out


@pytest.fixture(scope="module")
def pt(glm3, tmp_path_factory):
    """(prefix-only folder, the prefix as (n_layer, 2, P, width), the GGUF)."""
    root = tmp_path_factory.mktemp("ptuning")
    n_layer, n_kv, head_dim = _layout(glm3.model)
    emb = np.random.default_rng(7).normal(0, 1, (P, n_layer * 2 * n_kv * head_dim)).astype(np.float32)
    folder = _prefix_dir(glm3.ckpt, root / "pt", emb, pre_seq_len=P, prefix_projection=False)
    gguf = convert(glm3.ckpt, root / "pt.gguf", "f32", ptuning=folder).path
    prefix = emb.reshape(P, n_layer, 2, n_kv * head_dim).transpose(1, 2, 0, 3)
    return folder, prefix, gguf


def reference(model, prefix: np.ndarray, ids, *, cache_positions: bool = False) -> np.ndarray:
    """float64 logits of ``ids`` after the prefix, as the published code computes them: THUDM's numbers the tokens
    from 0; with ``cache_positions`` transformers' own numbering (from P, after the cached prefix) as PEFT runs it."""
    from transformers import DynamicCache

    m = model.to(torch.float64)
    try:
        n_layer, _, n, width = prefix.shape
        n_kv, head_dim = m.config.num_key_value_heads, m.config.head_dim
        cache = DynamicCache(config=m.config)
        for il in range(n_layer):
            k, v = (torch.from_numpy(prefix[il, j].astype(np.float64)).reshape(n, n_kv, head_dim).transpose(0, 1)[None]
                    for j in (0, 1))
            cache.update(k, v, il)
        with torch.no_grad():
            positions = None if cache_positions else torch.arange(len(ids))[None]
            out = m(input_ids=torch.tensor([ids]), past_key_values=cache, use_cache=True, position_ids=positions,
                    attention_mask=torch.ones(1, n + len(ids))).logits
        return out[0].numpy()
    finally:
        model.to(torch.float32)


def _rel(got, ref) -> float:
    return float(np.max(np.abs(got - ref).max(axis=-1) / np.abs(ref).max(axis=-1)))


def test_gguf_carries_the_prefix(pt):
    _, prefix, gguf = pt
    h = read_header(gguf)
    assert h.get(keys.PTUNING_PRE_SEQ_LEN) == P
    np.testing.assert_array_equal(rt_ptuning.read_prefix(h), prefix)


def test_logits_and_greedy_match_the_published_forward(glm3, pt, tmp_path):
    from chatglm.runtime.model import load

    _, prefix, gguf = pt
    ids = [glm3.special["[gMASK]"], glm3.special["sop"]] + list(range(100, 120))
    ref = reference(glm3.model, prefix, ids)
    with load(gguf, n_ctx=128, n_threads=1, kv_type="f32", flash_attn=False) as m:
        assert m.info.pre_seq_len == P and m.info.n_ctx >= 128  # llama.cpp pads P + 128 up
        got = m.engine.all_logits(ids)
        err = _rel(got, ref)
        assert err < 1e-4, err
        # without the prefix the logits differ (so the check above can fail)
        plain = reference(glm3.model, np.zeros_like(prefix[:, :, :0]), ids)
        assert _rel(plain, ref) > 1e-2
        # greedy, 32 steps, through prefill + step (KV reuse across calls)
        seq = list(ids[:4])
        m.engine.reset()
        m.engine.prefill(seq)
        for _ in range(32):
            seq.append(int(np.argmax(m.engine.logits())))
            m.engine.step(seq[-1])
        want = list(ids[:4])
        for _ in range(32):
            want.append(int(np.argmax(reference(glm3.model, prefix, want)[-1])))
        assert seq == want
        # a second turn reusing the cache, and a reset, keep the prefix
        m.engine.prefill(seq[:20] + [300, 301])
        np.testing.assert_allclose(m.engine.logits(), reference(glm3.model, prefix, seq[:20] + [300, 301])[-1],
                                   rtol=0, atol=1e-4 * np.abs(ref).max())
        m.engine.reset()
        m.engine.prefill(ids)
        assert _rel(m.engine.logits()[None], ref[-1:]) < 1e-4


def test_prefix_projection_is_evaluated_at_convert_time(glm3, tmp_path):
    n_layer, n_kv, head_dim = _layout(glm3.model)
    width, hidden = n_layer * 2 * n_kv * head_dim, glm3.model.config.hidden_size
    rng = np.random.default_rng(3)
    emb = rng.normal(0, 1, (P, hidden)).astype(np.float32)
    w0, b0 = rng.normal(0, 0.2, (hidden, hidden)), rng.normal(0, 0.2, hidden)
    w2, b2 = rng.normal(0, 0.2, (width, hidden)), rng.normal(0, 0.2, width)
    folder = _prefix_dir(glm3.ckpt, tmp_path / "proj", emb, pre_seq_len=P, prefix_projection=True)
    state = torch.load(folder / "pytorch_model.bin")
    for name, arr in (("trans.0.weight", w0), ("trans.0.bias", b0), ("trans.2.weight", w2), ("trans.2.bias", b2)):
        state[f"transformer.prefix_encoder.{name}"] = torch.from_numpy(arr.astype(np.float32))
    torch.save(state, folder / "pytorch_model.bin")
    gguf = convert(glm3.ckpt, tmp_path / "proj.gguf", "f16", ptuning=folder).path
    f32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731 - the checkpoint holds float32
    kv = np.tanh(f32(emb) @ f32(w0).T + f32(b0)) @ f32(w2).T + f32(b2)
    want = kv.reshape(P, n_layer, 2, n_kv * head_dim).transpose(1, 2, 0, 3)
    np.testing.assert_allclose(rt_ptuning.read_prefix(read_header(gguf)), want, rtol=1e-6, atol=1e-6)


def test_a_full_ptuning_checkpoint_converts_on_its_own(glm3, pt, tmp_path):
    folder, prefix, _ = pt
    full = tmp_path / "full"
    shutil.copytree(glm3.ckpt, full)
    cfg = json.loads((full / "config.json").read_text())
    cfg.update(pre_seq_len=P)
    (full / "config.json").write_text(json.dumps(cfg))
    from safetensors.numpy import load_file, save_file

    weights = load_file(full / "model.safetensors")  # the fine-tuning scripts save the prefix beside the weights
    weights["transformer.prefix_encoder.embedding.weight"] = np.ascontiguousarray(
        prefix.transpose(2, 0, 1, 3).reshape(P, -1))
    save_file(weights, full / "model.safetensors")
    gguf = convert(full, tmp_path / "full.gguf", "f32").path
    np.testing.assert_array_equal(rt_ptuning.read_prefix(read_header(gguf)), prefix)


@pytest.mark.parametrize("change, message", [
    ({"pre_seq_len": P + 1}, "disagrees with the prefix tensor's 6 rows"),
    ({"width": 8}, "a prefix of another model"),
    ({"nan": True}, "NaN or infinite"),
])
def test_bad_prefixes_are_one_line_errors_and_nothing_is_written(glm3, tmp_path, change, message):
    n_layer, n_kv, head_dim = _layout(glm3.model)
    width = change.get("width", n_layer * 2 * n_kv * head_dim)
    emb = np.ones((P, width), dtype=np.float32)
    if change.get("nan"):
        emb[2, 3] = np.nan
    folder = _prefix_dir(glm3.ckpt, tmp_path / "bad", emb, pre_seq_len=change.get("pre_seq_len", P))
    with pytest.raises(InputError, match=message) as err:
        convert(glm3.ckpt, tmp_path / "x.gguf", "f16", ptuning=folder)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------------ peer check: chatglm.cpp's own P-Tuning test tensors
from test_chat_templates import REFERENCE  # noqa: E402  (the suite's CHATGLM_REFERENCE lookup)

GLM3_PT = REFERENCE / "chatglm.cpp-tests" / "glm3_ptuning_v2_model.data"
GLM2_TOKENIZER = REFERENCE / "tokenizers" / "chatglm2-6b" / "tokenizer.model"
WEIGHTS = [("transformer.embedding.word_embeddings.weight", (5, 32)),
           ("transformer.encoder.layers.0.input_layernorm.weight", (32,)),
           ("transformer.encoder.layers.0.self_attention.query_key_value.weight", (48, 32)),
           ("transformer.encoder.layers.0.self_attention.query_key_value.bias", (48,)),
           ("transformer.encoder.layers.0.self_attention.dense.weight", (32, 32)),
           ("transformer.encoder.layers.0.post_attention_layernorm.weight", (32,)),
           ("transformer.encoder.layers.0.mlp.dense_h_to_4h.weight", (96, 32)),
           ("transformer.encoder.layers.0.mlp.dense_4h_to_h.weight", (32, 48)),
           ("transformer.encoder.final_layernorm.weight", (32,))]


def read_data(path, n_kv_heads: int, weights, n_vocab: int, plays) -> tuple[np.ndarray, dict, np.ndarray, np.ndarray]:
    """A chatglm.cpp P-Tuning .data file (shared/reference/README.md) as (the prefix in the encoder's layout
    (5, layers * 2 * kv width), the weights with the embedding rows at the ids in ``plays``, an identity head,
    the expected final hidden states (5, 32) of prefill, step, step)."""
    raw = path.read_bytes()
    n_pkv = 2 * n_kv_heads * 5 * 4
    pkv = np.frombuffer(raw, np.float16, n_pkv).reshape(2, n_kv_heads, 5, 4).astype(np.float32)
    at, w = 2 * n_pkv, {}
    for name, shape in weights:
        n = int(np.prod(shape))
        w[name] = np.frombuffer(raw, np.float32, n, at).reshape(shape).copy()
        at += 4 * n
    tail = np.frombuffer(raw, np.uint8, len(raw) - at, at)
    want = np.concatenate([tail[12:396].view(np.float32).reshape(3, 32), tail[400:528].view(np.float32)[None],
                           tail[532:660].view(np.float32)[None]])
    emb_name = weights[0][0]
    emb = np.zeros((n_vocab, 32), np.float32)
    emb[list(plays)] = w[emb_name]
    w[emb_name] = emb
    head = np.zeros((n_vocab, 32), np.float32)
    head[:32] = np.eye(32)
    return np.ascontiguousarray(pkv.transpose(2, 0, 1, 3).reshape(5, -1)), w, head, want


@pytest.mark.skipif(not GLM3_PT.is_file(), reason=f"{GLM3_PT} not found (set CHATGLM_REFERENCE)")
def test_chatglm_cpp_glm3_ptuning_tensors(tmp_path):
    """chatglm.cpp's ChatGLM3 P-Tuning v2 tensors (written with the published modeling_chatglm.py): our converted
    GGUF reproduces its final hidden states (an identity lm_head makes logits[:32] those states)."""
    from safetensors.numpy import save_file

    from chatglm.devtools.checkpoints import published_config, published_tokenizer_config, tiny_glm_config
    from chatglm.runtime.model import load

    n_vocab = 65024
    prefix, state, head, want = read_data(GLM3_PT, 2, WEIGHTS, n_vocab, range(5))
    state["transformer.output_layer.weight"] = head
    state["transformer.prefix_encoder.embedding.weight"] = prefix
    ckpt = tmp_path / "glm3-pt"
    ckpt.mkdir()
    save_file(state, ckpt / "model.safetensors")
    cfg = published_config(tiny_glm_config(hidden_size=32, num_attention_heads=8, num_key_value_heads=2, head_dim=4,
                                           intermediate_size=48, num_hidden_layers=1, vocab_size=n_vocab,
                                           rms_norm_eps=1e-5), "chatglm3", "float32", "THUDM/chatglm3-6b")
    cfg.update(pre_seq_len=5)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    shutil.copy(GLM2_TOKENIZER, ckpt / "tokenizer.model")
    (ckpt / "tokenizer_config.json").write_text(json.dumps(published_tokenizer_config("THUDM/chatglm3-6b",
                                                                                      "chatglm3")))
    gguf = convert(ckpt, tmp_path / "pt.gguf", "f32").path
    with load(gguf, n_ctx=64, n_threads=1, kv_type="f32", flash_attn=False) as m:
        got = m.engine.all_logits([0, 1, 2, 3, 4])[:, :32]
    assert np.abs(got - want).max() < 2e-4, np.abs(got - want).max()  # measured 1.04e-4: the stored prefix is f16


def test_info_run_and_flash_attention_cache_types(glm3, pt, tmp_path):
    """`chatglm convert --ptuning` writes it, `info` shows the prefix; `run` works; f16 / bf16 caches with flash attention (values not transposed) agree
    with the f32 cache to their rounding."""
    from typer.testing import CliRunner

    from chatglm.cli.app import app
    from chatglm.runtime.model import load

    _, prefix, gguf = pt
    folder = pt[0]
    out = tmp_path / "cli.gguf"
    r = CliRunner().invoke(app, ["convert", str(glm3.ckpt), "--ptuning", str(folder), "-t", "q8_0", "-o", str(out)])
    assert r.exit_code == 0 and out.is_file(), r.output
    assert read_header(out).get(keys.PTUNING_PRE_SEQ_LEN) == P
    r = CliRunner().invoke(app, ["info", str(gguf)])
    assert r.exit_code == 0 and f"P-Tuning v2    prefix of {P} entries" in r.output, r.output
    r = CliRunner().invoke(app, ["run", str(gguf), "-p", "hi", "-n", "3", "--temp", "0"])
    assert r.exit_code == 0, r.output
    ids = [glm3.special["[gMASK]"], glm3.special["sop"]] + list(range(200, 216))
    ref = reference(glm3.model, prefix, ids)
    for kv_type, flash, bound in (("f16", True, 5e-3), ("bf16", True, 3e-2), ("f16", False, 5e-3)):
        with load(gguf, n_ctx=64, n_threads=1, kv_type=kv_type, flash_attn=flash) as m:
            assert _rel(m.engine.all_logits(ids), ref) < bound, (kv_type, flash)


def test_turns_trimming_and_clear_keep_the_prefix(glm3, pt):
    """A conversation that outgrows the context drops old rounds (KV reuse of what stays), then /clear: the cache
    still holds the prefix in front of whatever it holds (its last logits are the published ones)."""
    from chatglm.runtime.model import load

    _, prefix, gguf = pt

    def check(m):
        toks = list(m.engine.tokens)
        assert m.engine.prefill(toks) == 1  # everything before the last token comes from the cache
        ref = reference(glm3.model, prefix, toks)[-1]
        assert np.abs(m.engine.logits() - ref).max() / np.abs(ref).max() < 1e-4

    with load(gguf, n_ctx=64, n_threads=1, kv_type="f32", flash_attn=False) as m:
        s = m.session(temperature=0, max_tokens=4)
        for turn in range(6):
            s.send(" ".join(["hello world"] * 30) + f" {turn}")
            check(m)
        assert len(s.messages) < 12  # old rounds were dropped
        s.clear()
        s.send("hello")
        check(m)


def test_a_gguf_whose_prefix_does_not_fit_is_refused_before_llama_cpp(pt, tmp_path):
    """A prefix edited out of shape (other layer count) or with NaN: one line at load, nothing reaches llama.cpp."""
    import gguf as gguf_py

    from chatglm.runtime.model import load

    _, prefix, src = pt
    reader = gguf_py.GGUFReader(src)
    for name, edit in (("layers", lambda f: f.parts[f.data[0]].__setitem__(0, prefix.shape[0] + 1)),
                       ("nan", lambda f: f.parts[f.data[5]].__setitem__(0, np.nan))):
        bad = tmp_path / f"{name}.gguf"
        shutil.copy(src, bad)
        r = gguf_py.GGUFReader(bad, "r+")
        key = keys.PTUNING_LAYOUT if name == "layers" else keys.PTUNING_PREFIX
        edit(r.fields[key])
        r.data.flush() if hasattr(r.data, "flush") else None
        del r
        with pytest.raises(InputError) as err:
            load(bad, n_ctx=64, n_threads=1)
        assert "\n" not in str(err.value) and "P-Tuning prefix" in str(err.value)
    assert reader.fields[keys.PTUNING_PRE_SEQ_LEN].parts[-1][0] == P


GLM1_PT = REFERENCE / "chatglm.cpp-tests" / "glm_ptuning_v2_model.data"
GLM1_WEIGHTS = [("transformer.word_embeddings.weight", (5, 32))] + [
    (f"transformer.layers.0.{n}", s) for n, s in (
        ("input_layernorm.weight", (32,)), ("input_layernorm.bias", (32,)),
        ("attention.query_key_value.weight", (96, 32)), ("attention.query_key_value.bias", (96,)),
        ("attention.dense.weight", (32, 32)), ("attention.dense.bias", (32,)),
        ("post_attention_layernorm.weight", (32,)), ("post_attention_layernorm.bias", (32,)),
        ("mlp.dense_h_to_4h.weight", (128, 32)), ("mlp.dense_h_to_4h.bias", (128,)),
        ("mlp.dense_4h_to_h.weight", (32, 128)), ("mlp.dense_4h_to_h.bias", (32,)))] + [
    ("transformer.final_layernorm.weight", (32,)), ("transformer.final_layernorm.bias", (32,))]


@pytest.mark.skipif(not GLM1_PT.is_file(), reason=f"{GLM1_PT} not found (set CHATGLM_REFERENCE)")
def test_chatglm_cpp_glm1_ptuning_tensors(tmp_path):
    """ChatGLM-6B on our own graph: chatglm.cpp's P-Tuning v2 tensors, ids 0..4 played by a, [gMASK], <sop>, b, c."""
    from chatglm.devtools.glm1 import save_glm1_checkpoint, tiny_config, train_ice_tokenizer, ReferenceTokenizer
    from chatglm.runtime.model import load

    ice = train_ice_tokenizer(tmp_path / "ice_text.model")
    ref = ReferenceTokenizer(ice, 0)
    n_vocab = -(-ref.sp.vocab_size() // 64) * 64
    config = tiny_config(n_vocab, ref["<sop>"], ref["<eop>"], ref["[MASK]"], ref["[gMASK]"], hidden_size=32,
                         inner_hidden_size=128, num_layers=1, num_attention_heads=8, pre_seq_len=5)
    plays = [200, ref["[gMASK]"], ref["<sop>"], 201, 202]
    prefix, w, head, want = read_data(GLM1_PT, 8, GLM1_WEIGHTS, n_vocab, plays)
    w["lm_head.weight"] = head
    w["transformer.prefix_encoder.embedding.weight"] = prefix
    ckpt = save_glm1_checkpoint(tmp_path / "glm1-pt", ice, config, w)
    gguf = convert(ckpt, tmp_path / "pt.gguf", "f32").path
    with load(gguf, n_ctx=64, n_threads=1, kv_type="f32") as m:
        assert m.info.pre_seq_len == 5
        got = m.engine.all_logits(plays)[:, :32]
        m.engine.reset()  # prefill, then two cached steps, as the file's three calls
        m.engine.prefill(plays[:3])
        steps = [m.engine.logits()[:32].copy()]
        for tok in plays[3:]:
            m.engine.step(tok)
            steps.append(m.engine.logits()[:32].copy())
    assert np.abs(np.array(steps) - want[2:]).max() < 2e-4
    assert np.abs(got - want).max() < 2e-4, np.abs(got - want).max()


def test_serve_answers_as_the_python_api_does(pt):
    """`serve` runs the prefix model: its greedy reply is the Python API's."""
    from fixtures_server import http, serve

    from chatglm.runtime.model import load

    _, _, gguf = pt
    with load(gguf, n_ctx=128, n_threads=1) as m:
        direct = m.chat([{"role": "user", "content": "hello world"}], temperature=0, max_tokens=6).content
        with serve([m]) as live:
            r = http().post(live.url + "/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": [{"role": "user", "content": "hello world"}], "temperature": 0,
                "max_tokens": 6})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == direct


def test_quantized_caches_take_the_prefix(workdir, sp_model, tmp_path):
    """q8_0 / q4_0 KV caches (flash attention: values in rows) with a model whose head size is one block, and a
    ChatGLM2-6B-32K-style linear RoPE (the prefix keys are rotated by the scaled position)."""
    from conftest import make_tiny

    from chatglm.runtime.model import load

    tiny = make_tiny(workdir, sp_model, "chatglm2", seed=5, head_dim=32, num_attention_heads=2, rope_linear=4.0)
    n_layer, n_kv, head_dim = _layout(tiny.model)
    emb = np.random.default_rng(9).normal(0, 1, (P, n_layer * 2 * n_kv * head_dim)).astype(np.float32)
    folder = _prefix_dir(tiny.ckpt, tmp_path / "pt", emb, pre_seq_len=P)
    gguf = convert(tiny.ckpt, tmp_path / "pt.gguf", "f32", ptuning=folder).path
    prefix = emb.reshape(P, n_layer, 2, n_kv * head_dim).transpose(1, 2, 0, 3)
    ids = [tiny.special["[gMASK]"], tiny.special["sop"]] + list(range(300, 316))
    ref = reference(tiny.model, prefix, ids)
    for kv_type, flash, bound in (("f32", False, 1e-4), ("q8_0", True, 3e-2), ("q4_0", True, 2e-1)):
        with load(gguf, n_ctx=64, n_threads=1, kv_type=kv_type, flash_attn=flash) as m:
            assert _rel(m.engine.all_logits(ids), ref) < bound, kv_type


def test_a_prompt_longer_than_the_asked_context_but_within_the_padded_one(glm3, glm3_gguf):
    """llama.cpp clamps n_batch to the n_ctx asked (64) and then pads n_ctx to 256: a 100-token prompt fits the
    context the engine reports and must be fed in batches llama.cpp accepts (it was a GGML_ASSERT abort)."""
    from chatglm.runtime.model import load

    ids = list(range(100, 200))
    with load(glm3_gguf, n_ctx=64, n_threads=1, kv_type="f32", flash_attn=False) as m:
        assert m.info.n_ctx >= len(ids)
        m.engine.prefill(ids)
        ref = glm3.logits(ids)[-1]
        assert np.abs(m.engine.logits() - ref).max() / np.abs(ref).max() < 1e-4


def test_an_f16_prefix_halves_the_metadata_and_runs(glm3, pt, tmp_path):
    """`--ptuning-type f16`: IEEE half bits in a u16 metadata array (GGUF has no f16 value type), which llama.cpp's
    loader takes; the model runs the f16-rounded prefix exactly as the published forward does."""
    from typer.testing import CliRunner

    from chatglm.cli.app import app
    from chatglm.runtime.model import load

    folder, prefix, f32_gguf = pt
    out = tmp_path / "half.gguf"
    r = CliRunner().invoke(app, ["convert", str(glm3.ckpt), "--ptuning", str(folder), "-t", "f32",
                                 "--ptuning-type", "f16", "-o", str(out)])
    assert r.exit_code == 0, r.output
    h = read_header(out)
    assert h.get(keys.PTUNING_PREFIX_TYPE) == "f16"
    half = prefix.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(rt_ptuning.read_prefix(h), half)
    saved = f32_gguf.stat().st_size - out.stat().st_size  # 2 bytes per value, give or take the data alignment
    assert abs(saved - 2 * prefix.size) <= 64, (saved, prefix.size)
    ids = [glm3.special["[gMASK]"], glm3.special["sop"]] + list(range(140, 160))
    with load(out, n_ctx=64, n_threads=1, kv_type="f32", flash_attn=False) as m:
        err = _rel(m.engine.all_logits(ids), reference(glm3.model, half, ids))
    assert err < 1e-5, err
    r = CliRunner().invoke(app, ["convert", str(glm3.ckpt), "--ptuning", str(folder), "--ptuning-type", "q8_0",
                                 "-o", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "stored as f32 or f16, not 'q8_0'" in r.output, r.output
    big = _prefix_dir(glm3.ckpt, tmp_path / "big", np.full(prefix.transpose(2, 0, 1, 3).reshape(P, -1).shape, 7e4,
                                                           np.float32), pre_seq_len=P)
    with pytest.raises(InputError, match="overflows float16"):
        convert(glm3.ckpt, tmp_path / "x.gguf", "f32", ptuning=big, ptuning_type="f16")
    assert not (tmp_path / "x.gguf").exists()

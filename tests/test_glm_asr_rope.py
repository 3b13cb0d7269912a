"""GLM-ASR with a rotary audio encoder (transformers' ``GlmAsrForConditionalGeneration``; the remote layout with
``use_rope: true``) -> our own ``chatglm_glmasr_rope`` projector, run on our own ggml graph
(chatglm/runtime/glmasr/), the embeddings evaluated as embedding batches in llama.cpp's context.

References are transformers' own: its WhisperFeatureExtractor for the log-mel, ``get_audio_features`` for the
embeddings, the model's forward for the logits, ``GlmAsrProcessor`` for the prompt's ids. The clip is a 7.3 s sweep
(one window, zero-padded to 30 s, 91 embeddings).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest

from chatglm.convert.pipeline import convert
from chatglm.devtools import glm_asr as g
from chatglm.errors import InputError
from chatglm.runtime.glmasr import mel
from chatglm.runtime.media import load_media
from chatglm.runtime.messages import Message
from chatglm.runtime.model import load
from tests.hostile import cli
from test_logits_glm import rel_err

TOL = 1e-3
F16_TOL = 5e-3  # the f16 projector (1.6e-3 measured)
MEL_TOL = 2e-4  # float64 numpy against the extractor's float32 torch STFT (7e-5 measured)
PROMPT = "Transcribe"
SECONDS = 7.3
N_AUDIO = 91  # (730 frames -> 365 positions) / 4


class Built:
    def __init__(self, root: Path):
        self.tok = g.tokenizer()
        self.ckpt = g.save_hf_checkpoint(root / "hf", self.tok, seed=3)
        self.gguf = root / "asr.gguf"
        self.result = convert(self.ckpt, self.gguf, "f32", mmproj_type="f32")
        self.wav = root / "sweep.wav"
        self.wav.write_bytes(g.sweep_wav(SECONDS, silence=0.3))
        self.samples = g.wav_samples(self.wav.read_bytes())


@pytest.fixture(scope="module")
def asr(tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp("glm_asr_rope"))


@pytest.fixture(scope="module")
def hf(asr):
    from transformers import GlmAsrForConditionalGeneration

    return GlmAsrForConditionalGeneration.from_pretrained(asr.ckpt).eval()


@pytest.fixture(scope="module")
def model(asr):
    with load(asr.gguf, n_ctx=1024, kv_type="f32", n_threads=2) as m:
        yield m


def _features(asr):
    proc = g.hf_processor(asr.ckpt)
    return proc.feature_extractor(asr.samples, sampling_rate=16000, return_attention_mask=True, return_tensors="pt")


def test_the_projector_is_our_own_type_with_every_size_the_graph_needs(asr):
    proj = gguf.GGUFReader(asr.result.mmproj)
    kv = {name: f.contents() for name, f in proj.fields.items()}
    assert kv["clip.projector_type"] == "chatglm_glmasr_rope" and kv["clip.has_audio_encoder"] is True
    assert kv["chatglm.audio.rope.dimension_count"] == 8 and kv["chatglm.audio.rope.freq_base"] == 10000.0
    assert kv["clip.audio.projector.stack_factor"] == 4 and kv["chatglm.audio.has_boa_eoa"] is False
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in proj.tensors}
    assert shapes["a.conv1d.1.weight"] == (3, 128, 64) and shapes["mm.a.mlp.1.weight"] == (256, 128)
    assert "a.blk.0.attn_k.bias" not in shapes and "a.position_embd.weight" not in shapes


def test_log_mel_matches_the_feature_extractor(asr):
    ref = _features(asr)
    w = mel.windows(mel.decode_wav(asr.wav.read_bytes(), "x"), 128, 21)
    assert len(w) == 1 and w[0].frames == int(ref["attention_mask"].sum())
    assert np.abs(w[0].features - ref["input_features"][0].numpy()).max() < MEL_TOL


def test_audio_embeddings_match_get_audio_features(asr, hf, model):
    import torch

    f = _features(asr)
    with torch.no_grad():
        ref = hf.model.get_audio_features(f["input_features"], f["attention_mask"]).pooler_output.numpy()
    media = load_media(asr.wav, "audio")
    assert model.media.n_tokens(media) == (N_AUDIO, N_AUDIO) == (len(ref), len(ref))
    assert rel_err(model.media.embeddings(media), ref) < TOL


def test_prompt_ids_equal_the_processors_and_logits_after_audio_match(asr, hf, model):
    import torch

    media = load_media(asr.wav, "audio")
    ids = model.prompt_ids([Message("user", PROMPT, media=(media,))])
    proc = g.hf_processor(asr.ckpt)
    text = proc.apply_chat_template([{"role": "user", "content": [{"type": "audio"}, {"type": "text",
                                                                                     "text": PROMPT}]}],
                                    add_generation_prompt=True, tokenize=False)
    inputs = proc(text=text, audio=asr.samples)
    want = inputs["input_ids"][0].tolist()
    assert model.media.expanded_ids(ids, [media]) == want
    model.media.prefill(ids, [media])
    got = model.engine.logits()
    with torch.no_grad():
        ref = hf(input_ids=inputs["input_ids"], input_features=inputs["input_features"],
                 input_features_mask=inputs["input_features_mask"]).logits[0, -1].numpy()
    assert rel_err(got, ref) < TOL


def test_remote_layout_with_use_rope_runs_through_the_same_path(tmp_path):
    tok = g.tokenizer()
    parts = g.tiny_remote(tok.get_vocab_size(), seed=1)
    ckpt = g.save_remote_checkpoint(parts, tmp_path / "remote", tok, use_rope=True)
    result = convert(ckpt, tmp_path / "r.gguf", "f32", mmproj_type="f32")
    kv = {n: f.contents() for n, f in gguf.GGUFReader(result.mmproj).fields.items()}
    assert kv["clip.projector_type"] == "chatglm_glmasr_rope" and kv["chatglm.audio.has_boa_eoa"] is True
    samples = g.sweep(SECONDS).astype(np.float32) / 32768.0
    window = mel.windows(samples, 128, 21)[0]
    ref = g.remote_rope_embeddings(parts, g.whisper_features(samples), mel.n_tokens(window.frames, 4))
    with load(result.path, n_ctx=512, kv_type="f32", n_threads=2) as m:
        got = m.media.embeddings(load_media(g.pcm_wav(g.sweep(SECONDS)), "audio"))
        assert got.shape == ref.shape == (N_AUDIO + 2, 64)
        assert rel_err(got, ref) < TOL
        reply = m.chat([Message("user", PROMPT, media=(load_media(g.pcm_wav(g.sweep(SECONDS)), "audio"),))],
                       max_tokens=2, temperature=0.0)
        assert isinstance(reply.content, str)


def _wav(rate=16000, width=2, frames=1600, channels=1) -> bytes:
    import io
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(b"\x01\x00" * (frames * channels * width // 2))
    return buf.getvalue()


@pytest.mark.parametrize("data,what", [
    (_wav(rate=22050), "22050 Hz"),
    (_wav(width=1), "8-bit PCM"),
    (_wav()[:-1000], "truncated"),
    (b"", "empty"),
    (b"not audio at all, just text", "not audio"),
], ids=["rate", "8-bit", "truncated", "empty", "text"])
def test_bad_audio_is_one_line_through_the_model(model, data, what):
    with pytest.raises(InputError, match=what) as err:
        model.chat([Message("user", PROMPT, media=(load_media(data, "audio", name="clip"),))], max_tokens=1)
    assert "\n" not in str(err.value) and "clip" in str(err.value)


@pytest.mark.parametrize("data,what", [
    (b"ID3\x03\x00" + b"\x00" * 64, "not a WAV"), (_wav()[:60], "truncated"), (b"", "empty"),
    (_wav()[:40], "not a WAV file"),
], ids=["mp3", "truncated", "empty", "header-only"])
def test_the_front_end_refuses_in_one_line(data, what):
    with pytest.raises(InputError, match=what) as err:
        mel.decode_wav(data, "clip")
    assert "\n" not in str(err.value) and "clip" in str(err.value)


def _float_wav(samples: np.ndarray, channels: int = 1, rate: int = 16000) -> bytes:
    import struct

    body = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * 4 * channels, 4 * channels, 32)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


def test_float_and_stereo_wavs_decode_to_the_same_mono_samples():
    pcm = g.sweep(1.0)
    mono = mel.decode_wav(g.pcm_wav(pcm), "x")
    assert np.array_equal(mel.decode_wav(_float_wav(pcm / 32768.0), "x"), mono)
    stereo = np.stack([pcm, np.zeros_like(pcm)], axis=1).reshape(-1)  # left the sweep, right silent
    import io
    import wave

    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(stereo.tobytes())
    np.testing.assert_allclose(mel.decode_wav(out.getvalue(), "x"), mono / 2, atol=1e-7)
    with pytest.raises(InputError, match="22050 Hz"):
        mel.decode_wav(_float_wav(pcm / 32768.0, rate=22050), "x")


@pytest.mark.parametrize("kv,drop,what", [
    ({}, ("a.blk.1.attn_v.bias",), "lacks tensor a.blk.1.attn_v.bias"),
    ({"clip.audio.embedding_length": 32}, (), "a.conv1d.1.weight is [3, 128, 64], expected [3, 128, 32]"),
    ({"chatglm.audio.rope.dimension_count": 7}, (), "7 rotated dims"),
    ({"clip.audio.block_count": 3}, (), "declares 3 encoder layers"),
    ({"chatglm.audio.attention.head_count_kv": 2}, (), "a.blk.0.attn_k.weight is [64, 64], expected [64, 32]"),
])
def test_a_broken_projector_is_refused_in_one_line(asr, tmp_path, kv, drop, what):
    from fixtures_glm5_next import rewrite_gguf

    bad = rewrite_gguf(asr.result.mmproj, tmp_path / "mmproj-bad.gguf", dict(kv), drop)
    with pytest.raises(InputError, match=re.escape(what)) as err:
        load(asr.gguf, n_ctx=512, n_threads=2, mmproj=bad)
    assert "\n" not in str(err.value)
    out = cli(["run", asr.gguf, "--mmproj", bad, "--audio", asr.wav, "-p", PROMPT, "-n", "1"])
    assert out.code != 0 and "Traceback" not in out.text and len(out.text.strip().splitlines()) == 1, out.text


def test_an_encoder_tensor_of_the_wrong_shape_is_refused(asr, tmp_path):
    reader = gguf.GGUFReader(asr.result.mmproj)
    bad = tmp_path / "mmproj-bad.gguf"
    w = gguf.GGUFWriter(bad, "clip")
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            w.add_key_value(name, field.contents(), field.types[0])
    for t in reader.tensors:
        data = np.asarray(t.data)
        w.add_tensor(t.name, data[:, :32].copy() if t.name == "a.blk.1.ffn_up.weight" else data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(InputError, match=re.escape("a.blk.1.ffn_up.weight is [32, 256], expected [64, 256]")):
        load(asr.gguf, n_ctx=512, n_threads=2, mmproj=bad)


def test_cli_run_with_audio_answers(asr):
    out = cli(["run", asr.gguf, "--audio", asr.wav, "-p", PROMPT, "--temp", "0", "-n", "3", "--json", "-c", "1024"])
    assert out.code == 0, out.text
    assert json.loads(out.out.strip().splitlines()[-1])["usage"]["completion_tokens"] >= 1


def test_session_audio_is_reused_from_the_cache(asr, model):
    from chatglm.runtime.session import ChatSession

    evaluated = []
    for _ in range(2):
        session = ChatSession(model, system="Write down what is said.")
        reply = session.send(PROMPT, audio=[asr.wav], max_tokens=2, temperature=0.0)
        assert isinstance(reply.content, str) and model.last_stats.generated_tokens >= 1
        evaluated.append(model.last_stats.evaluated_tokens)
    assert evaluated[0] > N_AUDIO > evaluated[1]  # the same audio at the same place stays cached


def test_the_server_takes_input_audio(asr):
    import base64

    from fixtures_server import openai_client, serve

    from chatglm.runtime.mtmd import PLACEHOLDER

    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(asr.wav.read_bytes()).decode(),
                                                   "format": "wav"}}
    loaded = []  # the server owns (and closes) the model it serves
    with serve(lambda: loaded.append(load(asr.gguf, n_ctx=1024, kv_type="f32", n_threads=2)) or loaded) as live:
        assert live.wait_ready().get("status") == "ok"  # the loader runs in the background: wait for it
        reply = openai_client(live).chat.completions.create(
            model="tiny", max_tokens=2, temperature=0.0,
            messages=[{"role": "user", "content": [part, {"type": "text", "text": PROMPT}]}])
        assert reply.usage.completion_tokens >= 1
        assert loaded[0].engine.tokens.count(PLACEHOLDER) == N_AUDIO  # the cache holds the clip's embeddings


def test_two_windows_and_the_default_f16_projector(asr, hf, model, tmp_path):
    import torch

    pcm = g.sweep(37.0, silence=0.5)
    f = g.hf_processor(asr.ckpt).feature_extractor(
        [pcm[:480000].astype(np.float32) / 32768.0, pcm[480000:].astype(np.float32) / 32768.0],
        sampling_rate=16000, return_attention_mask=True, return_tensors="pt")
    with torch.no_grad():
        ref = hf.model.get_audio_features(f["input_features"], f["attention_mask"]).pooler_output.numpy()
    media = load_media(g.pcm_wav(pcm), "audio")
    got = model.media.embeddings(media)
    assert got.shape == ref.shape == (375 + 87, 64)
    assert rel_err(got, ref) < TOL
    result = convert(asr.ckpt, tmp_path / "asr16.gguf", "f32")  # the projector's matrices f16 by default
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(result.mmproj).tensors}
    assert types["a.blk.0.attn_q.weight"] == types["a.conv1d.1.weight"] == gguf.GGMLQuantizationType.F16
    with load(result.path, n_ctx=1024, kv_type="f32", n_threads=2) as m16:
        assert rel_err(m16.media.embeddings(media), ref) < F16_TOL


@pytest.mark.parametrize("change,what", [
    ({"audio_config": {"rope_parameters": {"rope_type": "linear", "factor": 2.0}}}, "rope type 'linear'"),
    ({"audio_config": {"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.3125}}}, "rotates 5 of 16"),
    ({"audio_config": {"intermediate_size": 192}}, "intermediate_size 192 is not 4 x hidden_size 64"),
    ({"audio_config": {"num_key_value_heads": 3}}, "4 heads / 3 key-value heads"),
    ({"projector_hidden_act": "relu"}, "projector_hidden_act='relu' is not supported"),
], ids=["rope-type", "odd-rope-dim", "stack", "kv-heads", "act"])
def test_unsupported_rotary_configs_are_one_line_and_leave_nothing(asr, tmp_path, change, what):
    cfg = json.loads((asr.ckpt / "config.json").read_text())
    for key, value in change.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) else value
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in asr.ckpt.iterdir():
        if f.name != "config.json":
            (folder / f.name).symlink_to(f)
    (folder / "config.json").write_text(json.dumps(cfg))
    out = cli(["convert", folder, "-t", "f32", "-o", tmp_path / "x.gguf"])
    assert out.code != 0 and "Traceback" not in out.text and what in out.text, out.text
    assert len(out.text.strip().splitlines()) == 1 and not list(tmp_path.glob("*.gguf"))


def test_repl_audio_reaches_the_encoder(asr, model, capsys):
    from test_repl import ScriptedEditor

    from chatglm.cli.repl import Repl
    from chatglm.runtime.mtmd import PLACEHOLDER
    from chatglm.runtime.session import ChatSession

    session = ChatSession(model, system="Listen.")
    session.sampling = session.sampling.updated(max_tokens=2, temperature=0.0)
    Repl(session, editor=ScriptedEditor([f"/audio {asr.wav}", PROMPT])).run()
    user = [m for m in session.messages if m.role == "user"]
    assert len(user) == 1 and len(user[0].media) == 1 and "attached " in capsys.readouterr().err
    assert model.engine.tokens.count(PLACEHOLDER) == N_AUDIO


def test_conv1d_refuses_what_ggml_would_assert():
    from chatglm.ggml.ops import F32, GGMLError, Graph

    with Graph(16, 16) as gr:
        kernel = gr.new(F32, (3, 8, 4))
        for x, what in ((gr.new(F32, (10, 7)), "does not fit"), (gr.new(F32, (1, 8)), "shorter than the kernel")):
            with pytest.raises(GGMLError, match=what):
                gr.conv1d(kernel, x, 2, 0)
        assert gr.conv1d(kernel, gr.new(F32, (10, 8)), 2, 1).ne[:2] == (4, 5)  # (C_out, L_out)

"""GLM-ASR (``glm_asr`` -> llama.cpp ``llama`` + libmtmd ``glma``): what libmtmd and llama.cpp compute from our files
is the checkpoint's model.

The tiny checkpoint is the remote-code layout (``GlmasrModel``, written by chatglm/devtools/glm_asr.py with the
published names: transformers' WhisperEncoder, the MLP adapter, a LlamaForCausalLM); the audio is a sine sweep whose
last 0.4 s is silent. Both sides compute their own log-mel (16 kHz, 128 bins, hop 160, 30 s windows) and agree
to 3e-4 in the embeddings, but at the end of a full 30 s window WhisperFeatureExtractor reflects the clip where
libmtmd reads on into the next window or its zero padding: with a sweep up to the end of a 30.0 s clip the last audio
embedding is 1.3e-2 off (every other one 1.4e-4). A clip shorter than a window is zero-padded by both. libmtmd also
keeps only whole 3000-frame chunks of the clip plus 30 s of padding, so a clip of 29.99 s or 30.0 s gets a second,
silent chunk (754 embeddings) where the processor has one window: the fixtures stay under that.
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
from chatglm.errors import InputError, UnsupportedModelError
from chatglm.gguf_file import read_header
from chatglm.runtime.media import load_media
from chatglm.runtime.messages import Message
from chatglm.runtime.model import load
from tests.hostile import cli
from test_logits_glm import rel_err

TOL = 1e-3
PROMPT = "Transcribe"


class Built:
    def __init__(self, root: Path):
        self.tok = g.tokenizer()
        self.parts = g.tiny_remote(self.tok.get_vocab_size())
        self.ckpt = g.save_remote_checkpoint(self.parts, root / "remote", self.tok)
        self.gguf = root / "asr.gguf"
        self.result = convert(self.ckpt, self.gguf, "f32", mmproj_type="f32")
        self.wav = root / "sweep.wav"
        # 29.9 s: libmtmd pads the clip with 30 s of silence and keeps whole 3000-frame chunks, so a clip of 30.0 s
        # would bring a second, silent chunk; the processor pads this one to 30 s as well
        self.wav.write_bytes(g.sweep_wav(29.9, silence=0.4))
        features = g.whisper_features(g.wav_samples(self.wav.read_bytes()))
        self.ref_audio = g.remote_audio_embeddings(self.parts, features)


@pytest.fixture(scope="module")
def asr(tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp("glm_asr"))


@pytest.fixture(scope="module")
def model(asr):
    with load(asr.gguf, n_ctx=1024, kv_type="f32", n_threads=2) as m:
        yield m


def test_files_follow_libmtmd_and_llama_cpp_layout(asr):
    assert asr.result.mmproj == asr.gguf.with_name("mmproj-asr.gguf")
    text = read_header(asr.gguf)
    assert text.arch == "llama" and text.get("glm.family") == "glm-asr"
    assert "blk.1.ffn_gate.weight" in text.tensors and "output.weight" in text.tensors
    proj = gguf.GGUFReader(asr.result.mmproj)
    kv = {name: f.contents() for name, f in proj.fields.items()}
    assert kv["general.architecture"] == "clip" and kv["clip.projector_type"] == "glma"
    assert kv["clip.has_audio_encoder"] is True and kv["clip.audio.num_mel_bins"] == 128
    assert kv["clip.audio.projector.stack_factor"] == 4 and kv["clip.audio.projection_dim"] == 64
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in proj.tensors}
    assert shapes["a.conv1d.1.bias"] == (1, 64) and shapes["a.position_embd.weight"] == (64, 1500)
    assert shapes["mm.a.mlp.1.weight"] == (256, 128) and shapes["v.boi"] == (64, 1)
    assert "a.blk.0.attn_k.bias" not in shapes and "a.blk.1.attn_q.bias" in shapes


def test_q_and_k_rows_are_permuted_to_interleaved_rope(asr):
    reader = gguf.GGUFReader(asr.gguf)
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight").data
    src = asr.parts.lm.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert not np.array_equal(q, src)
    np.testing.assert_array_equal(q, g_permute(src, 4))


def g_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    from chatglm.families.glm_asr.convert import permute_rope

    return permute_rope(w, n_head)


def test_audio_embeddings_match_the_checkpoint(asr, model):
    media = load_media(asr.wav, "audio")
    assert model.media.n_tokens(media) == (377, 377)  # 1500 positions / 4 stacked + begin + end of audio
    got = model.media.embeddings(media)
    assert got.shape == asr.ref_audio.shape
    assert rel_err(got, asr.ref_audio) < TOL


def test_audio_of_two_windows_is_two_chunks_behind_one_placeholder(asr, model):
    # window 1: 30 s, silent at both ends (so neither front end's framing at the boundary matters); window 2: the
    # same less its last 0.1 s of silence. The same loudness in both: libmtmd floors the log-mel at 8 below the
    # clip's maximum, the processor at 8 below each window's
    first = g.sweep(30.0, silence=0.5, lead=0.4)
    second = first[:-1600]
    media = load_media(g.pcm_wav(np.concatenate([first, second])), "audio")
    assert model.media.n_tokens(media) == (2 * 377, 2 * 377)
    ref = np.concatenate([g.remote_audio_embeddings(asr.parts, g.whisper_features(w.astype(np.float32) / 32768.0))
                          for w in (first, second)])
    assert rel_err(model.media.embeddings(media), ref) < TOL


def test_prompt_ids_equal_the_tokenizers_and_logits_after_audio_match(asr, model):
    from transformers import AutoTokenizer

    media = load_media(asr.wav, "audio")
    messages = [Message("user", PROMPT, media=(media,))]
    ids = model.prompt_ids(messages)
    hf = AutoTokenizer.from_pretrained(asr.ckpt)
    parts = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": PROMPT}]}]
    assert ids == list(hf.apply_chat_template(parts, add_generation_prompt=True, tokenize=True, return_dict=False))
    pad = asr.tok.token_to_id("<|pad|>")
    assert ids.count(pad) == 1
    model.media.prefill(ids, [media])
    got = model.engine.logits()
    cut = ids.index(pad)
    table = asr.parts.lm.model.embed_tokens.weight.detach().numpy()
    embeds = np.concatenate([table[ids[:cut]], asr.ref_audio, table[ids[cut + 1:]]])
    ref = g.lm_logits(asr.parts, embeds)[-1]
    assert rel_err(got, ref) < TOL
    assert len(model.media.expanded_ids(ids, [media])) == len(embeds)


def test_session_send_with_audio_streams_a_reply(asr, model):
    from chatglm.runtime.session import ChatSession

    session = ChatSession(model, system="Transcribe what you hear.")  # a prefix no earlier test left in the cache
    reply = session.send(PROMPT, audio=[asr.wav], max_tokens=3, temperature=0.0)
    assert model.last_stats.evaluated_tokens > 377 and model.last_stats.generated_tokens >= 1
    again = ChatSession(model, system="Transcribe what you hear.")
    again.send(PROMPT, audio=[asr.wav], max_tokens=3, temperature=0.0)
    assert model.last_stats.evaluated_tokens < 377  # the same audio at the same place is reused from the cache
    assert isinstance(reply.content, str)


@pytest.mark.parametrize("data", [b"", b"RIFF\x00\x00\x00\x00WAVEfmt ", b"\x89PNG\r\n\x1a\n" + b"\x00" * 32,
                                  b"not audio at all, just text"])
def test_a_wrong_audio_format_is_refused_in_one_line(model, data):
    from chatglm.runtime.session import ChatSession

    with pytest.raises(InputError) as err:
        ChatSession(model).send(PROMPT, audio=[data])
    assert "\n" not in str(err.value)


def test_rotary_encoders_never_become_glma_projectors(asr, tmp_path):
    """use_rope true is our own projector (tests/test_glm_asr_rope.py); a use_rope that is no boolean is refused."""
    cfg = json.loads((asr.ckpt / "config.json").read_text())
    for value, what in ((True, None), ("yes", "use_rope='yes'")):
        rope = tmp_path / f"rope-{value}"
        rope.mkdir()
        for f in asr.ckpt.iterdir():
            if f.name != "config.json":
                (rope / f.name).symlink_to(f)
        (rope / "config.json").write_text(json.dumps({**cfg, "use_rope": value}))
        if what is None:
            result = convert(rope, tmp_path / "rope.gguf", "f32")
            assert read_header(result.mmproj).get("clip.projector_type") == "chatglm_glmasr_rope"
            continue
        with pytest.raises(UnsupportedModelError, match=re.escape(what)):
            convert(rope, tmp_path / "x.gguf", "f32")
        out = cli(["convert", rope, "-t", "f32", "-o", tmp_path / "y.gguf"])
        assert out.code != 0 and "Traceback" not in out.text and what in out.text
        assert not list(tmp_path.glob("[xy].gguf")) and not list(tmp_path.glob("mmproj-[xy].gguf"))


@pytest.mark.parametrize("kv,drop,what", [
    ({}, ("a.position_embd.weight",), "lacks tensor a.position_embd.weight"),
    ({}, ("a.blk.1.attn_v.bias",), "lacks tensor a.blk.1.attn_v.bias"),
    ({"clip.audio.embedding_length": 32}, (), "a.conv1d.1.weight is [3, 128, 64], expected [3, 128, 32]"),
    ({"clip.audio.block_count": 3}, (), "lacks tensor a.blk.2."),
    ({"clip.audio.projector.stack_factor": 7}, (), "stack_factor 7 does not divide"),
    ({"clip.audio.projection_dim": 128}, (), "mm.a.mlp.2.weight"),
])
def test_a_broken_projector_is_refused_before_libmtmd(asr, tmp_path, kv, drop, what):
    from fixtures_glm5_next import rewrite_gguf

    bad = rewrite_gguf(asr.result.mmproj, tmp_path / "mmproj-bad.gguf", dict(kv), drop)
    with pytest.raises(InputError, match=re.escape(what)) as err:
        load(asr.gguf, n_ctx=512, n_threads=2, mmproj=bad)
    assert "\n" not in str(err.value)


def test_cli_run_with_audio_answers_and_refuses_bad_audio_in_one_line(asr, tmp_path):
    out = cli(["run", asr.gguf, "--audio", asr.wav, "-p", PROMPT, "--temp", "0", "-n", "3", "--json", "-c", "1024"])
    assert out.code == 0, out.text
    reply = json.loads(out.out.strip().splitlines()[-1])
    assert reply["usage"]["completion_tokens"] >= 1
    bad = tmp_path / "speech.wav"
    bad.write_bytes(b"ID3\x03\x00not really an mp3")
    for args in (["--audio", bad], ["--audio", tmp_path / "missing.wav"]):
        out = cli(["run", asr.gguf, *args, "-p", PROMPT, "-n", "1"])
        assert out.code != 0 and "Traceback" not in out.text and len(out.text.strip().splitlines()) == 1, out.text


def test_repl_audio_attaches_to_the_next_message(asr, model, capsys):
    from chatglm.cli.repl import Repl
    from chatglm.runtime.session import ChatSession
    from test_repl import ScriptedEditor

    session = ChatSession(model)
    session.sampling = session.sampling.updated(max_tokens=2, temperature=0.0)
    Repl(session, editor=ScriptedEditor([f"/audio {asr.wav}", PROMPT, "/audio nowhere.wav", "again"])).run()
    user = [m for m in session.messages if m.role == "user"]
    assert len(user) == 2 and len(user[0].media) == 1 and user[1].media == ()
    err = capsys.readouterr().err
    assert "attached " in err and " to the next message" in err and "error: " in err and "nowhere.wav" in err


def test_the_default_f16_projector_encodes_within_tolerance(asr, tmp_path):
    result = convert(asr.ckpt, tmp_path / "asr-q8.gguf", "q8_0")  # projector f16 by default
    reader = gguf.GGUFReader(result.mmproj)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["a.blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.F16
    assert types["a.conv1d.1.bias"] == types["v.boi"] == types["a.position_embd.weight"] == gguf.GGMLQuantizationType.F32
    with load(result.path, n_ctx=512, n_threads=2) as m:
        got = m.media.embeddings(load_media(asr.wav, "audio"))
    assert rel_err(got, asr.ref_audio) < TOL


def test_the_language_model_runs_alone_and_refuses_audio(asr, tmp_path):
    import shutil

    from chatglm.runtime.session import ChatSession

    alone = tmp_path / "asr-text.gguf"
    shutil.copy(asr.gguf, alone)  # no mmproj-asr-text.gguf beside it
    ids = asr.tok.encode("<|user|>\nhello there<|assistant|>\n").ids
    table = asr.parts.lm.model.embed_tokens.weight.detach().numpy()
    with load(alone, n_ctx=256, kv_type="f32", n_threads=2) as m:
        assert m.media is None
        assert rel_err(m.engine.all_logits(ids), g.lm_logits(asr.parts, table[ids])) < 1e-4
        with pytest.raises(InputError, match="takes text only") as err:
            ChatSession(m).send(PROMPT, audio=[asr.wav])
        assert "\n" not in str(err.value)

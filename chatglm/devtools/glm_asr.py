"""Tiny GLM-ASR checkpoints and test audio (development and tests only).

- :func:`save_remote_checkpoint`: the remote-code layout (``GlmasrModel``) written by code with the published names:
  transformers' ``WhisperEncoder`` (its final LayerNorm dropped, as GlmasrModel replaces it with Identity) under
  ``audio_encoder.whisper``, the adapter (``layer_norm``, ``adapting.0/2``, ``audio_bos_eos_token``), and a
  ``LlamaForCausalLM`` at ``model.*`` / ``lm_head``; config ``lm_config`` / ``whisper_config`` / ``merge_factor`` /
  ``use_rope``. The remote classes themselves are not importable without the hub, so :func:`remote_audio_embeddings`
  recomputes their audio path from these modules.
- :func:`save_hf_checkpoint`: transformers' own ``GlmAsrForConditionalGeneration``.
- :func:`sweep_wav`: a 16 kHz mono 16-bit WAV of a sine sweep.

Nothing in the runtime imports this module; torch and transformers are imported where needed.
"""

from __future__ import annotations

import io
import json
import math
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from chatglm.devtools.glm4 import GLM4_SPECIALS, tokenizer_config, train_glm4_bpe

if TYPE_CHECKING:  # pragma: no cover
    import torch

AUDIO_SPECIALS = ("<|begin_of_audio|>", "<|end_of_audio|>", "<|pad|>")
# GLM-Edge's turns; an audio content part is one <|pad|> (libmtmd's glma chunk brings its begin/end embeddings)
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>\n{% if m.content is string %}{{ m.content }}{% else %}"
            "{% for c in m.content %}{% if c.type == 'audio' %}<|pad|>{% else %}{{ c.text }}{% endif %}{% endfor %}"
            "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
# transformers' layout: the processor expands each <|pad|> to one per embedding, between begin/end-of-audio
HF_TEMPLATE = TEMPLATE.replace("<|pad|>", "<|begin_of_audio|><|pad|><|end_of_audio|>")
SAMPLE_RATE = 16000


def tokenizer(vocab_size: int = 600):
    return train_glm4_bpe(vocab_size=vocab_size, specials=GLM4_SPECIALS + AUDIO_SPECIALS)


def sweep(seconds: float = 30.0, f0: float = 100.0, f1: float = 4000.0, rate: int = SAMPLE_RATE,
          silence: float = 0.0, lead: float = 0.0) -> np.ndarray:
    """A logarithmic sine sweep from ``f0`` to ``f1`` Hz between ``lead`` seconds of silence and ``silence`` seconds
    of it (both inside ``seconds``), as 16-bit PCM samples."""
    t = np.arange(int(round(seconds * rate))) / rate - lead
    span = seconds - silence - lead
    k = math.log(f1 / f0) / span
    signal = np.where((t >= 0) & (t < span), 0.5 * np.sin(2 * math.pi * f0 * (np.exp(k * t) - 1) / k), 0.0)
    return np.round(signal * 32767).astype("<i2")


def sweep_wav(seconds: float = 30.0, f0: float = 100.0, f1: float = 4000.0, rate: int = SAMPLE_RATE,
              silence: float = 0.0) -> bytes:
    """:func:`sweep` as a mono 16-bit WAV."""
    return pcm_wav(sweep(seconds, f0, f1, rate, silence), rate)


def pcm_wav(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def wav_samples(data: bytes) -> np.ndarray:
    with wave.open(io.BytesIO(data)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def _randomize(module, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("norm.weight") or "layer_norm.weight" in name:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


@dataclass
class RemoteGlmAsr:
    """The modules of a remote-layout checkpoint (what GlmasrModel holds)."""

    whisper: Any
    layer_norm: Any
    adapting: Any
    boa_eoa: Any
    lm: Any
    merge_factor: int


def tiny_remote(vocab_size: int, seed: int = 0, d_model: int = 64, hidden: int = 64,
                merge_factor: int = 4) -> RemoteGlmAsr:
    import torch
    from torch import nn
    from transformers import LlamaConfig, LlamaForCausalLM, WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    wc = WhisperConfig(d_model=d_model, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=2 * d_model,
                       num_mel_bins=128, max_source_positions=1500, activation_function="gelu")
    wc._attn_implementation = "eager"
    torch.manual_seed(seed)
    whisper = WhisperEncoder(wc)
    whisper.layer_norm = nn.Identity()
    lc = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                     rms_norm_eps=1e-5, tie_word_embeddings=False)
    lc._attn_implementation = "eager"
    lm = LlamaForCausalLM(lc)
    parts = RemoteGlmAsr(whisper, nn.LayerNorm(d_model),
                         nn.Sequential(nn.Linear(d_model * merge_factor, 2 * hidden), nn.GELU(),
                                       nn.Linear(2 * hidden, hidden)),
                         nn.Embedding(2, hidden), lm, merge_factor)
    for i, m in enumerate((whisper, parts.layer_norm, parts.adapting, parts.boa_eoa, lm)):
        _randomize(m, seed * 10 + i)
    for m in (whisper, parts.layer_norm, parts.adapting, parts.boa_eoa, lm):
        m.eval()
    return parts


def remote_state(m: RemoteGlmAsr) -> dict[str, "torch.Tensor"]:
    state = {f"audio_encoder.whisper.{k}": v for k, v in m.whisper.state_dict().items()}
    state.update({f"audio_encoder.layer_norm.{k}": v for k, v in m.layer_norm.state_dict().items()})
    state.update({f"audio_encoder.adapting.{k}": v for k, v in m.adapting.state_dict().items()})
    state["audio_encoder.audio_bos_eos_token.weight"] = m.boa_eoa.weight
    state.update(m.lm.state_dict())
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


def remote_config(m: RemoteGlmAsr, **extra: Any) -> dict[str, Any]:
    wc = m.whisper.config.to_dict()
    lc = m.lm.config.to_dict()
    for cfg in (wc, lc):
        for key in ("dtype", "transformers_version"):
            cfg.pop(key, None)
    cfg = {"architectures": ["GlmasrModel"], "model_type": "glmasr", "lm_config": lc, "whisper_config": wc,
           "adapter_type": "mlp", "merge_factor": m.merge_factor, "spec_aug": False, "use_rope": False,
           "max_whisper_length": 1500, "max_length": 1024, "mlp_adapter_act": "gelu", "torch_dtype": "float32"}
    cfg.update(extra)
    return cfg


def _write(out: Path, state: dict, cfg: dict, tok, template: str = TEMPLATE) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    tok_cfg = tokenizer_config(tok, template, tokenizer_class="PreTrainedTokenizerFast")
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    return out


def save_remote_checkpoint(m: RemoteGlmAsr, out_dir: str | Path, tok, **config: Any) -> Path:
    return _write(Path(out_dir), remote_state(m), remote_config(m, **config), tok)


def whisper_features(samples: np.ndarray, n_mel: int = 128) -> np.ndarray:
    """Whisper's log-mel features of a clip (padded to 30 s), as GLM-ASR's processor computes them: (n_mel, 3000)."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mel, sampling_rate=SAMPLE_RATE)
    return fe(samples, sampling_rate=SAMPLE_RATE, return_tensors="np")["input_features"][0]


def remote_audio_embeddings(m: RemoteGlmAsr, features: np.ndarray) -> np.ndarray:
    """GlmasrModel's audio path in f32: encoder, adapter, begin/end-of-audio around it: (tokens + 2, hidden)."""
    import torch

    with torch.no_grad():
        x = torch.from_numpy(np.asarray(features, dtype=np.float32))[None]
        enc = m.whisper(x).last_hidden_state
        enc = m.layer_norm(enc)
        enc = enc.reshape(1, -1, enc.shape[-1] * m.merge_factor)
        out = m.adapting(enc)[0]
        w = m.boa_eoa.weight
        return torch.cat([w[:1], out, w[1:]], 0).numpy()


def lm_logits(m: RemoteGlmAsr, embeds: np.ndarray) -> np.ndarray:
    """The language model's logits for a sequence of input embeddings (f32): (n, vocab)."""
    import torch

    with torch.no_grad():
        return m.lm(inputs_embeds=torch.from_numpy(np.asarray(embeds, dtype=np.float32))[None]).logits[0].numpy()


def save_hf_checkpoint(out_dir: str | Path, tok, seed: int = 0) -> Path:
    """transformers' own ``GlmAsrForConditionalGeneration``, tiny and random."""
    import torch
    from transformers import GlmAsrConfig, GlmAsrForConditionalGeneration

    cfg = GlmAsrConfig(
        # intermediate_size is also the width of 4 stacked frames (the adapter's input), as in the real 1280 / 5120
        audio_config={"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "num_mel_bins": 128},
        text_config={"vocab_size": tok.get_vocab_size(), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "eos_token_id": [0]},
        audio_token_id=tok.token_to_id("<|pad|>"))
    torch.manual_seed(seed)
    model = GlmAsrForConditionalGeneration(cfg).eval()
    for i, part in enumerate((model.model.audio_tower, model.model.multi_modal_projector, model.model.language_model)):
        _randomize(part, seed * 10 + i)  # transformers' init leaves biases 0 and norms 1: nothing would test them
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    config = cfg.to_dict()
    config.pop("transformers_version", None)
    config.pop("dtype", None)
    config["architectures"] = ["GlmAsrForConditionalGeneration"]
    return _write(Path(out_dir), state, config, tok, HF_TEMPLATE)


def hf_processor(ckpt: str | Path):
    """transformers' ``GlmAsrProcessor`` for a checkpoint of :func:`save_hf_checkpoint` (its feature extractor:
    Whisper's, 128 mel bins, as the published processor)."""
    from transformers import AutoTokenizer, GlmAsrProcessor, WhisperFeatureExtractor

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    return GlmAsrProcessor(WhisperFeatureExtractor(feature_size=128), tok, chat_template=HF_TEMPLATE)


def rope_encoder_of(m: RemoteGlmAsr):
    """transformers' ``GlmAsrEncoder`` holding the remote layout's encoder weights (its rotary settings left at
    transformers' defaults, which a remote ``use_rope: true`` config does not name) and the adapter's LayerNorm as
    its final norm: the reference for a remote checkpoint with ``use_rope: true``."""
    import torch
    from transformers.models.glmasr.configuration_glmasr import GlmAsrEncoderConfig
    from transformers.models.glmasr.modeling_glmasr import GlmAsrEncoder

    wc = m.whisper.config
    cfg = GlmAsrEncoderConfig(hidden_size=wc.d_model, intermediate_size=wc.encoder_ffn_dim,
                              num_hidden_layers=wc.encoder_layers, num_attention_heads=wc.encoder_attention_heads,
                              num_mel_bins=wc.num_mel_bins)
    cfg._attn_implementation = "eager"
    enc = GlmAsrEncoder(cfg).eval()
    names = {"input_layernorm": "self_attn_layer_norm", "post_attention_layernorm": "final_layer_norm",
             "self_attn.o_proj": "self_attn.out_proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2"}
    src = m.whisper.state_dict()
    state = {}
    for key in enc.state_dict():
        if key.startswith("norm."):
            state[key] = m.layer_norm.state_dict()[key[5:]]
            continue
        theirs = key
        for ours, name in names.items():
            theirs = theirs.replace(f".{ours}.", f".{name}.")
        state[key] = src[theirs]
    with torch.no_grad():
        enc.load_state_dict(state)
    return enc


def remote_rope_embeddings(m: RemoteGlmAsr, features: np.ndarray, n_tokens: int) -> np.ndarray:
    """The rotary remote layout's audio path in f32 for one window: encoder, adapter on ``merge_factor`` stacked
    frames, the first ``n_tokens`` kept, begin/end-of-audio around them: (n_tokens + 2, hidden)."""
    import torch

    enc = rope_encoder_of(m)
    with torch.no_grad():
        h = enc(torch.from_numpy(np.asarray(features, dtype=np.float32))[None]).last_hidden_state
        out = m.adapting(h.reshape(1, -1, h.shape[-1] * m.merge_factor))[0, :n_tokens]
        w = m.boa_eoa.weight
        return torch.cat([w[:1], out, w[1:]], 0).numpy()


def build(out_dir: str | Path, layout: str = "remote", seed: int = 0, tok: Optional[Any] = None) -> Path:
    tok = tok or tokenizer()
    if layout == "hf":
        return save_hf_checkpoint(out_dir, tok, seed)
    return save_remote_checkpoint(tiny_remote(tok.get_vocab_size(), seed), out_dir, tok)

"""The audio front end of GLM-ASR's rotary encoders, in numpy: WAV bytes -> 16 kHz mono samples -> Whisper log-mel
windows, as transformers' ``GlmAsrProcessor`` computes them (its ``WhisperFeatureExtractor``: 30 s windows padded with
zeros, a periodic Hann STFT of 400 samples every 160, centred with reflection, power spectrum, the last frame
dropped, Slaney mel filters 0..8 kHz, log10 floored at 1e-10, clamped to 8 below the window's maximum, (x + 4) / 4).

WAV is decoded with the stdlib ``wave`` module: 16-bit PCM (and 32-bit float, read from its fmt chunk), mono or
downmixed by averaging; any rate but 16 kHz is refused in one line (no resampler here).
"""

from __future__ import annotations

import io
import struct
import wave
from dataclasses import dataclass

import numpy as np

from chatglm.errors import InputError

SAMPLE_RATE = 16000
N_FFT, HOP = 400, 160
WINDOW_SECONDS = 30
WINDOW_SAMPLES = SAMPLE_RATE * WINDOW_SECONDS  # 480000
WINDOW_FRAMES = WINDOW_SAMPLES // HOP  # 3000
WAVE_FORMAT_PCM, WAVE_FORMAT_FLOAT, WAVE_FORMAT_EXTENSIBLE = 1, 3, 0xFFFE


def _fmt_tag(data: bytes) -> int:
    """The format tag of the WAV's fmt chunk (0 when there is none to read)."""
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"fmt " and size >= 2 and pos + 10 <= len(data):
            tag = struct.unpack_from("<H", data, pos + 8)[0]
            if tag == WAVE_FORMAT_EXTENSIBLE and size >= 26 and pos + 34 <= len(data):
                tag = struct.unpack_from("<H", data, pos + 32)[0]  # the sub-format GUID's first two bytes
            return tag
        pos += 8 + size + (size & 1)
    return 0


def _decode_float(data: bytes, name: str) -> tuple[np.ndarray, int, int]:
    """32-bit float WAV (the ``wave`` module reads PCM only): (samples, rate, channels)."""
    pos, fmt, body = 12, None, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        if cid == b"fmt " and size >= 16:
            fmt = struct.unpack_from("<HHIIHH", data, pos + 8)
        elif cid == b"data":
            body = data[pos + 8:pos + 8 + size]
            if len(body) < size:
                raise InputError("is a truncated WAV (its data chunk runs past the end of the file)", name)
        pos += 8 + size + (size & 1)
    if fmt is None or body is None:
        raise InputError("is not a WAV file this front end reads (no fmt or data chunk)", name)
    _, channels, rate, _, _, bits = fmt
    if bits != 32 or channels < 1 or len(body) % (4 * channels):
        raise InputError(f"is a float WAV of {bits} bits and {channels} channels: only 32-bit float is read", name)
    return np.frombuffer(body, dtype="<f4").astype(np.float32), rate, channels


def decode_wav(data: bytes, name: str) -> np.ndarray:
    """Mono float32 samples at 16 kHz of a WAV file's bytes; one InputError for anything else."""
    if not data:
        raise InputError("is empty (0 bytes), not audio", name)
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise InputError("is not a WAV file (the GLM-ASR front end reads WAV only)", name)
    tag = _fmt_tag(data)
    if tag == WAVE_FORMAT_FLOAT:
        samples, rate, channels = _decode_float(data, name)
    else:
        try:
            with wave.open(io.BytesIO(data)) as w:
                channels, width, rate, n = w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()
                raw = w.readframes(n)
        except (wave.Error, EOFError, struct.error) as exc:
            raise InputError(f"is not a WAV file this front end reads ({exc})", name) from None
        if width != 2:
            raise InputError(f"is {8 * width}-bit PCM: only 16-bit PCM and 32-bit float WAV are read", name)
        if len(raw) < n * channels * 2:
            raise InputError(f"is a truncated WAV ({len(raw) // (2 * channels)} of {n} frames)", name)
        samples = np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0
    if rate != SAMPLE_RATE:
        raise InputError(f"is sampled at {rate} Hz: GLM-ASR takes {SAMPLE_RATE} Hz (resample it first)", name)
    if not samples.size:
        raise InputError("holds no samples", name)
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples


def _hz_to_mel(f: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear (3 per 200 Hz) below 1 kHz, logarithmic (27 per factor 6.4) above."""
    f = np.asarray(f, dtype=np.float64)
    return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * 27.0 / np.log(6.4))


def _mel_to_hz(m: np.ndarray) -> np.ndarray:
    return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))


def mel_filters(n_mel: int, rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """(n_fft / 2 + 1, n_mel) triangular filters, area-normalised (Slaney), 0 Hz .. rate / 2."""
    bins = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate / 2), n_mel + 2))
    rise = (bins[:, None] - edges[None, :-2]) / np.diff(edges)[None, :-1]
    fall = (edges[None, 2:] - bins[:, None]) / np.diff(edges)[None, 1:]
    tri = np.maximum(0.0, np.minimum(rise, fall))
    return tri * (2.0 / (edges[2:] - edges[:-2]))[None, :]


@dataclass(frozen=True)
class Window:
    features: np.ndarray  # (n_mel, 3000) float32
    frames: int  # mel frames holding audio (the processor's input_features_mask sum)


def log_mel(chunk: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Whisper's log-mel of one window of at most 30 s: (n_mel, 3000) float32."""
    x = np.zeros(WINDOW_SAMPLES, dtype=np.float64)
    x[:len(chunk)] = chunk
    x = np.pad(x, N_FFT // 2, mode="reflect")
    hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic
    frames = np.lib.stride_tricks.sliding_window_view(x, N_FFT)[::HOP][:WINDOW_FRAMES]  # the last frame dropped
    power = np.abs(np.fft.rfft(frames * hann, axis=1)) ** 2  # (3000, 201)
    spec = np.log10(np.maximum(power @ filters, 1e-10))
    spec = np.maximum(spec, spec.max() - 8.0)
    return ((spec + 4.0) / 4.0).T.astype(np.float32)


def window_frames(n_samples: int, max_windows: int) -> list[int]:
    """The mel frames holding audio in each 30 s window of a clip of ``n_samples`` (the processor's split: the last
    window shorter, padded); more than ``max_windows`` windows is refused."""
    n = max(1, -(-n_samples // WINDOW_SAMPLES))
    if n > max_windows:
        raise InputError(f"audio of {n_samples / SAMPLE_RATE:.0f} s is longer than the "
                         f"{max_windows * WINDOW_SECONDS} s this model takes")
    return [-(-min(WINDOW_SAMPLES, n_samples - i * WINDOW_SAMPLES) // HOP) for i in range(n)]


def windows(samples: np.ndarray, n_mel: int, max_windows: int) -> list[Window]:
    """The log-mel windows of a clip, as :func:`window_frames` splits it."""
    filters = mel_filters(n_mel)
    frames = window_frames(len(samples), max_windows)
    return [Window(log_mel(samples[i * WINDOW_SAMPLES:(i + 1) * WINDOW_SAMPLES], filters), f)
            for i, f in enumerate(frames)]


def n_tokens(frames: int, stack: int) -> int:
    """Embeddings a window with ``frames`` mel frames of audio gives (the processor's count: two convs, stride 1
    then 2, then ``stack`` frames per embedding)."""
    steps = (frames - 1) // 2 + 1
    return max(0, (steps - stack) // stack + 1)

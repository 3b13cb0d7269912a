"""Token sampling over float32 logits: repeat penalty, temperature, top-k, top-p, seeded.

Vectorised numpy on a candidate subset: the common case (a peaked distribution) never sorts the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional, Sequence

import numpy as np

from chatglm.errors import InputError
from chatglm.limits import MAX_CONTEXT, MAX_SEED

CANDIDATES = (256, 4096, 32768)  # sorted candidate widths tried, in turn, before sorting the whole vocabulary
MAX_TEMPERATURE = 100.0  # past this every token is about equally likely
MAX_REPEAT_PENALTY = 100.0
MAX_TOP_K = (1 << 31) - 1  # llama_sampler_init_top_k takes an int32


@dataclass(frozen=True)
class Knob:
    """What the command line, the chat's ``/set`` and the server know of one sampling parameter."""

    kind: type  # int or float
    help: str
    flags: tuple[str, ...]  # ``chatglm run`` option names
    lo: float  # the command line's range (the library itself checks only what __post_init__ checks)
    hi: float


def knob(default: Any, kind: type, help: str, flags: tuple[str, ...], lo: float, hi: float) -> Any:
    return field(default=default, metadata={"knob": Knob(kind, help, flags, lo, hi)})


@dataclass(frozen=True)
class SamplingParams:
    """The sampling parameters: THE list of them. The CLI's options (``chatglm run``), the chat's ``/set``, the
    Python API's keywords and the server's request fields are all these names (see :func:`knobs`)."""

    temperature: float = knob(0.8, float, "Sampling temperature (0: greedy).", ("--temp", "--temperature"), 0,
                              MAX_TEMPERATURE)
    top_p: float = knob(0.8, float, "Nucleus sampling: keep this much probability mass.", ("--top-p",), 0, 1)
    top_k: int = knob(0, int, "Keep the k likeliest tokens (0: all).", ("--top-k",), 0, MAX_TOP_K)  # 0 = off
    repeat_penalty: float = knob(1.0, float, "Penalty of repeated tokens (1: none).", ("--repeat-penalty",), 0,
                                 MAX_REPEAT_PENALTY)
    repeat_last_n: int = knob(64, int, "How many of the last tokens the repeat penalty looks at.",
                              ("--repeat-last-n",), 0, MAX_CONTEXT)
    seed: Optional[int] = knob(None, int, "Random seed.", ("--seed",), 0, MAX_SEED)
    max_tokens: Optional[int] = knob(None, int, "Most tokens in a reply.", ("-n", "--max-tokens"), 0,
                                     MAX_CONTEXT)  # None = until the context is full

    def __post_init__(self) -> None:
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
            (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
            (self.max_tokens is None or self.max_tokens >= 0, "max_tokens must be >= 0"),
        ]
        for ok, problem in checks:
            if not ok:
                raise InputError(problem)

    def updated(self, **changes) -> "SamplingParams":
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise InputError(f"unknown sampling option(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return replace(self, **{k: v for k, v in changes.items() if v is not None or k in NULLABLE})

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 or self.top_k == 1


def knobs() -> dict[str, Knob]:
    """Every sampling parameter by name, in declaration order."""
    return {f.name: f.metadata["knob"] for f in fields(SamplingParams)}


NULLABLE = tuple(f.name for f in fields(SamplingParams) if f.default is None)  # "none" clears them


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, history: Sequence[int] = ()) -> int:
        p = self.params
        if p.repeat_penalty != 1.0 and p.repeat_last_n and len(history):
            logits = penalize(logits, history[-p.repeat_last_n:], p.repeat_penalty)
        if p.greedy:
            return int(np.argmax(logits))
        return self._sample(logits)

    def _sample(self, logits: np.ndarray) -> int:
        p = self.params
        n = logits.shape[0]
        probs = _softmax(logits, p.temperature)
        if 0 < p.top_k < n:  # top-k first, then top-p over the renormalised k (llama.cpp's order)
            ids = _top(logits, p.top_k)
        else:  # widen the sorted candidates until they hold the nucleus (a peaked distribution stops at once)
            for width in (*(w for w in CANDIDATES if w < n), n):
                ids = _top(logits, width)
                if probs[ids].sum() >= p.top_p:
                    break
        cand = probs[ids] / probs[ids].sum() if 0 < p.top_k < n else probs[ids]
        cut = int(np.searchsorted(np.cumsum(cand), p.top_p)) + 1
        ids, cand = ids[:cut], cand[:cut]
        return int(ids[self.rng.choice(len(ids), p=cand / cand.sum())])


def _top(logits: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest logits, largest first."""
    n = logits.shape[0]
    ids = np.argpartition(logits, n - k)[n - k:] if k < n else np.arange(n)
    return ids[np.argsort(logits[ids])[::-1]]


def _softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities at ``temperature``: float32 exponentials (SIMD-fast), normalised with a float64 sum."""
    e = np.exp((logits - np.max(logits)) * np.float32(1.0 / temperature), dtype=np.float32)
    return e / np.float32(e.sum(dtype=np.float64))


def penalize(logits: np.ndarray, recent: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp's repeat penalty: divide positive logits of recent tokens by it, multiply negative ones."""
    out = np.array(logits, dtype=np.float32, copy=True)
    ids = np.unique(np.asarray(recent, dtype=np.int64))
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out

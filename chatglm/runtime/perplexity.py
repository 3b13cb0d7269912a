"""Strided sliding-window perplexity of a text, as chatglm.cpp's perplexity tool and Hugging Face's guide compute it.

The text's tokens are covered by windows of ``window`` tokens that start every ``stride`` tokens. Each window is
evaluated from an empty cache; only its tokens that no earlier window scored are scored, each predicted from the
tokens before it in the same window (so every scored token sees at least ``window - stride`` tokens of context once
the first window is past). A window starting where the previous one ended (stride = window) cannot score its first
token: it has no context there. Perplexity = exp(total negative log-likelihood / tokens scored).

Logits come from ``Engine.all_logits``: the numbers are the engine's own (llama.cpp's for GLM2/3/4); the
log-softmax runs here in float64.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from chatglm.fsutil import read_text as read_text_file
from chatglm import families
from chatglm.errors import Cancelled, InputError, ModelRuntimeError
from chatglm.runtime.engine import Engine, ModelInfo

log = logging.getLogger(__name__)

WindowProgress = Callable[[int, int, float], None]  # (windows done, windows total, running perplexity)

# GGUF architecture -> special tokens put before the text of every window so the model runs in its causal
# (generation) mode (a family descriptor's causal_prefix; ChatGLM-6B attends bidirectionally to everything before
# <sop>: scoring text there would let each token see its successors). Architectures without one are left out.
CAUSAL_PREFIX: dict[str, tuple[str, ...]] = {
    arch: prefix for arch in families.archs() if (prefix := families.arch_value(arch, "causal_prefix"))}

_ROWS_PER_CHUNK = 64  # log-softmax rows converted to float64 at a time (64 x 151552 x 8 B = 78 MB at most)


def causal_prefix(info: ModelInfo) -> list[int]:
    """Token ids to put before scored (or generated) text for this model's architecture; [] for most."""
    texts = CAUSAL_PREFIX.get(info.arch, ())
    missing = [t for t in texts if t not in info.special]
    if missing:
        raise ModelRuntimeError(f"the vocabulary lacks the special tokens {', '.join(missing)}", info.path)
    return [info.special[t] for t in texts]


@dataclass(frozen=True)
class Window:
    begin: int  # first text token fed to the model
    end: int  # one past the last
    n_scored: int  # the last n_scored tokens of the window are scored


def plan_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """The windows covering ``n_tokens`` tokens; every token but the first is scored at most once."""
    check_window(window, stride)
    plans: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        n_scored = min(end - prev_end, end - begin - 1)
        if n_scored > 0:
            plans.append(Window(begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return plans


def check_window(window: int, stride: int) -> None:
    if window < 2:
        raise InputError(f"the window must hold at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise InputError(f"the stride must be between 1 and the window ({window}), got {stride}")


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for every row, in float64. ``logits``: (rows, n_vocab)."""
    targets = np.asarray(targets, dtype=np.int64)
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(f"logits {logits.shape} do not match {targets.shape[0]} targets")
    out = np.empty(len(targets), dtype=np.float64)
    for start in range(0, len(targets), _ROWS_PER_CHUNK):
        rows = logits[start:start + _ROWS_PER_CHUNK].astype(np.float64)  # (chunk, n_vocab)
        peak = rows.max(axis=1)
        lse = peak + np.log(np.exp(rows - peak[:, None]).sum(axis=1))
        picked = rows[np.arange(len(rows)), targets[start:start + len(rows)]]
        out[start:start + len(rows)] = lse - picked
    return out


@dataclass
class PerplexityResult:
    window: int
    stride: int
    n_tokens: int  # tokens in the text
    nll_sums: list[float] = field(default_factory=list)  # per window
    scored: list[int] = field(default_factory=list)  # per window
    seconds: float = 0.0

    @property
    def n_scored(self) -> int:
        return sum(self.scored)

    @property
    def mean_nll(self) -> float:
        return math.fsum(self.nll_sums) / self.n_scored if self.n_scored else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean_nll)

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "mean_nll": self.mean_nll, "n_tokens": self.n_tokens,
                "n_scored": self.n_scored, "n_windows": len(self.scored), "window": self.window,
                "stride": self.stride, "seconds": self.seconds,
                "window_perplexities": [math.exp(s / n) for s, n in zip(self.nll_sums, self.scored, strict=True)]}


def score_window(engine: Engine, tokens: Sequence[int], win: Window, prefix: Sequence[int]) -> float:
    """Summed negative log-likelihood of the window's scored tokens."""
    ids = list(prefix) + list(tokens[win.begin:win.end])
    logits = engine.all_logits(ids)  # (len(ids), n_vocab)
    last = len(ids) - 1  # the row of the last token predicts nothing inside the window
    rows = logits[last - win.n_scored:last]  # row i predicts token i + 1
    return float(token_nll(rows, ids[last - win.n_scored + 1:]).sum())


def perplexity(engine: Engine, tokens: Sequence[int], *, window: int, stride: int,
               progress: Optional[WindowProgress] = None, cancel: Optional[threading.Event] = None,
               source: Optional[Path] = None) -> PerplexityResult:
    """Perplexity of ``tokens`` (no special tokens; the model's causal prefix is added to every window)."""
    prefix = causal_prefix(engine.info)
    check_window(window, stride)
    if len(tokens) < window:
        raise InputError(f"the text is {len(tokens)} tokens long, shorter than one window of {window} tokens "
                         "(use a longer text or a smaller --window)", source)
    if window + len(prefix) > engine.info.n_ctx:
        raise InputError(f"a window of {window} tokens (+{len(prefix)} prefix) does not fit the context of "
                         f"{engine.info.n_ctx} tokens")
    plans = plan_windows(len(tokens), window, stride)
    result = PerplexityResult(window, stride, len(tokens))
    start = time.perf_counter()
    with engine.lock:
        try:
            for i, win in enumerate(plans):
                if cancel is not None and cancel.is_set():
                    raise Cancelled("cancelled")
                result.nll_sums.append(score_window(engine, tokens, win, prefix))
                result.scored.append(win.n_scored)
                log.info("window [%d, %d): %d scored, perplexity %.4f", win.begin, win.end, win.n_scored,
                         math.exp(result.nll_sums[-1] / win.n_scored))
                if progress:
                    progress(i + 1, len(plans), result.perplexity)
        finally:
            engine.reset()
    result.seconds = time.perf_counter() - start
    return result


def read_text(path: Path) -> str:
    """The text of a UTF-8 file; InputError when it is missing, unreadable, not UTF-8 or empty."""
    text = read_text_file(path)
    if not text.strip():
        raise InputError("the file is empty: there is no text to score", path)
    return text


def perplexity_of_file(engine: Engine, path: Path, *, window: int, stride: int,
                       progress: Optional[WindowProgress] = None) -> PerplexityResult:
    """Tokenize a UTF-8 text file (as plain text, no special tokens) and compute its perplexity."""
    check_window(window, stride)
    tokens = engine.tokenize(read_text(path))
    return perplexity(engine, tokens, window=window, stride=stride, progress=progress, source=path)

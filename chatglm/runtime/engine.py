"""The engine interface every backend implements (llama.cpp for GLM2/3/4, our ggml graph for GLM-1).

An engine owns one loaded model and one KV cache. Callers say which tokens the cache must hold (``prefill``) and
append one token at a time (``step``); the engine decides how much of the cache it can keep.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from chatglm.errors import ContextOverflowError, ModelRuntimeError
from chatglm.runtime.sampling import Sampler, SamplingParams

ProgressFn = Callable[[int, int], None]  # (tokens done, tokens total)


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    arch: str  # GGUF architecture (chatglm, glm4, chatglm1, ...)
    family: str  # chatglm2, chatglm3, glm4, ...
    chat_format: str
    n_ctx: int  # the context this engine was created with
    n_ctx_train: int
    n_vocab: int
    n_params: int
    size_bytes: int
    description: str
    special: dict[str, int] = field(default_factory=dict)  # token text -> id, for the family's special tokens
    eog: frozenset[int] = frozenset()  # end-of-generation ids
    chat_template: str = ""  # the GGUF's tokenizer.chat_template (the sandboxed Jinja path renders it)
    added: dict[str, int] = field(default_factory=dict)  # every control and user-defined token (text -> id)
    pre_seq_len: int = 0  # a P-Tuning v2 prefix's entries in front of every layer's cache (runtime/ptuning.py)


class TokenSampler(Protocol):
    def __call__(self) -> int: ...

    def close(self) -> None: ...


class NumpySampler:
    """Samples from the engine's last logits with :class:`Sampler` (any engine that exposes its logits)."""

    def __init__(self, engine: "Engine", params: SamplingParams):
        self.engine, self.sample = engine, Sampler(params)

    def __call__(self) -> int:
        return self.sample(self.engine.logits(), self.engine.tokens)

    def close(self) -> None:
        pass


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Engine(ABC):
    """One model, one sequence, one KV cache. Not thread-safe by itself: callers hold ``lock``."""

    info: ModelInfo

    def __init__(self) -> None:
        self.tokens: list[int] = []  # what the KV cache holds, in order
        self.lock = threading.Lock()
        self.n_evaluated = 0  # tokens evaluated since load (for KV-reuse accounting and stats)
        # cache entries beyond one per position: a medium's embeddings take more entries than positions (M-RoPE)
        self.extra_cells = 0

    # -- tokenizer --------------------------------------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` alone: no BOS, no special-token parsing, as the reference ``sp.encode`` gives."""

    @abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The bytes a token stands for when it is part of running text (special tokens give b"")."""

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    # -- evaluation -------------------------------------------------------------------------------------------
    def reusable(self, tokens: Sequence[int]) -> int:
        """How many cached tokens can stay for this new sequence (a prefix of both)."""
        return common_prefix(self.tokens, tokens)

    def prefill(self, tokens: Sequence[int], *, cancel: Optional[threading.Event] = None,
                progress: Optional[ProgressFn] = None) -> int:
        """Make the cache hold exactly ``tokens`` with the last one's logits ready; returns tokens evaluated."""
        tokens = list(tokens)
        if not tokens:
            raise ModelRuntimeError("empty prompt: nothing to evaluate")
        if len(tokens) > self.info.n_ctx:
            raise ContextOverflowError(
                f"prompt of {len(tokens)} tokens does not fit the context of {self.info.n_ctx} tokens")
        keep = min(self.reusable(tokens), len(tokens) - 1)
        self.extra_cells = 0  # the kept prefix ends before any medium
        if self._truncate(keep) is False:  # a recurrent state cannot drop its last tokens: evaluate all again
            self._truncate(0)
            keep = 0
        self.tokens = tokens[:keep]
        todo = tokens[keep:]
        self._eval(todo, cancel=cancel, progress=progress)
        return len(todo)

    def step(self, token: int) -> None:
        """Append one token (a sampled one) and compute its logits."""
        if len(self.tokens) + self.extra_cells >= self.info.n_ctx:
            raise ContextOverflowError(f"the context of {self.info.n_ctx} tokens is full")
        self._eval([token])

    def reset(self) -> None:
        self._truncate(0)
        self.tokens = []
        self.extra_cells = 0

    @abstractmethod
    def _truncate(self, n_keep: int) -> Optional[bool]:
        """Drop cached tokens from position ``n_keep`` on; False when the cache cannot (a recurrent state keeps no
        earlier positions: only dropping everything works), and then nothing was dropped."""

    @abstractmethod
    def _eval(self, tokens: Sequence[int], *, cancel: Optional[threading.Event] = None,
              progress: Optional[ProgressFn] = None) -> None:
        """Evaluate ``tokens`` after the cached ones, append them to ``self.tokens``, leave the last logits ready."""

    @abstractmethod
    def logits(self) -> np.ndarray:
        """float32 logits (n_vocab,) of the last evaluated token; valid until the next evaluation."""

    # -- speculative decoding (runtime/speculative.py) ------------------------------------------------------------
    can_speculate = False  # whether eval_all and drop_after work

    @property
    def rollback_window(self) -> Optional[int]:
        """How many of the last tokens the cache can drop after an evaluation (None: any number)."""
        return None

    def eval_all(self, tokens: Sequence[int]) -> None:
        """Evaluate ``tokens`` in one batch with logits at every position (for drafts to be verified)."""
        raise NotImplementedError

    def drop_after(self, n_keep: int) -> None:
        """Drop the cached tokens from ``n_keep`` on (rejected drafts)."""
        if self._truncate(n_keep) is False:
            raise ModelRuntimeError(f"the cache cannot drop its tokens after {n_keep}")
        del self.tokens[n_keep:]

    def all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position of ``tokens`` evaluated from an empty cache: (len(tokens), n_vocab)."""
        raise NotImplementedError

    def apply_lora(self, adapters: Sequence[tuple[Path, float]]) -> None:
        """Run with LoRA adapter GGUFs (``chatglm lora`` writes them) at the given scales."""
        if adapters:
            from chatglm.errors import UnsupportedModelError

            raise UnsupportedModelError(f"LoRA adapters at run time need the llama.cpp engine; {self.info.arch} "
                                        "models take them merged at conversion (chatglm convert --lora)")

    def sampler(self, params: SamplingParams) -> "TokenSampler":
        """A sampler for one generation: called with no arguments after each evaluation, returns the next token."""
        return NumpySampler(self, params)

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Speculative decoding: draft a few tokens cheaply, let the model check them all in one evaluation.

A drafter guesses the tokens after the context: :class:`LookupDrafter` copies what followed the last n-gram the
last time it occurred in the prompt or the reply (prompt lookup), :class:`ModelDrafter` runs a small GLM GGUF with the
same vocabulary greedily. The engine then evaluates the pending token and the drafts in ONE ``llama_decode`` batch
with logits at every position, and the generation's own sampler samples position after position: while its token
equals the draft the draft is accepted, and the first token that differs is the sampler's next token. The cache cells
of the rejected drafts are dropped (``llama_memory_seq_rm``), so ``Engine.tokens`` stays what the cache holds.

Every token is still drawn by the same sampler chain from the same logits as without speculation, one draw per
token in the same order, so greedy output is identical, and sampled output follows the same distribution: for a
deterministic draft (both drafters here are), "sample, accept while equal" is the standard acceptance rule (accept
with probability p(draft), else draw from p without the draft). With a seed the same tokens come out as without
speculation, up to float rounding differences between batched and one-token evaluation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Protocol, Sequence

from chatglm.errors import InputError, UnsupportedModelError
from chatglm.runtime.speculative_adapt import AdaptiveDrafter

if TYPE_CHECKING:  # pragma: no cover
    from chatglm.gguf_file import GGUFHeader
    from chatglm.runtime.engine import Engine
    from chatglm.runtime.generation import GenerationStats

log = logging.getLogger(__name__)

MAX_DRAFT = 64  # drafted tokens per verification at most (one batch, logits for each)
DEFAULT_DRAFT = 8
NGRAM_MAX = 4  # the longest n-gram prompt lookup matches
NGRAM_MIN = 2  # the shortest (a single token matches too often to be worth a draft)
# the vocabulary keys a draft model must share with the model it drafts for
VOCAB_IDS = ("bos", "eos", "eot", "eom", "pad", "unknown", "sep", "mask")


@dataclass(frozen=True)
class SpeculativeConfig:
    """What drafts for a model: prompt lookup of up to ``lookup`` tokens, the model's own MTP layer (``mtp``, one
    token), a draft model (``draft``, up to ``draft_max`` tokens); several: each in that order until one drafts."""

    lookup: int = 0
    draft: Optional[Path] = None
    draft_max: int = DEFAULT_DRAFT
    mtp: bool = False
    adaptive: bool = True  # draft only as many tokens as pay (runtime/speculative_adapt.py); False: always the most

    def __post_init__(self) -> None:
        for name, value in (("lookup", self.lookup), ("draft_max", self.draft_max)):
            if type(value) is not int or not 0 <= value <= MAX_DRAFT:
                raise InputError(f"{name} must be an integer between 0 and {MAX_DRAFT}, got {value!r}")
        if self.draft is not None and self.draft_max < 1:
            raise InputError("draft_max must be at least 1 with a draft model")

    def options(self) -> dict:
        """The keywords of ``load`` that ask for this."""
        return {"lookup": self.lookup, "draft": self.draft, "draft_max": self.draft_max, "mtp": self.mtp,
                "adaptive": self.adaptive}

    @property
    def enabled(self) -> bool:
        return self.lookup > 0 or self.draft is not None or self.mtp

    @property
    def n_max(self) -> int:
        """The most tokens drafted for one verification (what a recurrent state must be able to roll back)."""
        return max(self.lookup, self.draft_max if self.draft is not None else 0, int(self.mtp))


class Drafter(Protocol):
    name: str
    cheap: bool  # whether a guess costs next to nothing (it can be made first and judged after)
    kind: int  # after draft(): which kind of guess it made (lookup: the n-gram's length), tracked apart

    def draft(self, history: Sequence[int], n: int) -> list[int]:
        """Up to ``n`` guesses of the tokens after ``history`` (the cache's tokens and the pending one)."""

    def close(self) -> None: ...


class LookupDrafter:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the context's last n-gram
    (the longest of NGRAM_MAX..NGRAM_MIN tokens that occurred before). The n-gram index grows with the history and
    is rebuilt only when the history changes before its end (a new conversation)."""

    name = "lookup"
    cheap = True

    def __init__(self) -> None:
        self.kind = 0  # the length of the last draft's n-gram
        self._seen: list[int] = []  # the history the index covers
        self._index: dict[tuple[int, ...], int] = {}  # n-gram -> the position after its latest indexed occurrence

    def draft(self, history: Sequence[int], n: int) -> list[int]:
        if n <= 0 or len(history) < NGRAM_MIN + 1:
            return []
        self._extend(history)
        for size in range(min(NGRAM_MAX, len(history) - 1), NGRAM_MIN - 1, -1):
            after = self._index.get(tuple(history[-size:]))
            if after is not None:
                self.kind = size
                return [t for t in history[after:after + n]]
        return []

    def _extend(self, history: Sequence[int]) -> None:
        seen = self._seen
        if len(seen) > len(history) or history[:len(seen)] != seen:
            seen.clear()
            self._index.clear()
        # index the n-grams that end before the history's last token, so that the last n-gram finds an earlier one
        start, end = len(seen), len(history)
        for stop in range(max(start, NGRAM_MIN), end):  # an n-gram history[stop - size:stop], followed by more
            for size in range(NGRAM_MIN, min(NGRAM_MAX, stop) + 1):
                self._index[tuple(history[stop - size:stop])] = stop
        seen.extend(history[start:end])

    def close(self) -> None:
        self._index.clear()


class ModelDrafter:
    """A small model with the same vocabulary, run greedily on its own cache (which keeps the common prefix)."""

    name = "draft model"
    cheap, kind = False, 0

    def __init__(self, engine: "Engine"):
        self.engine = engine

    def draft(self, history: Sequence[int], n: int) -> list[int]:
        import numpy as np

        if n <= 0 or any(t < 0 for t in history):  # a medium's positions: the draft model cannot see them
            return []
        eng = self.engine
        n = min(n, eng.info.n_ctx - len(history))
        if n <= 0:
            return []
        eng.prefill(history)
        out = [int(np.argmax(eng.logits()))]
        while len(out) < n:
            eng.step(out[-1])
            out.append(int(np.argmax(eng.logits())))
        return out

    def close(self) -> None:
        self.engine.close()


class ChainDrafter:
    """The first drafter with a guess."""

    def __init__(self, drafters: Sequence[tuple[Drafter, int]]):
        self.drafters = list(drafters)  # (drafter, its most tokens)
        self.name = " + ".join(d.name for d, _ in self.drafters)

    def draft(self, history: Sequence[int], n: int) -> list[int]:
        for drafter, most in self.drafters:
            guess = drafter.draft(history, min(n, most))
            if guess:
                return guess
        return []

    def close(self) -> None:
        for drafter, _ in self.drafters:
            drafter.close()


# --------------------------------------------------------------------------------------------- the token loop
def plain_tokens(engine: "Engine", sample: Callable[[], int]) -> Iterator[int]:
    """One token per evaluation: sample, hand it over, evaluate it when the consumer asks for the next."""
    while True:
        token = sample()
        yield token
        engine.step(token)


def speculative_tokens(engine: "Engine", sampler, drafter: Drafter, n_max: int, limit: int,
                       stop_ids: frozenset[int], stats: "GenerationStats") -> Iterator[int]:
    """The tokens ``plain_tokens`` would give, several per evaluation when the drafts are right. ``limit``: the most
    tokens the consumer takes (no draft reaches past it)."""
    token, emitted = sampler(), 0
    learn = drafter if isinstance(drafter, AdaptiveDrafter) else None  # a fixed drafter measures nothing
    lengths = stats.draft_lengths
    while True:
        yield token
        emitted += 1
        room = min(n_max, limit - emitted - 1, engine.info.n_ctx - len(engine.tokens) - engine.extra_cells - 1)
        draft = drafter.draft([*engine.tokens, token], room)[:max(room, 0)] if room > 0 else []
        lengths[len(draft)] = lengths.get(len(draft), 0) + 1
        start = time.perf_counter()
        if not draft:
            engine.step(token)
            token = sampler()
            if learn is not None:
                learn.stepped(time.perf_counter() - start)
            continue
        accepted, token = verify(engine, sampler, token, draft, stop_ids)
        if learn is not None:
            learn.verified(len(draft), len(accepted), time.perf_counter() - start)
        stats.drafted_tokens += len(draft)
        stats.accepted_tokens += len(accepted)
        stats.verifications += 1
        for t in accepted:
            yield t
            emitted += 1


def verify(engine: "Engine", sampler, token: int, draft: Sequence[int],
           stop_ids: frozenset[int]) -> tuple[list[int], int]:
    """Evaluate ``token`` and ``draft`` in one batch; returns the drafts accepted and the next (unevaluated) token.
    The cache then holds ``token`` and the accepted drafts, no more."""
    base = len(engine.tokens)
    engine.eval_all([token, *draft])
    accepted: list[int] = []
    for i in range(len(draft) + 1):
        t = sampler.at(i)
        if i == len(draft) or t != draft[i] or t in stop_ids:
            engine.drop_after(base + 1 + len(accepted))
            return accepted, t
        accepted.append(t)
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------- setting up
def same_vocabulary(target: "GGUFHeader", draft: "GGUFHeader") -> None:
    """Refuse a draft model whose tokens differ from the target's (size, texts, special ids), before either loads."""
    problem = vocabulary_difference(target, draft)
    if problem:
        raise InputError(f"cannot draft for {target.path.name}: {problem}", draft.path)


def vocabulary_difference(target: "GGUFHeader", draft: "GGUFHeader") -> Optional[str]:
    a, b = _texts(target), _texts(draft)
    if not a or not b:
        return "a vocabulary is missing (no tokenizer.ggml.tokens)"
    if len(a) != len(b):
        return f"its vocabulary has {len(b)} tokens, the model's {len(a)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"token {i} is {y!r} here but {x!r} in the model"
    for key in VOCAB_IDS:
        name = f"tokenizer.ggml.{key}_token_id"
        if target.get(name) != draft.get(name):
            return f"its {name} is {draft.get(name)!r}, the model's {target.get(name)!r}"
    if target.get("tokenizer.ggml.model") != draft.get("tokenizer.ggml.model"):
        return "its tokenizer type differs from the model's"
    return None


def _texts(header: "GGUFHeader") -> list:
    tokens = header.get("tokenizer.ggml.tokens")
    return tokens if isinstance(tokens, list) else []


def check_speculation(engine: "Engine", config: SpeculativeConfig) -> None:
    """Refuse speculation on an engine that cannot verify drafts or drop rejected cells."""
    if not engine.can_speculate:
        raise UnsupportedModelError(f"speculative decoding needs the llama.cpp engine; {engine.info.arch} models run "
                                    "on their own engine, which verifies one token at a time")
    window = engine.rollback_window
    if window is not None and window < config.n_max:
        raise UnsupportedModelError(
            f"speculative decoding: {engine.info.arch}'s recurrent (linear-attention) state can roll back "
            f"{window} tokens, fewer than the {config.n_max} drafted (llama.cpp keeps snapshots only for "
            "architectures that support rollback)")


def open_drafter(engine: "Engine", config: SpeculativeConfig, open_draft: Callable[[Path], "Engine"]) -> Drafter:
    """The drafter ``config`` asks for; ``open_draft`` loads the draft model (its vocabulary already checked)."""
    drafters: list[tuple[Drafter, int]] = []
    try:
        if config.lookup:
            drafters.append((LookupDrafter(), config.lookup))
        if config.mtp:
            from chatglm.runtime.speculative_mtp import MtpDrafter

            drafters.append((MtpDrafter(engine), 1))
        if config.draft is not None:
            drafters.append((ModelDrafter(open_draft(Path(config.draft))), config.draft_max))
    except BaseException:
        ChainDrafter(drafters).close()  # the ones made so far (an MTP context) go with the failed load
        raise
    if config.adaptive:
        return AdaptiveDrafter(drafters)
    return drafters[0][0] if len(drafters) == 1 else ChainDrafter(drafters)


def memory_estimate(header: "GGUFHeader", config: SpeculativeConfig, n_ctx: int, kv_type: str = "f16",
                    flash_attn: bool = True, n_batch: int = 512):
    """What ``config`` adds to the model's memory at ``n_ctx`` (``memory.speculation_estimate``): the draft model's
    weights, KV cache and buffers at the same context; the MTP context's cache, buffer and hidden states."""
    from chatglm.gguf_file import read_header
    from chatglm.runtime.memory import speculation_estimate

    draft = read_header(Path(config.draft)) if config.draft is not None else None
    return speculation_estimate(header, n_ctx, kv_type, flash_attn, draft=draft, mtp=config.mtp,
                                n_max=config.n_max, n_batch=n_batch)

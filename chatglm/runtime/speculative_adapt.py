"""Adaptive draft lengths: draft only as much as pays, measured on this model (docs/speculative.md, issue #21).

Per drafter (and, for prompt lookup, per n-gram length of the match) a :class:`LengthController` keeps the rate at
which drafted tokens are accepted (a decaying count, so that it follows the text), and a :class:`CostModel` shared by
all of them keeps what a one-token step and a verification batch of b tokens cost on this model (measured at every
evaluation; a batch size not measured yet is priced by the slope of those that were). Each step the controller
takes the draft length n that maximises the expected tokens per second

    E(n) / T(n),   E(n) = 1 + p + ... + p^n  (accepted drafts, then the sampler's own token),
                   T(n) = cost of a batch of n + 1 + cost of drafting n,

against plain decoding's 1 token per step. When no length beats plain decoding by MARGIN it drafts nothing, and
probes again after a wait that doubles up to MAX_WAIT while drafting keeps not paying (and is long enough for
probes to take at most PROBE_SHARE of the time: a draft model that sat idle must catch up on the tokens since). A drafter whose guesses cost
nothing (prompt lookup) is also judged while it does not draft: its guess is compared with the token that comes.
The first WARMUP verifications of each kind draft the longest length, to learn acceptance and the batch costs; a
plain step is taken at least every STEP_EVERY steps, to keep measuring what drafting is weighed against.

None of this changes what is sampled: only how many tokens each evaluation checks.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

log = logging.getLogger(__name__)

DECAY = 0.95  # per observed draft token: the acceptance rate follows the last ~20
MARGIN = 0.05  # a draft length must promise this much more tokens per second than plain steps (estimates are noisy)
WARMUP = 2  # verifications at the longest length before a kind of draft is judged
FIRST_WAIT, MAX_WAIT = 2, 256  # one-token steps before probing again, doubling while drafting does not pay
PROBE = 2  # tokens drafted by a probe
PROBE_SHARE = 0.03  # once backed off, probes take at most this share of the time (a draft model catching up costs)
STEP_EVERY = 64  # a plain step at least this often, to keep measuring what drafting is weighed against
EMA = 0.2  # weight of a new timing


class CostModel:
    """Seconds of a one-token step and of verification batches of each size, on the loaded model."""

    def __init__(self, slope: float = 0.25):
        self.step: Optional[float] = None
        self.batch: dict[int, float] = {}  # batch size -> seconds (moving average)
        self.slope = slope  # extra steps per extra token of a batch, for sizes not measured yet

    def stepped(self, seconds: float) -> None:
        self.step = seconds if self.step is None else (1 - EMA) * self.step + EMA * seconds

    def verified(self, size: int, seconds: float) -> None:
        old = self.batch.get(size)
        self.batch[size] = seconds if old is None else (1 - EMA) * old + EMA * seconds
        if self.step and size > 1:
            slope = max(0.0, (self.batch[size] / self.step - 1) / (size - 1))
            self.slope = (1 - EMA) * self.slope + EMA * slope

    def relative(self, size: int) -> float:
        """A batch of ``size`` tokens in one-token steps."""
        if self.step and size in self.batch:
            return self.batch[size] / self.step
        return 1 + self.slope * (size - 1)

    @property
    def step_seconds(self) -> Optional[float]:
        """A one-token step; while none was measured (every step drafted), what the smallest batch measured
        implies."""
        if self.step or not self.batch:
            return self.step
        size = min(self.batch)
        return self.batch[size] / self.relative(size)


class LengthController:
    """The draft length for one kind of draft: acceptance rate, drafting cost, wait before the next probe."""

    def __init__(self, most: int, cheap: bool):
        self.most, self.cheap = most, cheap
        self.hits = self.misses = 0.0  # decaying counts of accepted and rejected draft tokens
        self.verifications = 0
        self.draft_seconds = 0.0  # per drafted token (moving average)
        self.wait, self.next_wait = 0, FIRST_WAIT
        self.probing = False  # the last choice was a probe
        self.probe_steps = 0.0  # what the last probe cost (drafting and verification), in one-token steps

    @property
    def rate(self) -> float:
        """The chance that a drafted token is accepted, given the ones before it were."""
        return (self.hits + 1) / (self.hits + self.misses + 2)

    def observe(self, drafted: int, accepted: int) -> None:
        """``accepted`` of ``drafted`` tokens were accepted (the first rejected one ends the trial)."""
        for _ in range(accepted):
            self.hits, self.misses = DECAY * self.hits + 1, DECAY * self.misses
        if accepted < drafted:
            self.hits, self.misses = DECAY * self.hits, DECAY * self.misses + 1

    def drafted(self, n: int, seconds: float) -> None:
        if n > 0:
            self.draft_seconds = (1 - EMA) * self.draft_seconds + EMA * seconds / n

    def best(self, room: int, costs: CostModel) -> tuple[int, float]:
        """The length with the most tokens per step (0: plain decoding, 1 token per step), and that gain."""
        p, step = self.rate, costs.step_seconds or 0.0
        draft_steps = self.draft_seconds / step if step else 0.0
        best, gain, expected = 0, 1.0 + MARGIN, 1.0
        for n in range(1, min(room, self.most) + 1):
            expected += p ** n
            value = expected / (costs.relative(n + 1) + draft_steps * n)
            if value > gain:
                best, gain = n, value
        return best, gain

    def choose(self, room: int, costs: CostModel) -> int:
        room = min(room, self.most)
        if room <= 0:
            return 0
        self.probing = False
        if self.verifications < WARMUP:
            return room
        n, _ = self.best(room, costs)
        if n:
            self.wait, self.next_wait = 0, FIRST_WAIT
            return n
        if self.wait > 0:
            self.wait -= 1
            return 0
        self.wait = max(self.next_wait, int(self.probe_steps / PROBE_SHARE))
        self.next_wait = min(2 * self.next_wait, MAX_WAIT)
        self.probing = not self.cheap  # a cheap drafter is judged without verifying
        return min(PROBE, room) if self.probing else 0


class AdaptiveDrafter:
    """Drafters in order (the first with a guess drafts), each draft as long as pays (module docstring)."""

    def __init__(self, drafters: Sequence[tuple[object, int]], costs: Optional[CostModel] = None):
        self.drafters = list(drafters)  # (drafter, its most tokens)
        self.name = " + ".join(d.name for d, _ in self.drafters)
        self.costs = costs or CostModel()
        self.controllers: dict[tuple[int, int], LengthController] = {}
        self._last: Optional[LengthController] = None
        self._draft_seconds = 0.0  # the last draft's
        self._since_step = STEP_EVERY  # verifications since the last plain step (the first step is plain)
        self._shadow: Optional[tuple[LengthController, int, int]] = None  # (judged, position, guessed token)

    def controller(self, index: int, kind: int) -> LengthController:
        key = (index, kind)
        if key not in self.controllers:
            drafter, most = self.drafters[index]
            self.controllers[key] = LengthController(most, bool(getattr(drafter, "cheap", False)))
        return self.controllers[key]

    def draft(self, history: Sequence[int], room: int) -> list[int]:
        self._judge_shadow(history)
        self._last, self._draft_seconds = None, 0.0
        if self._since_step >= STEP_EVERY:
            return []
        for i, (drafter, most) in enumerate(self.drafters):
            guess = self._draft_one(i, drafter, history, min(room, most))
            if guess:
                return guess
        return []

    def _draft_one(self, index: int, drafter, history: Sequence[int], room: int) -> list[int]:
        if room <= 0:
            return []
        if getattr(drafter, "cheap", False):  # guess first, then judge the guess by the kind of match it is
            guess = drafter.draft(history, room)
            if not guess:
                return []
            ctl = self.controller(index, getattr(drafter, "kind", 0))
            n = ctl.choose(len(guess), self.costs)
            if not n:
                self._shadow = (ctl, len(history), guess[0])
            guess = guess[:n]
        else:
            ctl = self.controller(index, 0)
            n = ctl.choose(room, self.costs)
            if not n:
                return []
            start = time.perf_counter()
            guess = drafter.draft(history, n)
            self._draft_seconds = time.perf_counter() - start
            ctl.drafted(len(guess), self._draft_seconds)
        if guess:
            self._last = ctl
        return guess

    def _judge_shadow(self, history: Sequence[int]) -> None:
        """A cheap guess not verified: was it the token that came?"""
        if self._shadow is None:
            return
        ctl, pos, token = self._shadow
        self._shadow = None
        if len(history) > pos:
            ctl.observe(1, int(history[pos] == token))

    def stepped(self, seconds: float) -> None:
        """A one-token step (evaluation and sampling) took ``seconds``."""
        self.costs.stepped(seconds)
        self._since_step = 0

    def verified(self, drafted: int, accepted: int, seconds: float) -> None:
        """A verification of ``drafted`` drafts (a batch of ``drafted`` + 1) accepted ``accepted``."""
        self.costs.verified(drafted + 1, seconds)
        self._since_step += 1
        step = self.costs.step_seconds
        if self._last is not None and self._last.probing and step:
            self._last.probe_steps = (seconds + self._draft_seconds) / step
        if self._last is not None:
            self._last.observe(drafted, accepted)
            self._last.verifications += 1

    def close(self) -> None:
        for drafter, _ in self.drafters:
            drafter.close()

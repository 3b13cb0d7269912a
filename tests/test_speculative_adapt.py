"""Adaptive draft lengths (runtime/speculative_adapt.py): the controller alone, on scripted drafters and fixed costs
(no timing), then on a real model: output identical, lengths reported."""

from __future__ import annotations

import json

import pytest

from chatglm.runtime.speculative_adapt import MAX_WAIT, STEP_EVERY, WARMUP, AdaptiveDrafter, CostModel, LengthController

from chatglm.runtime.sampling import SamplingParams
from chatglm.runtime.speculative import SpeculativeConfig

from hostile import cli
from test_speculative import glm4_ggufs, glm45_gguf, glm45, same_output  # noqa: F401  (fixtures)


def costs(batch_slope: float) -> CostModel:
    """A model whose one-token step takes 1 s and a batch of b tokens 1 + slope * (b - 1) s (all sizes measured)."""
    c = CostModel()
    c.stepped(1.0)
    for b in range(2, 66):
        c.verified(b, 1.0 + batch_slope * (b - 1))
    return c


class Oracle:
    """Drafts the true continuation (``right``) or a wrong one; the truth is ``history[i] == i % 7``."""

    name = "oracle"
    kind = 0

    def __init__(self, cheap: bool, right: bool = True):
        self.cheap, self.right, self.calls = cheap, right, 0

    def draft(self, history, n):
        self.calls += 1
        start = len(history)
        return [(i % 7) if self.right else 99 for i in range(start, start + n)]

    def close(self):
        pass


def drive(drafter: AdaptiveDrafter, oracle: Oracle, steps: int, room: int = 8) -> list[int]:
    """Run ``steps`` decode steps against the truth; returns the length chosen at each step."""
    history, chosen = [0], []
    for _ in range(steps):
        guess = drafter.draft(history, room)
        chosen.append(len(guess))
        if not guess:
            history.append(len(history) % 7)
            drafter.stepped(1.0)
            continue
        accepted = 0
        for i, t in enumerate(guess):
            if t != (len(history) + i) % 7:
                break
            accepted += 1
        drafter.verified(len(guess), accepted, 1.0 + 0.1 * len(guess))
        history.extend((len(history) + i) % 7 for i in range(accepted + 1))
    return chosen


@pytest.mark.parametrize("cheap", [False, True])
def test_always_wrong_drafter_shrinks_to_nothing(cheap):
    oracle = Oracle(cheap, right=False)
    d = AdaptiveDrafter([(oracle, 8)], costs(0.1))
    chosen = drive(d, oracle, 400)
    assert chosen[0] == 0 and chosen[1:1 + WARMUP] == [8] * WARMUP  # measures a plain step, then learns
    tail = chosen[100:]
    assert tail.count(0) >= 0.9 * len(tail)  # then mostly plain steps
    assert max(tail) <= 2  # probes only, short ones
    if cheap:
        assert max(tail) == 0  # a guess that costs nothing is judged without a verification
    else:
        probes = [i for i, n in enumerate(tail) if n]
        gaps = [b - a for a, b in zip(probes, probes[1:])]
        assert 1 <= len(probes) <= 5 and gaps == sorted(gaps)  # ever rarer probes (the wait doubles)
        assert max(gaps, default=MAX_WAIT) >= 64


def test_always_right_drafter_grows_to_the_most():
    oracle = Oracle(cheap=True)
    d = AdaptiveDrafter([(oracle, 8)], costs(0.1))
    chosen = drive(d, oracle, 200)
    assert chosen[0] == 0 and chosen[1:STEP_EVERY + 1] == [8] * STEP_EVERY  # after the first (plain) step
    assert chosen.count(0) <= 1 + 200 // STEP_EVERY and set(chosen) == {0, 8}  # a plain step now and then


@pytest.mark.parametrize("cheap", [False, True])
def test_recovers_when_drafts_become_right(cheap):
    oracle = Oracle(cheap, right=False)
    d = AdaptiveDrafter([(oracle, 8)], costs(0.1))
    assert drive(d, oracle, 200)[-50:].count(0) >= 45
    oracle.right = True
    chosen = drive(d, oracle, 300)
    assert chosen[-20:].count(8) >= 19  # back to the longest drafts, through probes


def test_expensive_batches_keep_drafts_short():
    """On a CPU where every extra token of a batch costs most of a step, an 80%-right drafter drafts few tokens; on
    one where batches are nearly free (a GPU) it drafts the most."""
    ctl = LengthController(8, cheap=False)
    for _ in range(200):
        ctl.observe(5, 4)  # 4 of 5 accepted: ~80%
    n_cpu, gain_cpu = ctl.best(8, costs(0.5))
    n_gpu, gain_gpu = ctl.best(8, costs(0.02))
    assert 1 <= n_cpu < 4 and n_gpu == 8 and gain_gpu > gain_cpu > 1


def test_costly_drafting_is_counted():
    """A draft model as slow as the target never pays, even when always right."""
    ctl = LengthController(4, cheap=False)
    for _ in range(50):
        ctl.observe(4, 4)
        ctl.drafted(4, 4.0)  # 1 s a drafted token, as long as the target's step
    assert ctl.best(4, costs(0.1))[0] == 0


def test_lookup_judged_by_ngram_length():
    """Prompt lookup's 2-gram matches that are always wrong stop drafting while its 4-gram matches still draft."""

    class TwoKinds(Oracle):
        def draft(self, history, n):
            guess = super().draft(history, n)
            self.kind = 2 if self.calls % 2 else 4
            return guess if self.kind == 4 else [99] * n

    oracle = TwoKinds(cheap=True)
    d = AdaptiveDrafter([(oracle, 1)], costs(0.1))
    drive(d, oracle, 300, room=1)
    kinds = {kind: ctl for (_, kind), ctl in d.controllers.items()}
    assert kinds[2].rate < 0.1 < 0.9 < kinds[4].rate
    assert kinds[2].best(1, d.costs)[0] == 0 and kinds[4].best(1, d.costs)[0] == 1


def test_chain_falls_through_to_the_next_drafter():
    wrong, right = Oracle(cheap=True, right=False), Oracle(cheap=False)
    d = AdaptiveDrafter([(wrong, 8), (right, 4)], costs(0.05))
    chosen = drive(d, wrong, 200)
    assert chosen[-20:].count(4) >= 19 and right.calls > 100


# ----------------------------------------------------------------------------------------------- on a model
@pytest.mark.parametrize("spec", [dict(lookup=8), dict(draft="other", draft_max=4), dict(lookup=4, draft="self")])
def test_adaptive_greedy_identical(glm4_ggufs, spec):
    path = glm4_ggufs["glm4-0414"]
    named = {"other": glm4_ggufs["other"], "self": path}
    spec = SpeculativeConfig(adaptive=True, **{k: named.get(v, v) for k, v in spec.items()})
    want, got, stats = same_output(path, spec)
    assert got == want
    assert stats[0].verifications >= 1  # the first verifications measure (later ones depend on the timings)
    for s in stats:
        assert s.accepted_tokens <= s.drafted_tokens
        assert sum(n * k for n, k in s.draft_lengths.items()) == s.drafted_tokens
        assert sum(k for n, k in s.draft_lengths.items() if n) == s.verifications


def test_adaptive_seeded_sampling_identical(glm4_ggufs):
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=40, seed=7, repeat_penalty=1.1, max_tokens=40)
    path = glm4_ggufs["glm4-0414"]
    want, got, stats = same_output(path, SpeculativeConfig(lookup=6, draft=path, draft_max=4, adaptive=True), params)
    assert got == want and stats[0].drafted_tokens > 0


class FrozenCosts(CostModel):
    """Fixed costs (a step 1 s, a batch of b 1 + 0.3 (b - 1) s) that the run's timings do not move."""

    def __init__(self):
        super().__init__(slope=0.3)
        self.step = 1.0

    def stepped(self, seconds):
        pass

    def verified(self, size, seconds):
        pass


def test_adaptive_mtp_identical_and_stops(glm45_gguf):
    """The random MTP layer is almost never right: after its first verifications it mostly stops drafting (costs
    frozen, so that the decision depends on the acceptance only)."""
    from chatglm.runtime.model import load
    from test_speculative import GREEDY, SETTINGS, generate, repetitive_prompt

    with load(glm45_gguf, **SETTINGS) as plain:
        ids = repetitive_prompt(plain)
        want = [generate(plain, ids)[0] for _ in range(2)]
    with load(glm45_gguf, mtp=True, adaptive=True, **SETTINGS) as m:
        m.drafter.costs = FrozenCosts()
        got = [generate(m, ids, GREEDY) for _ in range(2)]
    assert [tokens for tokens, _ in got] == want
    first, second = (s for _, s in got)
    assert first.verifications >= 1
    assert second.draft_lengths.get(0, 0) > 4 * second.verifications  # mostly plain steps by the second reply


def test_cli_json_reports_lengths(glm4_ggufs):
    r = cli(["run", str(glm4_ggufs["glm4"]), "--lookup", "4", "--temp", "0", "-n", "16", "--json", "-c", "256",
             "-p", "hello hello hello hello"])
    assert r.code == 0, r.err
    spec = json.loads(r.out)["speculative"]
    lengths = {int(n): k for n, k in spec["draft_lengths"].items()}
    assert all(0 <= n <= 4 for n in lengths) and sum(lengths.values()) >= 1
    assert sum(n * k for n, k in lengths.items()) == spec["drafted_tokens"]

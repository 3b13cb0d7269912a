"""Sampling: numpy sampler semantics, and llama.cpp's native chain on the same settings."""

from __future__ import annotations

import numpy as np
import pytest

from chatglm.errors import InputError
from chatglm.runtime.sampling import Sampler, SamplingParams, penalize


def test_greedy_and_top_k_one():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0))(logits) == 1
    assert all(Sampler(SamplingParams(top_k=1, seed=s))(logits) == 1 for s in range(5))


def test_top_p_never_leaves_the_nucleus_and_seed_repeats():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=151552).astype(np.float32)
    logits[:3] = [20.0, 19.5, 19.0]  # these three hold > 99% of the mass at temperature 1
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=7)
    draws = [Sampler(params)(logits) for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same token
    many = Sampler(params.updated(seed=1))
    assert {many(logits) for _ in range(200)} <= {0, 1, 2}


def test_flat_distribution_widens_candidates():
    logits = np.zeros(50000, dtype=np.float32)
    tokens = {Sampler(SamplingParams(temperature=1.0, top_p=0.99, seed=s))(logits) for s in range(30)}
    assert len(tokens) > 25  # a nucleus of ~49,500 tokens was sampled from, not the first 256 candidates only


def test_repeat_penalty_matches_llama_cpp_rule():
    out = penalize(np.array([2.0, -2.0, 1.0], dtype=np.float32), [0, 1, 1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(max_tokens=-3)])
def test_bad_params(bad):
    with pytest.raises(InputError):
        SamplingParams(**bad)


def test_native_sampler_seeded_and_greedy(glm3_model):
    engine = glm3_model.engine
    ids = glm3_model.prompt_ids([{"role": "user", "content": "你好"}])
    engine.prefill(ids)
    greedy = engine.sampler(SamplingParams(temperature=0))
    assert greedy() == int(np.argmax(engine.logits()))
    greedy.close()
    draws = []
    for _ in range(2):
        s = engine.sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=42))
        draws.append(s())
        s.close()
    assert draws[0] == draws[1]
    top1 = engine.sampler(SamplingParams(temperature=1.0, top_k=1, seed=3))
    assert top1() == int(np.argmax(engine.logits()))
    top1.close()

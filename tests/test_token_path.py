"""The per-token path over llama.cpp: greedy decoding reads the logits in place with the ids llama.cpp's greedy
sampler gives, and ggml's per-node abort callback is installed only while an evaluation can be cancelled."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
from fixtures_chat import chat_gguf, chat_model  # noqa: F401,F811  (fixtures)

from chatglm.errors import Cancelled
from chatglm.runtime import llama_native as native
from chatglm.runtime.model import drain
from chatglm.runtime.sampling import SamplingParams


def greedy_chain(engine):
    """llama.cpp's own greedy sampler chain on the engine's context (what the engine used before)."""
    return native.NativeSampler(engine.native_context, engine._vocab, engine.info.n_vocab,
                                SamplingParams(temperature=0.0), [])


def tokens_with(engine, sample, prompt, n):
    engine.reset()
    engine.prefill(prompt)
    out = []
    for _ in range(n):
        out.append(sample())
        engine.step(out[-1])
    sample.close()
    return out


def test_greedy_reads_the_logits_in_place_and_matches_llama_cpp_greedy(chat_model):
    engine = chat_model.engine
    plain, penalised = SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repeat_penalty=1.3)
    assert isinstance(engine.sampler(plain), native.ArgmaxSampler)
    assert isinstance(engine.sampler(penalised), native.NativeSampler)  # the penalty needs the chain's history
    assert isinstance(engine.sampler(SamplingParams(seed=1)), native.NativeSampler)
    prompt = chat_model.tokenize("今天天气很好，我们去")
    ours = tokens_with(engine, engine.sampler(plain), prompt, 24)
    assert ours == tokens_with(engine, greedy_chain(engine), prompt, 24)
    reply = drain(chat_model.run(prompt, plain.updated(max_tokens=24)))  # the model's loop: until a stop id
    assert reply.tokens and reply.tokens == ours[:len(reply.tokens)]


def test_argmax_at_an_output_of_a_batch_matches_the_chain(chat_model):
    engine = chat_model.engine
    ids = chat_model.tokenize("hello 世界, one two three")
    engine.reset()
    engine.eval_all(ids)
    argmax, chain = engine.sampler(SamplingParams(temperature=0.0)), greedy_chain(engine)
    assert [argmax.at(i) for i in range(len(ids))] == [chain.at(i) for i in range(len(ids))]
    chain.close()
    with pytest.raises(Exception, match="no logits"):
        argmax.at(len(ids) + 5)


@pytest.mark.parametrize("values, expected", [
    ([0.5, 2.0, 2.0, -1.0], 1),  # the first of equal largest
    ([0.5, float("nan"), 3.0, 3.0], 2),  # a NaN is skipped
    ([float("nan"), 9.0, 1.0], 0),  # a NaN first stays (nothing compares greater than it)
    ([float("-inf")] * 3, 0),
])
def test_argmax_follows_the_greedy_samplers_rule(values, expected):
    logits = np.array(values, dtype=np.float32)
    sampler = native.ArgmaxSampler(None, len(values))
    sampler._get = lambda _ctx, _i: logits.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    assert sampler() == expected


def counting_callback(engine):
    calls = [0]

    def count(_data) -> bool:
        calls[0] += 1
        return False

    engine._abort_cb = native.ABORT_CALLBACK(count)  # installed from now on, whenever the engine arms it
    return calls


def test_abort_callback_only_while_an_evaluation_can_be_cancelled(chat_model):
    engine = chat_model.engine
    saved = engine._abort_cb
    calls = counting_callback(engine)
    try:
        engine.reset()
        engine.prefill(chat_model.tokenize("a prompt of a few tokens"), cancel=threading.Event())
        assert calls[0] > 0  # ggml checked it between the graph's nodes
        calls[0] = 0
        for tok in chat_model.tokenize("then some steps"):
            engine.step(tok)
        assert calls[0] == 0
        engine.prefill(list(engine.tokens) + chat_model.tokenize(" more"))  # no cancel event: nothing to check
        assert calls[0] == 0
        engine.set_cancel(threading.Event())  # libmtmd's helpers decode on the engine's context: cancellable again
        native.fill_batch(engine._batch, chat_model.tokenize("x")[:1], len(engine.tokens), logits_last=True)
        assert native.lib().llama_decode(engine.native_context, engine._batch) == 0
        assert calls[0] > 0
        engine.set_cancel(None)
        engine.reset()
    finally:
        engine._abort_cb = saved
        engine._arm_abort(False)


def test_a_set_cancel_event_still_aborts_a_prompt(chat_model):
    engine = chat_model.engine
    engine.reset()
    for _ in range(3):  # armed, disarmed by steps, armed again
        event = threading.Event()
        event.set()
        with pytest.raises(Cancelled):
            engine.prefill(chat_model.tokenize("这是一个会被取消的提示"), cancel=event)
        assert engine.tokens == []
        engine.prefill(chat_model.tokenize("ok"))
        engine.step(chat_model.tokenize("x")[0])
        engine.reset()

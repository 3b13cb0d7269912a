"""One definition each: the sampling parameters (CLI options, chat settings, API keywords, server fields all come
from SamplingParams) and the public load() (the runtime's, plus the demo model)."""

from __future__ import annotations

import inspect
from dataclasses import fields

import pytest
import typer

from chatglm.runtime.sampling import NULLABLE, SamplingParams, knobs

NAMES = [f.name for f in fields(SamplingParams)]


def test_every_sampling_parameter_has_its_metadata():
    assert list(knobs()) == NAMES and "repeat_last_n" in NAMES
    for name, k in knobs().items():
        assert k.kind in (int, float) and k.help and k.flags and k.lo < k.hi, name
    assert NULLABLE == ("seed", "max_tokens")


def test_run_has_one_option_per_sampling_parameter():
    from chatglm.cli.app import app

    command = typer.main.get_command(app).commands["run"]
    options = {p.name: p for p in command.params}
    for name, k in knobs().items():
        assert name in options, name
        assert set(options[name].opts) == set(k.flags), name


def test_chat_settings_are_the_sampling_parameters():
    from chatglm.cli.repl import HELP, SETTINGS

    assert list(SETTINGS) == NAMES
    assert all(SETTINGS[name] is k.kind for name, k in knobs().items())
    assert all(name in HELP for name in NAMES)


def test_server_request_takes_every_sampling_parameter():
    from chatglm.server.schema import ChatRequest, CompletionRequest

    for model in (ChatRequest, CompletionRequest):
        assert set(NAMES) <= set(model.model_fields), set(NAMES) - set(model.model_fields)
    given = {"temperature": 0.5, "top_p": 0.5, "top_k": 3, "repeat_penalty": 1.2, "repeat_last_n": 8, "seed": 1,
             "max_tokens": 4}
    assert set(given) == set(NAMES)
    req = ChatRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **given})
    assert req.sampling_kwargs() == given
    assert SamplingParams().updated(**req.sampling_kwargs()) == SamplingParams(**given)


def test_api_keywords_are_the_sampling_parameters():
    from chatglm.errors import InputError

    assert SamplingParams().updated(repeat_last_n=3).repeat_last_n == 3
    with pytest.raises(InputError, match="unknown sampling option"):
        SamplingParams().updated(repeat_last=3)


def test_public_load_takes_the_runtime_keywords():
    import chatglm
    from chatglm.runtime import model

    public, runtime = inspect.signature(chatglm.load), inspect.signature(model.load)
    assert list(public.parameters) == list(runtime.parameters)
    assert public.parameters["path"].default is None
    for name in list(runtime.parameters)[1:]:
        assert public.parameters[name].default == runtime.parameters[name].default, name


def test_kv_types_are_one_table_that_agrees_with_ggml():
    import gguf

    from chatglm.cli.common import KVType
    from chatglm.runtime.kv_types import GLM1_KV_TYPES, KV_TYPES

    for name, t in KV_TYPES.items():
        qtype = gguf.GGMLQuantizationType(t.ggml_type)
        assert qtype.name.lower() == name and gguf.GGML_QUANT_SIZES[qtype] == (t.block, t.block_bytes)
    assert [c.value for c in KVType] == list(KV_TYPES)
    assert set(GLM1_KV_TYPES) <= set(KV_TYPES)

"""Property-based fuzzing of every reader of untrusted input, bounded and deterministic for CI.

Each fuzz target of tests/fuzz/targets.py gets a few hundred derandomized examples: random bytes, the target's seeds
with bytes overwritten, cut or inserted, and for the JSON readers the seed documents with one value replaced by a
hostile one (a wrong type, a huge number, deep nesting). A target may only accept or refuse with InputError (the
server: a 4xx error object); every example also has a time limit, so a hang fails the test instead of stalling CI.
Long coverage-guided runs: benchmarks/fuzz.py (docs/fuzz.md).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import jsonmut  # noqa: E402
from hostile import deadline  # noqa: E402
import targets  # noqa: E402

EXAMPLE_SECONDS = 20  # one example's limit: generous for a loaded CI machine, far below a hang


def fuzz(n: int):
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                    database=None, phases=(Phase.explicit, Phase.generate, Phase.shrink), report_multiple_bugs=False)


@pytest.fixture(scope="module", autouse=True)
def _close_targets():
    previous = targets.silence_logs()
    yield
    targets.close()
    logging.getLogger("chatglm").setLevel(previous)


def time_limit(seconds: int = EXAMPLE_SECONDS):
    return deadline(seconds, "one fuzz example is still running (a hang)")


def run(name: str, data: bytes) -> None:
    with time_limit():
        targets.TARGETS[name].run(data)


# -------------------------------------------------------------------------------------------------- strategies


def mutate(seed: bytes):
    """The seed with bytes overwritten, cut or inserted at drawn places."""
    return st.tuples(st.integers(0, len(seed)), st.binary(max_size=16), st.booleans(), st.integers(0, len(seed))).map(
        lambda t: (seed[:t[0]] + t[1] + seed[t[0] + (len(t[1]) if t[2] else 0):])[: max(t[3], t[0] + len(t[1]))])


def seed_inputs(name: str) -> list[bytes]:
    return targets.TARGETS[name].seeds()


def mutated(name: str):
    """A mutated seed of the target (seeds are built on first use, not at collection)."""
    return st.deferred(lambda: st.sampled_from(seed_inputs(name)).flatmap(mutate))


HOSTILE = st.one_of(st.sampled_from(jsonmut.CHOICES), st.integers(-(2 ** 70), 2 ** 70), st.floats(),
                    st.text(max_size=8), st.lists(st.integers(0, 5), max_size=3),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


def json_mutated(name: str):
    """A seed document (after the target's one-byte choice) with one value replaced by a hostile one (jsonmut)."""

    @st.composite
    def strategy(draw):
        prefix, doc = draw(st.sampled_from([(s[:1], json.loads(s[1:])) for s in seed_inputs(name)]))
        found = list(jsonmut.paths(doc))
        path = found[draw(st.integers(0, len(found) - 1))]
        depth = draw(st.sampled_from([100, 5000, 200_000]))
        return prefix + jsonmut.dumps(jsonmut.replaced(doc, path, draw(HOSTILE)), depth)

    return strategy()


def server_mutated():
    """A request body with one value replaced (the first byte picks the endpoint, as the target reads it)."""
    return json_mutated("server")


# -------------------------------------------------------------------------------------------------- weight files


@fuzz(300)
@given(st.one_of(st.binary(max_size=256), mutated("safetensors")))
def test_safetensors_parser_never_crashes(data):
    run("safetensors", data)


@fuzz(250)
@given(st.one_of(st.binary(max_size=128), mutated("pickle")))
def test_pickle_reader_never_crashes(data):
    run("pickle", data)


@fuzz(200)
@given(st.one_of(st.binary(max_size=128), mutated("torch_zip")))
def test_torch_zip_container_never_crashes(data):
    run("torch_zip", data)


# -------------------------------------------------------------------------------------------------- GGUF


@fuzz(300)
@given(st.one_of(st.binary(max_size=256).map(lambda b: b"GGUF\x03\x00\x00\x00" + b), mutated("gguf")))
def test_gguf_reader_never_crashes(data):
    run("gguf", data)


@fuzz(150)
@given(mutated("gguf_validate"))
def test_gguf_validator_never_crashes(data):
    run("gguf_validate", data)


@fuzz(200)
@given(st.one_of(st.binary(max_size=128), mutated("imatrix")))
def test_imatrix_reader_never_crashes(data):
    run("imatrix", data)


# -------------------------------------------------------------------------------------------------- checkpoint folders


@fuzz(100)
@given(st.one_of(json_mutated("config_json"), mutated("config_json")))
def test_config_json_never_crashes(data):
    run("config_json", data)


@fuzz(60)
@given(st.one_of(json_mutated("tokenizer_config_json"), mutated("tokenizer_config_json")))
def test_tokenizer_config_json_never_crashes(data):
    run("tokenizer_config_json", data)


@fuzz(60)
@given(st.one_of(json_mutated("tokenizer_json"), mutated("tokenizer_json")))
def test_tokenizer_json_never_crashes(data):
    run("tokenizer_json", data)


@fuzz(60)
@given(st.one_of(json_mutated("adapter_config_json"), mutated("adapter_config_json")))
def test_adapter_config_json_never_crashes(data):
    run("adapter_config_json", data)


@fuzz(50)
@given(mutated("spm_model"))
def test_sentencepiece_model_never_crashes(data):
    run("spm_model", data)


@fuzz(50)
@given(mutated("tiktoken"))
def test_tiktoken_file_never_crashes(data):
    run("tiktoken", data)


@fuzz(40)
@given(mutated("ice_model"))
def test_ice_model_never_crashes(data):
    run("ice_model", data)


# -------------------------------------------------------------------------------------------------- chat files, replies


@fuzz(150)
@given(st.one_of(json_mutated("chat_files"), mutated("chat_files")))
def test_conversation_and_tools_files_never_crash(data):
    run("chat_files", data)


@fuzz(300)
@given(st.one_of(st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")), mutated("reply")))
def test_reply_parsers_never_crash(data):
    run("reply", data)


# -------------------------------------------------------------------------------------------------- media


@fuzz(400)
@given(st.one_of(st.binary(max_size=64), mutated("media")))
def test_media_checks_never_crash(data):
    run("media", data)


# -------------------------------------------------------------------------------------------------- server


@fuzz(100)
@given(st.one_of(server_mutated(), mutated("server")))
def test_server_answers_4xx_never_500(data):
    run("server", data)


def test_every_target_is_fuzzed_here():
    tested = {name for name in targets.TARGETS if f'"{name}"' in Path(__file__).read_text()}
    assert tested == set(targets.TARGETS)


# -------------------------------------------------------------------------------------------------- benchmarks/fuzz.py


def _bench():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz.py"
    spec = importlib.util.spec_from_file_location("bench_fuzz", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_benchmark_names_each_way_a_child_stops():
    bench = _bench()
    artifact = bench.CACHE / "findings" / "gguf" / "timeout-abc"
    err = f"==1== ERROR: libFuzzer: timeout after 10 seconds\nartifact_prefix=x; Test unit written to {artifact}\n"
    assert bench._stopped(err, 70) == ("hang: one execution ran past the time limit "
                                       "(benchmarks/.cache/fuzz/findings/gguf/timeout-abc)")
    assert bench._stopped("==2== ERROR: libFuzzer: deadly signal\n", 1).startswith("crash: the process was killed")
    row = bench.Row("gguf", seconds=10, fuzz_seconds=8, executions=800, cov=5, ft=7, findings=["hang: x (f)"])
    assert "| gguf | 10 | 800 | 100 | 5 | 7 | hang: x (f) |" in bench.table([row])


def test_benchmark_without_atheris_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "atheris", None)
    assert _bench().main(["--seconds", "5"]) == 2
    assert "pip install atheris" in capsys.readouterr().err

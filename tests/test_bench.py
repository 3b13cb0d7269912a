"""`chatglm bench`: sane pp/tg numbers from real work, valid JSON, a readable table, and clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fixtures_bench import exact_engine  # noqa: F401  (fixture)
from typer.testing import CliRunner

from chatglm.cli.app import app
from chatglm.errors import InputError
from chatglm.runtime.bench import BenchSpec, Measurement, check_spec, random_tokens, run_bench

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_measures_what_it_says(exact_engine):
    spec = BenchSpec(n_prompt=(32, 48), n_gen=(8,), repetitions=3, warmup=True)
    before = exact_engine.n_evaluated
    calls = []
    results = run_bench(exact_engine, spec, progress=lambda *a: calls.append(a))
    assert [r.test for r in results] == ["pp32", "pp48", "tg8"]
    # Each test ran its warm-up (whole prompt; one generated token) and three timed repetitions, from a cleared cache.
    assert exact_engine.n_evaluated - before == 4 * 32 + 4 * 48 + (1 + 3 * 8)
    assert exact_engine.tokens == []
    assert calls[-1] == ("tg8", 3, 3) and len(calls) == 9
    for r in results:
        assert len(r.seconds) == 3 and all(s > 0 for s in r.seconds)
        tps = r.tps
        assert min(tps) <= r.median_tps <= max(tps) and all(math.isfinite(t) and 1 < t < 1e7 for t in tps)
        assert r.tps[0] == pytest.approx(r.n_tokens / r.seconds[0])


def test_statistics():
    m = Measurement("tg4", 4, [1.0, 0.5, 2.0])  # 4, 8, 2 tokens/s
    d = m.to_dict()
    assert (d["median_tps"], d["min_tps"], d["max_tps"]) == (4.0, 2.0, 8.0)
    assert d["mean_tps"] == pytest.approx(14 / 3) and d["stdev_tps"] == pytest.approx(float(np.std([4, 8, 2], ddof=1)))
    assert Measurement("pp8", 8, [2.0]).stdev_tps == 0.0


def test_random_tokens_avoid_special_tokens(exact_engine):
    info = exact_engine.info
    ids = random_tokens(info, 5000, np.random.default_rng(0))
    assert len(ids) == 5000 and min(ids) >= 0 and max(ids) < info.n_vocab
    assert info.special and not set(ids) & set(info.special.values())


def test_json_output(glm3_gguf):
    r = invoke("bench", glm3_gguf, "-p", 16, "-n", 4, "-n", 6, "-r", 2, "-t", 1, "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [x["test"] for x in report["results"]] == ["pp16", "tg4", "tg6"]
    assert report["engine"] == "LlamaEngine" and report["settings"]["threads"] == 1
    assert report["model"]["arch"] == "chatglm" and report["model"]["n_params"] > 0
    assert report["settings"]["n_ctx"] >= 16 + 6 and report["peak_rss_bytes"] > 10 * 2**20
    for x in report["results"]:
        assert x["repetitions"] == 2 and len(x["samples_tps"]) == 2 and x["median_tps"] > 0
        assert x["min_tps"] <= x["median_tps"] <= x["max_tps"]


def test_table_output(glm3_gguf):
    r = invoke("bench", glm3_gguf, "-p", 16, "-n", 4, "-r", 1, "-t", 1, "--no-warmup")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith("| model") and "t/s (median)" in lines[0] and lines[1].startswith("| ---")
    assert "| pp16 |" in lines[2] and "| tg4 " in lines[3] and "LlamaEngine" in lines[2]
    assert lines[-1].startswith("peak RSS ")


@pytest.mark.parametrize("args,message", [
    (["-r", 0], "--repetitions: must be between 1 and 1000, got 0"),
    (["-p", 600, "-c", 256], ("a prompt of 600 tokens is longer than the context of 256 tokens "
                              "(raise --ctx or lower --n-prompt)")),
    (["-p", 0, "-n", 0], "nothing to measure: every prompt and generation length is 0"),
    (["-n", -5], "--n-gen: must be between 0 and 16777216, got -5"),
])
def test_bad_settings(glm3_gguf, args, message):
    r = invoke("bench", glm3_gguf, *args)
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {message}"


def test_missing_model(tmp_path):
    r = invoke("bench", tmp_path / "none.gguf", "-r", 1)
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {tmp_path / 'none.gguf'}: file not found"


def test_context_of_the_engine_is_checked(exact_engine):
    with pytest.raises(InputError, match="a prompt of 300 tokens is longer than the context of 256 tokens"):
        run_bench(exact_engine, BenchSpec(n_prompt=(300,), n_gen=(0,), repetitions=1))
    with pytest.raises(InputError, match="generating 257 tokens"):
        check_spec(BenchSpec(n_prompt=(0,), n_gen=(257,)), 256)

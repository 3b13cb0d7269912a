"""`chatglm bench`: llama-bench's phases and counts from real work, its JSON fields and table layout, clear errors."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from fixtures_bench import exact_engine  # noqa: F401  (fixture)
from fixtures_glm1 import glm1, glm1_dir, glm1_gguf, ice_model  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from chatglm.cli.app import app
from chatglm.errors import InputError
from chatglm.runtime import bench_report
from chatglm.runtime.bench import (BenchSettings, BenchSpec, BenchTest, Measurement, check_spec, random_tokens,
                                   run_bench)
from chatglm.runtime.bench_report import BOOL_FIELDS, FIELDS, FLOAT_FIELDS, INT_FIELDS, OUR_FIELDS

runner = CliRunner()
HEAD = ("| model                          |       size |     params | backend    | threads |            test |"
        "                  t/s |")
RULE = ("| ------------------------------ | ---------: | ---------: | ---------- | ------: | --------------: |"
        " -------------------: |")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_measures_what_it_says(exact_engine):
    spec = BenchSpec(n_prompt=(32, 48), n_gen=(8,), n_pg=((16, 4),), repetitions=3, warmup=True)
    before = exact_engine.n_evaluated
    calls = []
    results = run_bench(exact_engine, spec, progress=lambda *a: calls.append(a))
    assert [r.name for r in results] == ["pp32", "pp48", "tg8", "pp16+tg4"]
    # llama-bench's warm-up (the whole prompt; one generated token) and three timed repetitions, each from a
    # cleared cache: pg prefills its prompt and generates in the same timed span
    assert exact_engine.n_evaluated - before == 4 * 32 + 4 * 48 + (1 + 3 * 8) + (16 + 1 + 3 * (16 + 4))
    assert exact_engine.tokens == []
    assert calls[-1] == ("pp16+tg4", 3, 3) and len(calls) == 12
    for r in results:
        assert len(r.samples_ns) == 3 and all(type(s) is int and s > 0 for s in r.samples_ns)
        assert min(r.tps) <= r.median_tps <= max(r.tps) and all(math.isfinite(t) and 1 < t < 1e7 for t in r.tps)
        assert r.tps[0] == pytest.approx(r.n_tokens / r.seconds[0])
    assert results[-1].n_tokens == 20


def test_statistics_are_llama_benchs():
    m = Measurement(BenchTest(0, 4), [1_000_000_000, 500_000_000, 2_000_000_000])  # 4, 8, 2 tokens/s
    assert (m.median_tps, m.mean_tps) == (4.0, pytest.approx(14 / 3))
    assert m.stdev_tps == pytest.approx(float(np.std([4, 8, 2], ddof=1)))  # the sample deviation, as llama-bench's
    assert m.mean_ns == 1_166_666_666 and m.stdev_ns == int(np.std([1e9, 0.5e9, 2e9], ddof=1))
    assert Measurement(BenchTest(8, 0), [2]).stdev_tps == 0.0
    assert [BenchTest(8, 0).name, BenchTest(0, 4).name, BenchTest(8, 4).name] == ["pp8", "tg4", "pp8+tg4"]


def test_random_tokens_avoid_special_tokens(exact_engine):
    info = exact_engine.info
    ids = random_tokens(info, 5000, np.random.default_rng(0))
    assert len(ids) == 5000 and min(ids) >= 0 and max(ids) < info.n_vocab
    assert info.special and not set(ids) & set(info.special.values())


def check_record(rec: dict) -> None:
    """One record has llama-bench's fields, in its order and with its JSON types, then the samples and ours."""
    assert list(rec) == [*FIELDS, "samples_ns", "samples_ts", *OUR_FIELDS]
    for f in FIELDS:
        kind = int if f in INT_FIELDS else bool if f in BOOL_FIELDS else float if f in FLOAT_FIELDS else str
        assert type(rec[f]) is kind, f
    n = rec["n_prompt"] + rec["n_gen"]
    assert rec["samples_ts"] == pytest.approx([1e9 * n / ns for ns in rec["samples_ns"]])
    assert rec["avg_ts"] == pytest.approx(np.mean(rec["samples_ts"]))
    assert rec["avg_ns"] == pytest.approx(np.mean(rec["samples_ns"]), abs=1)


def test_json_has_llama_benchs_fields(glm3_gguf):
    r = invoke("bench", glm3_gguf, "-p", 16, "-n", 4, "-n", 6, "-pg", "8,2", "-r", 2, "-t", 1, "-o", "json")
    assert r.exit_code == 0, r.output
    recs = json.loads(r.stdout)
    assert [(x["n_prompt"], x["n_gen"]) for x in recs] == [(16, 0), (0, 4), (0, 6), (8, 2)]
    for x in recs:
        check_record(x)
        assert len(x["samples_ns"]) == 2 and x["avg_ts"] > 0
    first = recs[0]
    assert (first["n_threads"], first["n_batch"], first["n_ubatch"], first["flash_attn"]) == (1, 2048, 512, -1)
    assert (first["type_k"], first["type_v"], first["backends"], first["n_depth"]) == ("f16", "f16", "CPU", 0)
    assert first["model_type"].startswith("chatglm ") and first["model_n_params"] > 0 and first["model_size"] > 0
    assert first["engine"] == "LlamaEngine" and first["peak_rss_bytes"] > 10 * 2**20 and first["cpu_info"]
    assert first["build_commit"].startswith("llama-cpp-python ")


def test_table_is_llama_benchs(glm3_gguf):
    r = invoke("bench", glm3_gguf, "-p", 16, "-n", 4, "-pg", "8,2", "-r", 2, "-t", 1)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[:2] == [HEAD, RULE]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[2:5]]
    assert [row[5] for row in rows] == ["pp16", "tg4", "pp8+tg2"] and {row[3] for row in rows} == {"CPU"}
    assert all(row[0].startswith("chatglm ") and row[1].endswith(" MiB") and row[4] == "1" for row in rows)
    mean, _, std = rows[0][6].partition(" ± ")
    assert float(mean) > 0 and float(std) >= 0 and all(len(line) == len(HEAD) for line in lines[:5])
    assert lines[5] == "" and lines[6].startswith("build: llama-cpp-python ") and lines[6].endswith(" (0)")


def test_settings_reach_the_engine_and_the_output(glm3_gguf, monkeypatch):
    from chatglm.runtime import loader

    seen = {}
    real = loader.open_engine

    def spy(path, **kw):
        seen.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(loader, "open_engine", spy)
    r = invoke("bench", glm3_gguf, "-p", 40, "-n", 0, "-r", 1, "-t", 1, "-b", 32, "-ub", 16, "-fa", "off",
               "-ctk", "f32", "-ctv", "f32", "--no-warmup")
    assert r.exit_code == 0, r.output
    assert (seen["n_batch"], seen["flash_attn"], seen["kv_type"], seen["n_threads"]) == (16, False, "f32", 1)
    head = [c.strip() for c in r.stdout.splitlines()[0].split("|")[1:-1]]
    assert head == ["model", "size", "params", "backend", "threads", "n_batch", "n_ubatch", "type_k", "type_v",
                    "fa", "test", "t/s"]
    row = [c.strip() for c in r.stdout.splitlines()[2].split("|")[1:-1]]
    assert row[5:10] == ["32", "16", "f32", "f32", "0"]


def test_jsonl_and_csv(glm3_gguf):
    r = invoke("bench", glm3_gguf, "-p", 8, "-n", 2, "-r", 1, "-t", 1, "-o", "jsonl")
    assert r.exit_code == 0, r.output
    for line in r.stdout.splitlines():
        check_record(json.loads(line))
    r = invoke("bench", glm3_gguf, "-p", 8, "-n", 0, "-r", 1, "-t", 1, "-o", "csv")
    assert r.exit_code == 0, r.output
    rows = list(csv.reader(io.StringIO(r.stdout)))
    assert rows[0] == list(FIELDS) and len(rows) == 2 and rows[1][FIELDS.index("n_prompt")] == "8"
    assert rows[1][FIELDS.index("no_kv_offload")] == "0" and float(rows[1][FIELDS.index("avg_ts")]) > 0


def test_glm1_engine(glm1_gguf):
    r = invoke("bench", glm1_gguf, "-p", 8, "-n", 3, "-pg", "8,2", "-r", 1, "-t", 1, "--json")
    assert r.exit_code == 0, r.output
    recs = json.loads(r.stdout)
    assert [(x["n_prompt"], x["n_gen"]) for x in recs] == [(8, 0), (0, 3), (8, 2)]
    for x in recs:
        check_record(x)
    assert recs[0]["engine"] == "GLM1Engine"


def test_backend_names_and_the_gpu_column():
    assert bench_report.backends_text([("CPU", 1), ("RPC", 0)]) == "CPU"
    assert bench_report.backends_text([("CPU", 1), ("RPC", 2)]) == "RPC"
    assert bench_report.backends_text([("CUDA", 1), ("CPU", 1), ("RPC", 1)]) == "CUDA,RPC"
    rec = {f: 0 for f in FIELDS} | {"model_type": "m", "backends": "CUDA", "n_batch": 2048, "n_ubatch": 512,
                                    "type_k": "f16", "type_v": "f16", "flash_attn": -1, "n_gpu_layers": 99,
                                    "n_prompt": 4, "avg_ts": 1.0, "model_size": 2**30, "model_n_params": 10**9,
                                    "build_commit": "x"}
    head, _, row = bench_report.markdown([rec]).splitlines()[:3]
    assert [c.strip() for c in head.split("|")[1:5]] == ["model", "size", "params", "backend"]
    assert [c.strip() for c in row.split("|")[2:6]] == ["1.00 GiB", "1.00 B", "CUDA", "99"]
    assert "ngl" in head


def test_settings_defaults_are_llama_benchs():
    s = BenchSettings(n_threads=4)
    assert (s.n_batch, s.n_ubatch, s.type_k, s.flash_attn_type, s.engine_batch) == (2048, 512, "f16", -1, 512)
    assert BenchSettings(4, n_batch=64, n_ubatch=512, flash_attn=False).engine_batch == 64
    assert BenchSettings(4, flash_attn=True).flash_attn_type == 1


@pytest.mark.parametrize("args,message", [
    (["-r", 0], "--repetitions: must be between 1 and 1000, got 0"),
    (["-p", 600, "-c", 256], ("a prompt of 600 tokens is longer than the context of 256 tokens "
                              "(raise --ctx or lower --n-prompt)")),
    (["-p", 0, "-n", 0], "nothing to measure: every prompt and generation length is 0"),
    (["-n", -5], "--n-gen: must be between 0 and 16777216, got -5"),
    (["-pg", "8"], "-pg: expected PP,TG (two token counts), got '8'"),
    (["-pg", "8,0"], "-pg: both counts must be between 1 and 16777216, got '8,0'"),
    (["-ctk", "q8_0"], "--cache-type-k q8_0 and --cache-type-v f16 differ: keys and values share one cache type here"),
    (["-fa", "maybe"], None),
])
def test_bad_settings(glm3_gguf, args, message):
    r = invoke("bench", glm3_gguf, *args)
    assert r.exit_code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    if message is not None:
        assert r.stderr.strip() == f"error: {message}"


def test_missing_model(tmp_path):
    r = invoke("bench", tmp_path / "none.gguf", "-r", 1)
    assert r.exit_code == 2 and r.stderr.strip() == f"error: {tmp_path / 'none.gguf'}: file not found"


def test_context_of_the_engine_is_checked(exact_engine):
    with pytest.raises(InputError, match="a prompt of 300 tokens is longer than the context of 256 tokens"):
        run_bench(exact_engine, BenchSpec(n_prompt=(300,), n_gen=(0,), repetitions=1))
    with pytest.raises(InputError, match="generating 257 tokens"):
        check_spec(BenchSpec(n_prompt=(0,), n_gen=(257,)), 256)
    with pytest.raises(InputError, match=r"generating 100 tokens \(after a prompt of 200 tokens\)"):
        check_spec(BenchSpec(n_prompt=(0,), n_gen=(0,), n_pg=((200, 100),)), 256)

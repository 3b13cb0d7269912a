"""benchmarks/compare.py: the three sides run interleaved with the same settings, llama-bench is called with them, the
load is reported beside each run, and a missing side is a "not found" row."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import compare  # noqa: E402

from chatglm.runtime.bench import BenchSettings, BenchSpec  # noqa: E402

FAKE = """#!{python}
import json, sys
args = sys.argv[1:]
open({log!r}, "a").write(json.dumps(args) + "\\n")
get = lambda flag: [a for i, a in enumerate(args) if i and args[i - 1] == flag]
tests = [(int(p), 0) for p in get("-p")[0].split(",") if p != "0"]
tests += [(0, int(n)) for n in get("-n")[0].split(",") if n != "0"]
tests += [tuple(int(x) for x in pg.split(",")) for pg in get("-pg")]
print(json.dumps([{{"n_prompt": p, "n_gen": g, "avg_ts": 100.0 + p + g}} for p, g in tests]))
"""


def fake_llama_bench(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "calls.jsonl"
    tool = tmp_path / "llama-bench"
    tool.write_text(FAKE.format(python=sys.executable, log=str(log)))
    tool.chmod(0o755)
    return tool, log


def rows(text: str, title: str, n_key: int) -> dict[str, list[str]]:
    """The rows of the table whose header starts with ``title``, by their first ``n_key`` cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {title}"))
    out = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.split("|")[1:-1]]
        out[" ".join(cells[:n_key])] = cells
    return out


def test_three_sides_interleaved(glm3_gguf, tmp_path, capsys):
    tool, log = fake_llama_bench(tmp_path)
    out_json = tmp_path / "runs.json"
    code = compare.main(["--gguf", str(glm3_gguf), "-p", "8", "-n", "2", "-pg", "8,2", "-R", "2", "-t", "1",
                         "-ub", "256", "--llama-bench", str(tool), "--json", str(out_json)])
    assert code == 0
    text = capsys.readouterr().out
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(calls) == 2  # one llama-bench call per round, every test in it, our settings
    assert calls[0][calls[0].index("-p") + 1] == "8" and calls[0][calls[0].index("-pg") + 1] == "8,2"
    for flag, value in (("-t", "1"), ("-b", "2048"), ("-ub", "256"), ("-ctk", "f16"), ("-fa", "auto"),
                        ("-r", "1"), ("-o", "json"), ("-ngl", "0")):
        assert calls[0][calls[0].index(flag) + 1] == value, flag
    runs = json.loads(out_json.read_text())
    assert [(r["round"], r["side"]) for r in runs] == [
        (1, "chatglm bench"), (1, "llama-cpp-python"), (1, "llama-bench"),
        (2, "llama-cpp-python"), (2, "llama-bench"), (2, "chatglm bench")]  # the order rotates
    for r in runs:
        assert set(r["tps"]) == {"pp8", "tg2", "pp8+tg2"} and all(v > 0 for v in r["tps"].values())
        others = r["load"]["others"]  # None when a run is shorter than a clock tick (the tiny model's can be)
        assert r["load"]["load1"] >= 0 and (others is None or 0 <= others <= 1)
    summary = rows(text, "side", 1)
    assert summary["llama-bench"][1:4] == ["108.00", "102.00", "110.00"]  # the fake's avg_ts
    assert all(float(c) > 0 for c in summary["llama-bench"][4:] + summary["llama-cpp-python"][1:])
    assert [float(c) for c in summary["chatglm bench"][4:]] == [1.0] * 3


def test_missing_llama_bench_is_a_row(glm3_gguf, capsys):
    assert compare.main(["--gguf", str(glm3_gguf), "-p", "8", "-n", "2", "-R", "1", "-t", "1",
                         "--llama-bench", ""]) == 0
    per_run = rows(capsys.readouterr().out, "round", 2)
    assert per_run["1 llama-bench"][2] == "not found" and per_run["1 llama-bench"][-1] == "-"
    assert float(per_run["1 llama-cpp-python"][2]) > 0


def test_llama_bench_call_and_load_probe():
    spec = BenchSpec(n_prompt=(64, 0), n_gen=(0,), n_pg=((16, 4),), repetitions=3, warmup=False)
    s = BenchSettings(n_threads=2, n_batch=128, n_ubatch=64, type_k="q8_0", type_v="q8_0", flash_attn=True)
    cmd = compare.llama_bench_cmd("lb", Path("m.gguf"), spec, s)
    assert cmd == ["lb", "-m", "m.gguf", "-p", "64", "-n", "0", "-r", "3", "-t", "2", "-b", "128", "-ub", "64",
                   "-ctk", "q8_0", "-ctv", "q8_0", "-fa", "on", "-ngl", "0", "-o", "json", "-pg", "16,4",
                   "--no-warmup"]
    before, probe = compare.own_cpu_seconds(), compare.LoadProbe()
    end = time.perf_counter() + 0.1
    while time.perf_counter() < end:  # busy in this process: its own time is not counted as the others'
        pass
    load = probe.stop(compare.own_cpu_seconds() - before)
    assert load.load1 == probe.load1 >= 0 and load.others is not None and 0 <= load.others <= 1
    assert compare.Load(1.5, 0.25).text() == "1.50, 25%" and compare.Load(0.5, None).text() == "0.50, -"

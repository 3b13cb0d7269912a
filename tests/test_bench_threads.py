"""Thread counts: convert and quantize use every CPU the process may run on unless --threads says otherwise, and the
count reaches the quantizer; bench, run and serve count the physical cores of the same affinity mask."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

from chatglm.cli.app import app
from chatglm.convert import threads
from chatglm.errors import InputError
from chatglm.ggml import quants

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def quantizer_threads(monkeypatch) -> list[int]:
    """The thread count of every call into the quantizer (the real one still runs)."""
    seen: list[int] = []
    real = quants.quantize

    def spy(data, qtype, imatrix=None, threads=2):
        seen.append(threads)
        return real(data, qtype, imatrix=imatrix, threads=threads)

    monkeypatch.setattr(quants, "quantize", spy)
    return seen


def test_affinity_mask_is_respected(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert threads.usable_cpus() == 3 and threads.quant_threads(None) == 3 and threads.quant_threads(7) == 7
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # a platform without masks
    assert threads.usable_cpus() == 64
    with pytest.raises(InputError, match="positive integer, got 0"):
        threads.quant_threads(0)


def test_decode_threads_follow_the_mask(monkeypatch):
    from chatglm.cli.bench import engine_threads

    # CPUs 7, 9 and 11 have no sibling list on this machine: each counts as one core
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {7, 9, 11}, raising=False)
    assert engine_threads(None) == 3 and engine_threads(5) == 5


def test_convert_threads_reach_the_quantizer(glm3, tmp_path, quantizer_threads, monkeypatch):
    r = invoke("convert", glm3.ckpt, "-o", tmp_path / "a.gguf", "-t", "q8_0", "--threads", 3)
    assert r.exit_code == 0, r.output
    assert quantizer_threads and set(quantizer_threads) == {3}
    quantizer_threads.clear()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4}, raising=False)
    r = invoke("convert", glm3.ckpt, "-o", tmp_path / "b.gguf", "-t", "q8_0")
    assert r.exit_code == 0, r.output
    assert quantizer_threads and set(quantizer_threads) == {5}


def test_quantize_threads_reach_the_quantizer(glm3_gguf, tmp_path, quantizer_threads, monkeypatch):
    r = invoke("quantize", glm3_gguf, tmp_path / "q.gguf", "q8_0", "--threads", 4)
    assert r.exit_code == 0, r.output
    assert quantizer_threads and set(quantizer_threads) == {4}
    quantizer_threads.clear()
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {2, 6}, raising=False)
    r = invoke("quantize", glm3_gguf, tmp_path / "r.gguf", "q8_0")
    assert r.exit_code == 0, r.output
    assert quantizer_threads and set(quantizer_threads) == {2}


def test_threads_option_is_checked(glm3_gguf, tmp_path):
    r = invoke("quantize", glm3_gguf, tmp_path / "q.gguf", "q8_0", "--threads", 0)
    assert r.exit_code == 2 and r.stderr.strip() == "error: --threads: must be between 1 and 512, got 0"
    assert not (tmp_path / "q.gguf").exists()

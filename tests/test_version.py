"""`chatglm --version`: versions and the backends compiled in."""

from __future__ import annotations

import llama_cpp
from typer.testing import CliRunner

import chatglm
from chatglm.cli.app import app
from chatglm.cli.version import backends


def test_backends_are_read_from_llama_cpp_system_info():
    info = "CPU : SSE3 = 1 | AVX512 = 0 | LLAMAFILE = 1 | CUDA : ARCHS = 890 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | "
    assert backends(info) == {"CPU": ["SSE3", "LLAMAFILE"],
                              "CUDA": ["ARCHS=890", "USE_GRAPHS", "PEER_MAX_BATCH_SIZE=128"]}
    assert backends("") == {}


def test_version():
    r = CliRunner().invoke(app, ["--version"])
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0] == f"chatglm {chatglm.__version__}" and lines[1] == f"llama-cpp-python {llama_cpp.__version__}"
    assert lines[2].split()[0] == "CPU" and lines[-1].startswith("  GPU offload ")

"""The CLI end to end, and bad inputs: one line naming the file, exit code 2, no output left behind."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chatglm.cli.app import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_convert_then_run_is_deterministic(glm3, tmp_path):
    out = tmp_path / "m.gguf"
    r = invoke("convert", glm3.ckpt, "-o", out, "-t", "q8_0")
    assert r.exit_code == 0, r.output
    assert out.is_file() and "wrote" in r.output and "q8_0" in r.output
    runs = [invoke("run", out, "-p", "你好", "--temp", "0", "-n", "12") for _ in range(2)]
    assert all(r.exit_code == 0 for r in runs), runs[0].output
    assert runs[0].output == runs[1].output and runs[0].output.strip()


def test_run_json(glm3_gguf):
    r = invoke("run", glm3_gguf, "-p", "hello", "--temp", "0", "-n", "5", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["reply"]["role"] == "assistant" and data["usage"]["completion_tokens"] <= 5


def copy_ckpt(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def corrupt_cases(ckpt: Path, tmp: Path):
    """(name, folder, file the error must name) for each bad input of the foundation issue."""
    def case(name, mutate, named):
        folder = copy_ckpt(ckpt, tmp / name)
        mutate(folder)
        return name, folder, named

    def truncate(folder):
        st = folder / "model.safetensors"
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])

    def offsets_past_end(folder):
        st = folder / "model.safetensors"
        raw = st.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        name = next(k for k in header if k != "__metadata__")
        begin, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [begin + 10**9, end + 10**9]
        blob = json.dumps(header).encode()
        st.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n:])

    def missing_shard(folder):
        st = folder / "model.safetensors"
        names = list(json.loads(st.read_bytes()[8:8 + struct.unpack("<Q", st.read_bytes()[:8])[0]]))
        index = {"metadata": {}, "weight_map": {n: "model-00001-of-00002.safetensors" for n in names if n[0] != "_"}}
        index["weight_map"]["transformer.output_layer.weight"] = "model-00002-of-00002.safetensors"
        st.rename(folder / "model-00001-of-00002.safetensors")
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))

    def wrong_shape(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg["ffn_hidden_size"] += 32
        (folder / "config.json").write_text(json.dumps(cfg))

    def unknown_arch(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
        (folder / "config.json").write_text(json.dumps(cfg))

    return [
        case("no-config", lambda f: (f / "config.json").unlink(), "config.json"),
        case("no-tokenizer", lambda f: (f / "tokenizer.model").unlink(), "tokenizer.model"),
        case("unknown-arch", unknown_arch, "config.json"),
        case("truncated", truncate, "model.safetensors"),
        case("offsets-past-end", offsets_past_end, "model.safetensors"),
        case("missing-shard", missing_shard, "model-00002-of-00002.safetensors"),
        case("wrong-shape", wrong_shape, "dense_h_to_4h"),
        case("not-json", lambda f: (f / "config.json").write_text("{oops"), "config.json"),
    ]


def test_bad_checkpoints_fail_cleanly(glm3, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for name, folder, named in corrupt_cases(glm3.ckpt, tmp_path):
        r = invoke("convert", folder, "-o", out_dir / f"{name}.gguf", "-t", "q4_0")
        lines = r.output.strip().splitlines()
        assert r.exit_code == 2, (name, r.output)
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], (name, r.output)
        assert "Traceback" not in r.output
    assert list(out_dir.iterdir()) == []  # no output, no temporary file


def test_unknown_type_lists_valid_ones(glm3, tmp_path):
    r = invoke("convert", glm3.ckpt, "-o", tmp_path / "x.gguf", "-t", "q9_9")
    assert r.exit_code == 2 and "q4_k_m" in r.output and "q8_0" in r.output
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf at all" * 10])
def test_run_rejects_non_gguf(tmp_path, content):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(content)
    r = invoke("run", bad, "-p", "hi")
    assert r.exit_code == 2 and r.output.startswith("error: ") and str(bad) in r.output

"""Memory: the estimate against llama.cpp's own buffer sizes, and repacked weights resident once, not twice."""

from __future__ import annotations

import logging
import re

import pytest

from chatglm.convert.pipeline import convert
from chatglm.gguf_file import read_header
from chatglm.runtime import pages
from chatglm.runtime.memory import estimate
from chatglm.runtime.model import load

from conftest import make_tiny


@pytest.fixture(scope="module")
def q4_model(workdir, sp_model):
    """Big enough that its quantized matrices span whole pages: 2 layers, hidden 256, FFN 1024."""
    tiny = make_tiny(workdir, sp_model, "chatglm3", seed=7, hidden_size=256, intermediate_size=1024,
                     num_attention_heads=8, num_key_value_heads=2, head_dim=32)
    return convert(tiny.ckpt, workdir / "mem-q4_0.gguf", "q4_0").path


class NativeLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def mib(self, what: str) -> float:
        found = [float(m.group(1)) for line in self.lines if (m := re.search(what + r" size = +([\d.]+) MiB", line))]
        assert found, f"llama.cpp logged no {what!r}"
        return found[-1]


@pytest.fixture
def native_log():
    logger = logging.getLogger("llama.cpp")
    handler, level = NativeLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.parametrize("n_ctx,flash", [(512, True), (4096, True), (4096, False), (16384, False)])
def test_estimate_matches_llama_cpp_buffers(q4_model, native_log, n_ctx, flash):
    est = estimate(read_header(q4_model), n_ctx, "f16", flash_attn=flash)
    with load(q4_model, n_ctx=n_ctx, kv_type="f16", flash_attn=flash, n_threads=1):
        kv = native_log.mib("KV buffer")
        compute = native_log.mib("compute buffer") + native_log.mib("output buffer")
    assert est.kv_cache / 2**20 == pytest.approx(kv, rel=0.01)
    assert est.compute / 2**20 == pytest.approx(compute, rel=0.08)


def test_repacked_weights_are_resident_once(q4_model, native_log):
    header = read_header(q4_model)
    with load(q4_model, n_ctx=512, n_threads=1) as m:
        repacked = [line.split()[3] for line in native_log.lines if line.startswith("repack: repack tensor ")]
        expected = sum((pages.inner_pages(header.data_offset + header.tensors[n].offset,
                                          header.tensors[n].nbytes) or (0, 0))[1] for n in repacked)
        assert m.engine.released_bytes == expected
        m.generate("你好", max_tokens=4, temperature=0)  # the weights in use, after a real decode
        resident = mapped_rss(q4_model)
    # the file's pages held by this process: not the pages the repacked copies replaced (a few may be faulted back
    # in by the kernel's read-around when neighbouring small tensors are read)
    assert resident <= header.file_size - 0.8 * expected + 2 * pages.PAGE
    if repacked:  # on x86-64 with AVX2 (and Arm with dot products) llama.cpp repacks the q4_0 matrices
        assert expected > header.file_size // 2


def mapped_rss(path) -> int:
    """Resident bytes of this process's mappings of ``path`` (from /proc/self/smaps)."""
    target, total, inside = str(path.resolve()), 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip("\n").endswith(target)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def test_inner_pages():
    assert pages.inner_pages(0, 8192, 4096) == (0, 8192)
    assert pages.inner_pages(1, 8192, 4096) == (4096, 4096)
    assert pages.inner_pages(100, 4000, 4096) is None
    assert pages.inner_pages(4096, 4095, 4096) is None


def test_file_mappings_parses_proc_maps(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    maps = (f"7f0000000000-7f0000004000 r--s 00000000 08:01 12 {f}\n"
            f"7f0000008000-7f0000009000 r--s 00010000 08:01 12 {f}\n"
            "7f000000a000-7f000000b000 r-xp 00000000 08:01 13 /usr/lib/libc.so.6\n"
            "7f000000c000-7f000000d000 rw-p 00000000 00:00 0 \n")
    assert pages.file_mappings(f, maps) == [(0x7F0000000000, 0x7F0000004000, 0),
                                            (0x7F0000008000, 0x7F0000009000, 0x10000)]

#!/usr/bin/env python
"""Synthetic GGUFs with the real shapes of ChatGLM-6B, ChatGLM3-6B and GLM-4-9B, benchmarked in one table.

Each GGUF is what ``chatglm convert`` writes for that model: the family's converter runs unchanged on a weightless
checkpoint (``chatglm.devtools.weightless``: config.json with the published shapes, the published tensor names and
shapes, a tiny trained tokenizer padded to the real vocabulary size; see shapes.py), and tensor types follow
llama.cpp's recipe for the chosen type. The GLM-4.7 / 4.7-Flash / 5.3 / 5.3-Flash rows of shapes.py (cut to fewer
layers and experts) can be named with ``--models`` too (``benchmarks/real_shapes.py`` compares them with llama.cpp). Only the weights are synthetic: random rows quantized once by
ggml and repeated, so building a 6 GB file costs about as long as writing it. Files are cached under
``benchmarks/.cache/`` (git ignores it); ``--shape small`` uses scaled-down models for a quick run.

Every model is measured by ``chatglm bench -o json`` in a child process of this one, one after another; the table
gives pp/tg tokens/s (median ± stdev of the repetitions) and the child's peak RSS (touched model pages included).

    python benchmarks/bench_models.py                      # real shapes, q4_0 q4_k_m q8_0, pp512 tg128
    python benchmarks/bench_models.py --shape small -r 2
    python benchmarks/bench_models.py --models chatglm3-6b --types q4_0 -t 2 --json results.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import gguf
import numpy as np

from chatglm.convert import qtypes
from chatglm.convert.family import check_complete
from chatglm.convert.pipeline import _plan_types, write_model_metadata
from chatglm.convert.ptuning import write_prefix
from chatglm.fsutil import atomic_path
from chatglm.ggml import quants
from chatglm.runtime.bench_report import test_name

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import (CHATGLM3_1B, REAL, SHAPE_SETS, SMALL, HFShape, NotMerged, Shape, family_for,  # noqa: E402,F401
                    published_config, write_tokenizer)

log = logging.getLogger("bench_models")

CACHE = Path(__file__).resolve().parent / ".cache"
TYPES = ("q4_0", "q4_k_m", "q8_0")
_BLOCK_ROWS = 256  # random rows quantized per (type, row length); tensors repeat them


# ------------------------------------------------------------------------------------------------ synthetic GGUF
class RowBank:
    """Random rows quantized once per (type, row length), repeated to fill any tensor of that type and width."""

    def __init__(self, seed: int, threads: int):
        self.rng = np.random.default_rng(seed)
        self.threads = threads
        self.blocks: dict[tuple[gguf.GGMLQuantizationType, int], np.ndarray] = {}

    def tensor(self, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> np.ndarray:
        if len(shape) == 1:  # norms and biases (f32)
            base = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
            return (base + 0.02 * self.rng.standard_normal(shape[0])).astype(np.float32)
        rows, cols = int(np.prod(shape[:-1])), shape[-1]
        key = (qtype, cols)
        if key not in self.blocks:
            data = (self.rng.standard_normal((_BLOCK_ROWS, cols)) / np.sqrt(cols)).astype(np.float32)
            if qtype == gguf.GGMLQuantizationType.F32:
                self.blocks[key] = data
            elif qtype == gguf.GGMLQuantizationType.F16:
                self.blocks[key] = data.astype(np.float16)
            else:
                self.blocks[key] = quants.quantize(data, qtype, threads=self.threads)  # (rows, row bytes)
        block = self.blocks[key]
        return np.resize(block, (rows, block.shape[1]))  # block rows repeated cyclically


def build_gguf(shape: Shape | HFShape, qtype: str, out_dir: Path, *, threads: int = 2, seed: int = 0,
               header_only: bool = False, prefix: Optional[np.ndarray] = None) -> Path:
    """The synthetic GGUF of ``shape`` in ``qtype`` (cached: an existing file is reused). The family's converter
    plans it from the weightless checkpoint (its checks included); ``header_only`` stops after the header;
    ``prefix`` is a P-Tuning v2 prefix written into its metadata (benchmarks/ptuning.py)."""
    tag = f"-pt{prefix.shape[2]}" if prefix is not None else ""
    dest = out_dir / f"{shape.name}-{qtype}{tag}{'-header' if header_only else ''}.gguf"
    if dest.is_file():
        return dest
    out_dir.mkdir(parents=True, exist_ok=True)
    family = family_for(shape, CACHE / "stubs")
    recipe = qtypes.get_recipe(qtype)
    plan = family.tensors()
    # the language model only: a vision tower (GLM-5.3-Flash's) is benchmarked apart, in benchmarks/vision.py
    family.ignored_sources = (*family.ignored_sources, r"model\.visual\..+")
    check_complete(family, plan)
    family.check_shapes(plan)
    planned = _plan_types(family, plan, recipe, has_imatrix=False)
    bank = RowBank(seed, threads)
    start = time.perf_counter()
    with atomic_path(dest) as tmp:
        w = gguf.GGUFWriter(tmp, family.arch)
        write_model_metadata(w, family, recipe, f"synthetic {shape.name}",
                             "benchmarks/bench_models.py (synthetic weights)")
        if prefix is not None:
            write_prefix(w, prefix)
        for p in planned:
            w.add_tensor_info(p.tensor.name, p.tensor.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        if not header_only:
            for p in planned:
                w.write_tensor_data(bank.tensor(p.tensor.name, p.tensor.shape, p.qtype))
        w.close()
    log.info("built %s (%.2f GiB) in %.0fs", dest, dest.stat().st_size / 2**30, time.perf_counter() - start)
    return dest


# ------------------------------------------------------------------------------------------------ measuring
def bench_child(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``chatglm bench --json`` on one model in a child process; its report (or an "error")."""
    cmd = [sys.executable, "-c", "from chatglm.cli.app import main; main()", "bench", str(path),
           "-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", str(args.repetitions), "-o", "json"]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]}
    return json.loads(proc.stdout)


def table(rows: list[dict[str, Any]], n_prompt: int, n_gen: int) -> str:
    head = ["model", "type", "size", f"pp{n_prompt} t/s", f"tg{n_gen} t/s", "peak RSS"]
    lines = []
    for r in rows:
        rep = r["report"]  # chatglm bench's llama-bench records, one per test
        if "error" in rep:
            lines.append([r["model"], r["type"], "-", "-", "-", f"error: {rep['error']}"])
            continue
        tps = {test_name(x["n_prompt"], x["n_gen"]): f"{x['median_ts']:.2f} ± {x['stddev_ts']:.2f}" for x in rep}
        lines.append([r["model"], r["type"], size(rep[0]["model_size"]), tps.get(f"pp{n_prompt}", "-"),
                      tps.get(f"tg{n_gen}", "-"), size(max(x["peak_rss_bytes"] for x in rep))])
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in lines])


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, Python {platform.python_version()}, llama-cpp-python 0.3.36"


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPE_SETS), default="real")
    p.add_argument("--models", default=",".join(REAL),
                   help="comma-separated: " + ", ".join(SHAPE_SETS["real"]))
    p.add_argument("--types", default=",".join(TYPES), help="comma-separated GGUF types")
    p.add_argument("-p", "--n-prompt", type=int, default=512)
    p.add_argument("-n", "--n-gen", type=int, default=128)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", type=int, default=0, help="default: chatglm bench's (physical cores)")
    p.add_argument("--build-only", action="store_true", help="build the GGUFs, measure nothing")
    p.add_argument("--no-cache", action="store_true",
                   help="delete each GGUF this run built once it is measured (real shapes: 3-10 GB each)")
    p.add_argument("--json", type=Path, help="also write every report to this file")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    args = parse_args(argv)
    shapes = SHAPE_SETS[args.shape]
    unknown = [m for m in args.models.split(",") if m not in shapes]
    if unknown:
        print(f"unknown model(s) {unknown}; choose from {', '.join(shapes)}", file=sys.stderr)
        return 2
    rows = []
    for name in args.models.split(","):
        for qtype in args.types.split(","):
            cached = (CACHE / args.shape / f"{name}-{qtype}.gguf").is_file()
            try:
                path = build_gguf(shapes[name], qtype, CACHE / args.shape)
            except NotMerged as exc:
                rows.append({"model": name, "type": qtype, "report": {"error": "family not merged yet"}})
                log.info("%s", exc)
                continue
            except Exception as exc:  # a family or engine not available yet: one row says so
                log.exception("could not build %s %s", name, qtype)
                rows.append({"model": name, "type": qtype, "report": {"error": f"build failed: {exc}"}})
                continue
            if args.build_only:
                continue
            log.info("measuring %s", path.name)
            rows.append({"model": name, "type": qtype, "report": bench_child(path, args)})
            if args.no_cache and not cached:
                path.unlink()
    if args.build_only:
        return 0
    print(f"Synthetic {args.shape}-shape GGUFs; {machine()}; "
          f"threads: {args.threads or 'physical cores'}; {args.repetitions} repetitions; median ± stdev\n")
    print(table(rows, args.n_prompt, args.n_gen))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0 if all("error" not in r["report"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Synthetic GGUFs with the real shapes of ChatGLM-6B, ChatGLM3-6B and GLM-4-9B, benchmarked in one table.

Each GGUF is what ``chatglm convert`` writes for that model: the family's own metadata and vocabulary writers run on a
config.json with the published shapes (and a tiny trained tokenizer padded to the real vocabulary size), and tensor
types follow llama.cpp's recipe for the chosen type. Only the weights are synthetic: random rows quantized once by
ggml and repeated, so building a 6 GB file costs about as long as writing it. Files are cached under
``benchmarks/.cache/`` (git ignores it); ``--shape small`` uses scaled-down models for a quick run.

Every model is measured by ``chatglm bench --json`` in a child process of this one, one after another; the table
gives pp/tg tokens/s (median of the repetitions) and the child's peak RSS (touched model pages included).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import gguf
import numpy as np

from chatglm.convert import qtypes
from chatglm.convert.family import Family, detect
from chatglm.convert.pipeline import write_model_metadata
from chatglm.fsutil import atomic_path
from chatglm.ggml import quants

log = logging.getLogger("bench_models")

CACHE = Path(__file__).resolve().parent / ".cache"
TYPES = ("q4_0", "q4_k_m", "q8_0")
_BLOCK_ROWS = 256  # random rows quantized per (type, row length); tensors repeat them


@dataclass(frozen=True)
class Shape:
    """The config.json numbers that set a model's cost (published values for the real shapes)."""

    name: str
    family: str  # chatglm3 | glm4 | chatglm1
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    ctx: int
    rope_ratio: float = 1.0
    eps: float = 1e-5


REAL = {s.name: s for s in (
    Shape("chatglm-6b", "chatglm1", 4096, 28, 32, 32, 16384, 130528, 2048),
    Shape("chatglm3-6b", "chatglm3", 4096, 28, 32, 2, 13696, 65024, 8192),
    Shape("glm4-9b", "glm4", 4096, 40, 32, 2, 13696, 151552, 131072, rope_ratio=500.0, eps=1.5625e-07),
)}
SMALL = {s.name: s for s in (
    Shape("chatglm-6b", "chatglm1", 256, 28, 4, 4, 1024, 4096, 2048),  # GLM-1 keeps 28 layers (alpha = sqrt(56))
    Shape("chatglm3-6b", "chatglm3", 256, 2, 4, 2, 704, 4096, 8192),
    Shape("glm4-9b", "glm4", 256, 2, 4, 2, 704, 8192, 131072, rope_ratio=500.0, eps=1.5625e-07),
)}
# A ~1.3B ChatGLM3 shape (benchmarks/python_overhead.py).
CHATGLM3_1B = Shape("chatglm3-1.3b", "chatglm3", 2048, 24, 16, 2, 5632, 65024, 8192)
SHAPE_SETS = {"real": REAL, "small": SMALL}


# ------------------------------------------------------------------------------------------------ checkpoint stubs
def published_config(shape: Shape) -> dict[str, Any]:
    if shape.family == "chatglm1":
        return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "position_encoding_2d": True,
                "hidden_size": shape.hidden, "inner_hidden_size": shape.ffn, "num_attention_heads": shape.heads,
                "num_layers": shape.layers, "vocab_size": shape.vocab, "max_sequence_length": shape.ctx,
                "layernorm_epsilon": shape.eps}
    return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "padded_vocab_size": shape.vocab,
            "multi_query_attention": True, "multi_query_group_num": shape.kv_heads, "hidden_size": shape.hidden,
            "num_attention_heads": shape.heads, "kv_channels": shape.hidden // shape.heads,
            "num_layers": shape.layers, "ffn_hidden_size": shape.ffn, "seq_length": shape.ctx,
            "layernorm_epsilon": shape.eps, "add_qkv_bias": True, "add_bias_linear": False, "rmsnorm": True,
            "apply_residual_connection_post_layernorm": False, "post_layer_norm": True, "original_rope": True,
            **({"rope_ratio": shape.rope_ratio} if shape.rope_ratio != 1.0 else {})}


def write_tokenizer(family: str, folder: Path) -> None:
    """A tiny trained tokenizer in the family's published file layout (the family pads it to the vocab size)."""
    if family == "chatglm3":
        from chatglm.devtools.checkpoints import CHATGLM3_TEMPLATE, train_sentencepiece
        from chatglm.devtools.corpus import bilingual_corpus

        train_sentencepiece(folder / "tokenizer.model", bilingual_corpus())
        config = {"chat_template": CHATGLM3_TEMPLATE}
    elif family == "glm4":
        from chatglm.devtools.glm4 import FIXTURE_TEMPLATES, tokenizer_config, train_glm4_bpe, write_tiktoken

        tok = train_glm4_bpe()
        write_tiktoken(tok, folder / "tokenizer.model")
        config = tokenizer_config(tok, FIXTURE_TEMPLATES["glm4"])
    elif family == "chatglm1":
        from chatglm.devtools.glm1 import train_ice_tokenizer

        train_ice_tokenizer(folder / "ice_text.model")
        config = {"num_image_tokens": 0}
    else:
        raise ValueError(f"no tokenizer recipe for family {family!r}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


class StubCheckpoint:
    """What a Family reads of a checkpoint (config.json, tokenizer files, tensor names), without the weights."""

    def __init__(self, folder: Path, config: dict[str, Any]):
        self.dir = folder
        self.config = config

    def names(self) -> list[str]:
        return ["lm_head.weight"]  # an untied output head (ChatGLM-6B ships one)


def family_for(shape: Shape) -> Family:
    folder = CACHE / "stubs" / f"{shape.family}-{shape.hidden}x{shape.layers}"
    config = published_config(shape)
    if not (folder / "tokenizer_config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        write_tokenizer(shape.family, folder)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    family = detect(StubCheckpoint(folder, config))
    if family.name != shape.family:
        raise RuntimeError(f"{shape.name}: the stub was detected as {family.name}, not {shape.family}")
    return family


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


def build_gguf(shape: Shape, qtype: str, out_dir: Path, *, threads: int = 2, seed: int = 0) -> Path:
    """The synthetic GGUF of ``shape`` in ``qtype`` (cached: an existing file is reused)."""
    dest = out_dir / f"{shape.name}-{qtype}.gguf"
    if dest.is_file():
        return dest
    out_dir.mkdir(parents=True, exist_ok=True)
    family = family_for(shape)
    recipe = qtypes.get_recipe(qtype)
    plan = family.tensors()
    hp = family.hp
    types = qtypes.plan_types(recipe, [(t.name, t.shape) for t in plan],
                              qtypes.ModelInfo(family.arch, hp.n_layer, hp.n_head, hp.n_head_kv))
    bank = RowBank(seed, threads)
    start = time.perf_counter()
    with atomic_path(dest) as tmp:
        w = gguf.GGUFWriter(tmp, family.arch)
        write_model_metadata(w, family, recipe, f"synthetic {shape.name}",
                             "benchmarks/bench_models.py (synthetic weights)")
        for t in plan:
            qt = types[t.name]
            w.add_tensor_info(t.name, t.shape, np.dtype(np.float32), quants.tensor_nbytes(qt, t.shape), raw_dtype=qt)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t in plan:
            w.write_tensor_data(bank.tensor(t.name, t.shape, types[t.name]))
        w.close()
    log.info("built %s (%.2f GiB) in %.0fs", dest, dest.stat().st_size / 2**30, time.perf_counter() - start)
    return dest


# ------------------------------------------------------------------------------------------------ measuring
def bench_child(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``chatglm bench --json`` on one model in a child process; its report (or an "error")."""
    cmd = [sys.executable, "-c", "from chatglm.cli.app import main; main()", "bench", str(path),
           "-p", str(args.n_prompt), "-n", str(args.n_gen), "-r", str(args.repetitions), "--json"]
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
        rep = r["report"]
        if "error" in rep:
            lines.append([r["model"], r["type"], "-", "-", "-", f"error: {rep['error']}"])
            continue
        tps = {x["test"]: f"{x['median_tps']:.2f} ± {x['stdev_tps']:.2f}" for x in rep["results"]}
        lines.append([r["model"], r["type"], size(rep["model"]["size_bytes"]), tps.get(f"pp{n_prompt}", "-"),
                      tps.get(f"tg{n_gen}", "-"), size(rep["peak_rss_bytes"])])
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
    p.add_argument("--models", default=",".join(REAL), help="comma-separated: " + ", ".join(REAL))
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

#!/usr/bin/env python
"""Conversion benchmark: a synthetic bf16 checkpoint with ChatGLM3-6B's exact shapes, converted to q8_0, q4_0, q4_k_m.

The checkpoint is what THUDM/chatglm3-6b publishes, weights aside: its config.json, the published tensor names and
shapes in 7 bf16 safetensors shards with an index, and a small trained SentencePiece tokenizer (the converter pads the
vocabulary to 65024). Weights are random rows (N(0, 1/cols), rounded to bf16) repeated from a bank, written with numpy
(no torch). It is built once and cached under ``benchmarks/.cache/`` (git ignores it).

Every step runs in a child process (``python -m chatglm.cli ...``); the table gives its wall time, the throughput in
MB/s of checkpoint input (10^6 bytes), and its peak RSS (``wait4``'s ``ru_maxrss`` for that child alone). The
two-step baseline for q4_0, ``chatglm convert -t f16`` then llama.cpp's ``llama_model_quantize`` (llama-cpp-python),
runs in the same invocation, so the ratio to the one-step q4_0 conversion is measured on the same machine state;
``chatglm quantize`` of the same f16 file is shown too.

    python benchmarks/convert.py                  # ChatGLM3-6B shape: ~12.5 GB of bf16 input, ~25 GB of outputs
    python benchmarks/convert.py --shape small    # a quick run of the same steps
    python benchmarks/convert.py --types q4_0 --no-baseline --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_models, beside this file

from bench_models import REAL, SMALL, Shape, machine, published_config, size, write_tokenizer  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
TYPES = ("q8_0", "q4_0", "q4_k_m")
N_SHARDS = 7
BANK_ROWS = 1024  # distinct random rows per row length
WRITE_ELEMENTS = 1 << 24  # bf16 elements written at a time (32 MiB)
RSS_TARGET = 1.5e9

# llama.cpp's own quantizer, as the second step of the two-step baseline: argv = input, output, ftype, threads.
LLAMA_QUANTIZE = """
import ctypes, sys, llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread = int(sys.argv[3]), int(sys.argv[4])
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(1 if rc else 0)
"""


# ------------------------------------------------------------------------------------------------ the checkpoint
def tensor_table(shape: Shape) -> list[tuple[str, tuple[int, ...]]]:
    """ChatGLM3's published tensor names and shapes, in the published order."""
    e, head_dim = shape.hidden, shape.hidden // shape.heads
    qkv = e + 2 * shape.kv_heads * head_dim
    out = [("transformer.embedding.word_embeddings.weight", (shape.vocab, e)),
           ("transformer.rotary_pos_emb.inv_freq", (head_dim // 4,))]
    for i in range(shape.layers):
        layer = f"transformer.encoder.layers.{i}."
        out += [(layer + "input_layernorm.weight", (e,)),
                (layer + "self_attention.query_key_value.weight", (qkv, e)),
                (layer + "self_attention.query_key_value.bias", (qkv,)),
                (layer + "self_attention.dense.weight", (e, e)),
                (layer + "post_attention_layernorm.weight", (e,)),
                (layer + "mlp.dense_h_to_4h.weight", (2 * shape.ffn, e)),
                (layer + "mlp.dense_4h_to_h.weight", (e, shape.ffn))]
    return out + [("transformer.encoder.final_layernorm.weight", (e,)),
                  ("transformer.output_layer.weight", (shape.vocab, e))]


def split_shards(table: list[tuple[str, tuple[int, ...]]], n: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of about equal bytes, as ``save_pretrained(max_shard_size=...)`` cuts them."""
    total = sum(2 * int(np.prod(s)) for _, s in table)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    done = 0
    for name, shape in table:
        if shards[-1] and done >= total * len(shards) / n and len(shards) < n:
            shards.append([])
        shards[-1].append((name, shape))
        done += 2 * int(np.prod(shape))
    return shards


class Bank:
    """Random bf16 rows, N(0, 1/cols), per row length; tensors take them cyclically from a per-tensor offset."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.rows: dict[int, np.ndarray] = {}

    def bf16_rows(self, cols: int) -> np.ndarray:
        if cols not in self.rows:
            f32 = (self.rng.standard_normal((BANK_ROWS, cols)) / np.sqrt(cols)).astype(np.float32)
            bits = f32.view(np.uint32)
            self.rows[cols] = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
        return self.rows[cols]

    def blocks(self, name: str, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
        """The tensor's bf16 bits, a block of rows at a time."""
        if len(shape) == 1:
            base = 1.0 if name.endswith("norm.weight") else 0.0
            values = (base + 0.02 * self.rng.standard_normal(shape[0])).astype(np.float32)
            yield (values.view(np.uint32) >> 16).astype(np.uint16)
            return
        rows, cols = shape
        bank, offset = self.bf16_rows(cols), int(self.rng.integers(BANK_ROWS))
        step = max(1, WRITE_ELEMENTS // cols)
        for first in range(0, rows, step):
            yield bank[(np.arange(first, min(rows, first + step)) + offset) % BANK_ROWS]  # (block rows, cols)


def write_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], bank: Bank) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            for block in bank.blocks(name, shape):
                fh.write(np.ascontiguousarray(block, dtype="<u2").tobytes())


def build_checkpoint(shape: Shape) -> Path:
    """The cached checkpoint folder of ``shape`` (built when missing or incomplete)."""
    folder = CACHE / f"{shape.name}-{shape.hidden}x{shape.layers}-bf16"
    done = folder / "complete.json"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    start = time.perf_counter()
    (folder / "config.json").write_text(json.dumps({**published_config(shape), "torch_dtype": "bfloat16"}, indent=2))
    write_tokenizer("chatglm3", folder)
    shards = split_shards(tensor_table(shape), N_SHARDS)
    bank, weight_map = Bank(), {}
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_shard(folder / name, tensors, bank)
        weight_map.update({t: name for t, _ in tensors})
        print(f"  wrote {name} ({size((folder / name).stat().st_size)})", flush=True)
    index = {"metadata": {"total_size": sum(2 * int(np.prod(s)) for s in dict(tensor_table(shape)).values())},
             "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    done.write_text(json.dumps({"shape": asdict(shape), "seconds": time.perf_counter() - start}))
    return folder


def input_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ measuring
@dataclass
class Run:
    step: str
    seconds: float
    peak_rss: int  # bytes
    output_bytes: int
    error: str = ""


def run_child(step: str, cmd: list[str], output: Path) -> Run:
    """``cmd`` in a child process: its wall time and its own peak RSS (wait4), or its last error line."""
    print(f"  {step} ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    error = "" if proc.returncode == 0 else (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    out_bytes = output.stat().st_size if output.is_file() else 0
    return Run(step, seconds, usage.ru_maxrss * 1024, out_bytes, error)


def chatglm(*args: object) -> list[str]:
    return [sys.executable, "-m", "chatglm.cli", *map(str, args)]


def measure(ckpt: Path, out_dir: Path, types: list[str], threads: int, baseline: bool, keep: bool) -> list[Run]:
    runs = []
    for qtype in types:
        out = out_dir / f"direct-{qtype}.gguf"
        runs.append(run_child(f"convert -t {qtype}", chatglm("convert", ckpt, "-o", out, "-t", qtype,
                                                             "--threads", threads), out))
        if not keep:
            out.unlink(missing_ok=True)
    if baseline:
        import gguf

        f16, q4 = out_dir / "two-step-f16.gguf", out_dir / "two-step-q4_0.gguf"
        runs.append(run_child("convert -t f16", chatglm("convert", ckpt, "-o", f16, "-t", "f16"), f16))
        ftype = int(gguf.LlamaFileType.MOSTLY_Q4_0)
        runs.append(run_child("  + llama_model_quantize q4_0", [sys.executable, "-c", LLAMA_QUANTIZE, str(f16),
                                                                str(q4), str(ftype), str(threads)], q4))
        q4.unlink(missing_ok=True)
        runs.append(run_child("  + chatglm quantize q4_0", chatglm("quantize", f16, q4, "q4_0", "--threads", threads),
                              q4))
        for path in (f16, q4):
            if not keep:
                path.unlink(missing_ok=True)
    return runs


def table(runs: list[Run], n_input: int) -> str:
    head = ["step", "wall", "MB/s of input", "peak RSS", "output"]
    rows = [[r.step, f"{r.seconds:.1f} s", f"{n_input / 1e6 / r.seconds:.0f}", size(r.peak_rss),
             size(r.output_bytes) if not r.error else f"error: {r.error}"] for r in runs]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in rows])


def summary(runs: list[Run]) -> list[str]:
    by_step = {r.step: r for r in runs}
    lines = []
    direct, f16 = by_step.get("convert -t q4_0"), by_step.get("convert -t f16")
    llama = by_step.get("  + llama_model_quantize q4_0")
    if direct and f16 and llama and not (direct.error or f16.error or llama.error):
        two = f16.seconds + llama.seconds
        lines.append(f"q4_0 in one step: {direct.seconds:.1f} s; f16 convert + llama_model_quantize: "
                     f"{f16.seconds:.1f} + {llama.seconds:.1f} = {two:.1f} s (one step takes {direct.seconds / two:.0%})")
    worst = max((r.peak_rss for r in runs if r.step.startswith("convert -t q")), default=0)
    lines.append(f"largest peak RSS of the quantizing conversions: {size(worst)} (target {RSS_TARGET / 1e9:.1f} GB: "
                 f"{'met' if worst <= RSS_TARGET else 'MISSED'})")
    return lines


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("real", "small"), default="real", help="ChatGLM3-6B's shapes or a small model")
    p.add_argument("--types", default=",".join(TYPES), help="comma-separated output types (default: %(default)s)")
    p.add_argument("-t", "--threads", type=int, default=os.cpu_count() or 2, help="quantization threads")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip f16 + separate quantize")
    p.add_argument("--keep", action="store_true", help="keep the output GGUFs (default: delete each after its run)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    shape = (REAL if args.shape == "real" else SMALL)["chatglm3-6b"]
    print(f"building (or reusing) the {shape.name} bf16 checkpoint under {CACHE} ...", flush=True)
    ckpt = build_checkpoint(shape)
    n_input = input_bytes(ckpt)
    out_dir = CACHE / "convert-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    runs = measure(ckpt, out_dir, args.types.split(","), args.threads, args.baseline, args.keep)
    load_after = os.getloadavg()
    print(f"\n{shape.name} shape, {N_SHARDS} bf16 safetensors shards, {n_input / 1e9:.2f} GB of input; {machine()}; "
          f"{args.threads} threads; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    print(table(runs, n_input))
    print("\n" + "\n".join(summary(runs)))
    if args.json:
        args.json.write_text(json.dumps({"shape": asdict(shape), "input_bytes": n_input, "machine": machine(),
                                         "threads": args.threads, "load_before": load_before,
                                         "load_after": load_after, "runs": [asdict(r) for r in runs]}, indent=2))
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Conversion benchmark: a synthetic bf16 checkpoint with a model's exact shapes, converted to q8_0, q4_0, q4_k_m.

The checkpoint (default ChatGLM3-6B; ``--model`` names any row of shapes.py, e.g. GLM-4.7 cut to 4 layers) is what
the model's publisher ships, weights aside: its config.json, the published tensor names and shapes in 7 bf16
safetensors shards with an index, and a small trained tokenizer (the converter pads the vocabulary to the real
size). Weights are random rows (N(0, 1/cols), rounded to bf16) repeated from a bank, written from the weightless
checkpoint (``chatglm.devtools.weightless.save_safetensors``, no torch). It is built once and cached under
``benchmarks/.cache/`` (git ignores it).

Every step runs in a child process (``python -m chatglm.cli ...``); the table gives its wall time, the throughput in
MB/s of checkpoint input (10^6 bytes), and its peak RSS (``wait4``'s ``ru_maxrss`` for that child alone). The
two-step baseline for q4_0, ``chatglm convert -t f16`` then llama.cpp's ``llama_model_quantize`` (llama-cpp-python),
runs in the same invocation, so the ratio to the one-step q4_0 conversion is measured on the same machine state;
``chatglm quantize`` of the same f16 file is shown too. With ``--llama-src`` (a llama.cpp source tree: its
``convert_hf_to_gguf.py`` and ``gguf-py``) and ``--llama-quantize`` (the native tool; found on PATH by default), each
type is also made llama.cpp's way, its converter to bf16 then ``llama-quantize``, right after ours.

    python benchmarks/convert.py                  # ChatGLM3-6B shape: ~12.5 GB of bf16 input, ~25 GB of outputs
    python benchmarks/convert.py --shape small    # a quick run of the same steps
    python benchmarks/convert.py --types q4_0 --no-baseline --json results.json
    python benchmarks/convert.py --shape small --types q4_k_m --threads-sweep 1,2,4   # scaling with threads
    python benchmarks/convert.py --model GLM-4.7 --types q4_k_m --no-baseline --llama-src /work/native-src \
        --llama-quantize /work/native/bin/llama-quantize
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
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_models, beside this file

from bench_models import SHAPE_SETS, HFShape, Shape, machine, size  # noqa: E402
from shapes import GLM4_TOKENIZER, NotMerged, weightless_checkpoint  # noqa: E402

from chatglm.convert.threads import usable_cpus  # noqa: E402
from chatglm.devtools.glm4 import FIXTURE_TEMPLATES  # noqa: E402
from chatglm.devtools.weightless import published_glm4_tokenizer, save_safetensors  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
TYPES = ("q8_0", "q4_0", "q4_k_m")
N_SHARDS = 7
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
def build_checkpoint(shape: Shape | HFShape) -> Path:
    """The cached bf16 safetensors checkpoint of ``shape`` (built from its weightless one when missing or
    incomplete): the published names and shapes, random rows, about equal shards with an index."""
    stub = weightless_checkpoint(shape, CACHE / "stubs").dir
    folder = CACHE / f"{shape.key}-bf16"
    done = folder / "complete.json"
    if done.is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    save_safetensors(stub, folder, N_SHARDS)
    if isinstance(shape, HFShape) and "vocab_size" not in shape.cut and GLM4_TOKENIZER.is_dir():
        # the published vocabulary (a tiny one would do for us, but llama.cpp's converter must recognise it)
        published_glm4_tokenizer(GLM4_TOKENIZER, folder, FIXTURE_TEMPLATES["glm45"])
    done.write_text(json.dumps({"shape": shape.name, "seconds": time.perf_counter() - start}))
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


def run_child(step: str, cmd: list[str], output: Path, env: Optional[dict[str, str]] = None) -> Run:
    """``cmd`` in a child process: its wall time and its own peak RSS (wait4), or its last error line."""
    print(f"  {step} ...", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    error = "" if proc.returncode == 0 else (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    out_bytes = output.stat().st_size if output.is_file() else 0
    return Run(step, seconds, usage.ru_maxrss * 1024, out_bytes, error)


def chatglm(*args: object) -> list[str]:
    return [sys.executable, "-m", "chatglm.cli", *map(str, args)]


def measure(ckpt: Path, out_dir: Path, types: list[str], threads: int, baseline: bool, keep: bool,
            llama: Optional["LlamaTools"] = None) -> list[Run]:
    runs = []
    for qtype in types:
        out = out_dir / f"direct-{qtype}.gguf"
        runs.append(run_child(f"convert -t {qtype}", chatglm("convert", ckpt, "-o", out, "-t", qtype,
                                                             "--threads", threads), out))
        nextn = out.is_file() and nextn_layers(out) > 0
        if not keep:
            out.unlink(missing_ok=True)
        if llama is not None:
            runs += llama_steps(llama, ckpt, out_dir, qtype, threads, keep_nextn=nextn, keep=keep)
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


@dataclass(frozen=True)
class LlamaTools:
    """llama.cpp's own route: its converter (a llama.cpp source tree) to bf16, then the native llama-quantize."""

    src: Optional[Path]  # holds convert_hf_to_gguf.py and gguf-py/
    quantize: Optional[str]


def llama_steps(tools: LlamaTools, ckpt: Path, out_dir: Path, qtype: str, threads: int, *, keep_nextn: bool,
                keep: bool) -> list[Run]:
    """convert_hf_to_gguf.py --outtype bf16, then llama-quantize to ``qtype``; "not available" rows without them.
    The MTP layers are dropped (``--no-mtp``) when our GGUF dropped them, so both sides write the same tensors."""
    bf16, quantized = out_dir / "llama-bf16.gguf", out_dir / f"llama-{qtype}.gguf"
    script = tools.src / "convert_hf_to_gguf.py" if tools.src else None
    if script is None or not script.is_file():
        return [Run("llama.cpp convert_hf_to_gguf.py --outtype bf16", 0.0, 0, 0, "not available (--llama-src)")]
    env = {**os.environ, "PYTHONPATH": str(tools.src / "gguf-py"), "NO_LOCAL_GGUF": "1"}
    cmd = [sys.executable, str(script), str(ckpt), "--outtype", "bf16", "--outfile", str(bf16)]
    runs = [run_child("llama.cpp convert_hf_to_gguf.py --outtype bf16", cmd + (["--no-mtp"] * (not keep_nextn)),
                      bf16, env=env)]
    if tools.quantize is None:
        runs.append(Run(f"  + llama-quantize {qtype}", 0.0, 0, 0, "not available (--llama-quantize)"))
    elif not runs[0].error:
        runs.append(run_child(f"  + llama-quantize {qtype}", [tools.quantize, str(bf16), str(quantized),
                                                              qtype.upper(), str(threads)], quantized))
    for path in (bf16, quantized):
        if not keep:
            path.unlink(missing_ok=True)
    return runs


def sweep(ckpt: Path, out_dir: Path, types: list[str], counts: list[int]) -> list[tuple[int, Run]]:
    """``chatglm convert -t TYPE --threads N`` for every type and thread count, the counts interleaved per type."""
    runs = []
    for qtype in types:
        out = out_dir / f"sweep-{qtype}.gguf"
        for n in counts:
            runs.append((n, run_child(f"convert -t {qtype}", chatglm("convert", ckpt, "-o", out, "-t", qtype,
                                                                      "--threads", n), out)))
            out.unlink(missing_ok=True)
    return runs


def scaling_table(runs: list[tuple[int, Run]], n_input: int) -> str:
    """Wall time per type and thread count, the speed-up over the type's fewest threads and its efficiency
    (speed-up / thread ratio: 100% is linear scaling)."""
    head = ["step", "threads", "wall", "MB/s of input", "speed-up", "efficiency"]
    base: dict[str, tuple[int, float]] = {}
    rows = []
    for n, r in runs:
        if r.error:
            rows.append([r.step, str(n), "-", "-", "-", f"error: {r.error}"])
            continue
        n0, s0 = base.setdefault(r.step, (n, r.seconds))
        up = s0 / r.seconds
        rows.append([r.step, str(n), f"{r.seconds:.1f} s", f"{n_input / 1e6 / r.seconds:.0f}", f"{up:.2f}x",
                     f"{up / (n / n0):.0%}"])
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in rows])


def nextn_layers(path: Path) -> int:
    """The GGUF's ``<arch>.nextn_predict_layers`` (0 when absent)."""
    from chatglm.gguf_file import read_header

    header = read_header(path)
    return int(header.get(f"{header.get('general.architecture')}.nextn_predict_layers") or 0)


def table(runs: list[Run], n_input: int) -> str:
    head = ["step", "wall", "MB/s of input", "peak RSS", "output"]
    rows = [[r.step, f"{r.seconds:.1f} s", f"{n_input / 1e6 / r.seconds:.0f}" if r.seconds else "-",
             size(r.peak_rss), size(r.output_bytes) if not r.error else r.error if r.error.startswith("not avail")
             else f"error: {r.error}"] for r in runs]
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
    for i, r in enumerate(runs):  # ours, then llama.cpp's converter and llama-quantize of the same type
        pair = runs[i + 1:i + 3]
        if r.step.startswith("convert -t q") and len(pair) == 2 and pair[0].step.startswith("llama.cpp") \
                and not (r.error or pair[0].error or pair[1].error):
            two = pair[0].seconds + pair[1].seconds
            lines.append(f"{r.step[11:]}: ours {r.seconds:.1f} s, peak {size(r.peak_rss)}; llama.cpp's converter + "
                         f"llama-quantize {pair[0].seconds:.1f} + {pair[1].seconds:.1f} = {two:.1f} s, peak "
                         f"{size(max(p.peak_rss for p in pair))} (ours takes {r.seconds / two:.0%} of the time)")
    worst = max((r.peak_rss for r in runs if r.step.startswith("convert -t q")), default=0)
    lines.append(f"largest peak RSS of the quantizing conversions: {size(worst)} (target {RSS_TARGET / 1e9:.1f} GB: "
                 f"{'met' if worst <= RSS_TARGET else 'MISSED'})")
    return lines


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("real", "small"), default="real", help="real shapes or small ones")
    p.add_argument("--model", default="chatglm3-6b", help="a model of shapes.py: " + ", ".join(SHAPE_SETS["real"]))
    p.add_argument("--llama-src", type=Path, default=os.environ.get("LLAMA_CPP_SRC"),
                   help="a llama.cpp source tree: compare with its convert_hf_to_gguf.py + llama-quantize")
    p.add_argument("--llama-quantize", default=shutil.which("llama-quantize"), help="default: on PATH")
    p.add_argument("--types", default=",".join(TYPES), help="comma-separated output types (default: %(default)s)")
    p.add_argument("-t", "--threads", type=int, default=usable_cpus(),
                   help="quantization threads (default: the CPUs this process may run on, %(default)s)")
    p.add_argument("--threads-sweep", type=lambda v: [int(x) for x in v.split(",")], metavar="N,N,...",
                   help="only convert each type once per thread count and print how it scales")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip f16 + separate quantize")
    p.add_argument("--keep", action="store_true", help="keep the output GGUFs (default: delete each after its run)")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    shapes = SHAPE_SETS[args.shape]
    if args.model not in shapes:
        print(f"unknown model {args.model!r}; choose from {', '.join(shapes)}", file=sys.stderr)
        return 2
    shape = shapes[args.model]
    try:
        weightless_checkpoint(shape, CACHE / "stubs")
    except NotMerged as exc:
        print(f"{exc}: family not merged yet", file=sys.stderr)
        return 2
    print(f"building (or reusing) the {shape.name} bf16 checkpoint under {CACHE} ...", flush=True)
    ckpt = build_checkpoint(shape)
    n_input = input_bytes(ckpt)
    out_dir = CACHE / "convert-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    if args.threads_sweep:
        runs = sweep(ckpt, out_dir, args.types.split(","), args.threads_sweep)
        print(f"\n{shape.name} shape, {n_input / 1e9:.2f} GB of bf16 input; {machine()}; load average "
              f"{load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after\n")
        print(scaling_table(runs, n_input))
        return 1 if any(r.error for _, r in runs) else 0
    llama = LlamaTools(args.llama_src, args.llama_quantize) if args.llama_src or args.llama_quantize else None
    runs = measure(ckpt, out_dir, args.types.split(","), args.threads, args.baseline, args.keep, llama)
    load_after = os.getloadavg()
    print(f"\n{shape.name} shape{f' (cut: {shape.cut_text()})' if isinstance(shape, HFShape) else ''}, "
          f"{N_SHARDS} bf16 safetensors shards, {n_input / 1e9:.2f} GB of input; {machine()}; "
          f"{args.threads} threads; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after\n")
    print(table(runs, n_input))
    print("\n" + "\n".join(summary(runs)))
    if args.json:
        args.json.write_text(json.dumps({"shape": shape.name, "input_bytes": n_input, "machine": machine(),
                                         "threads": args.threads, "load_before": load_before,
                                         "load_after": load_after, "runs": [asdict(r) for r in runs]}, indent=2))
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Long-context prefill: tokens/s and peak RSS for f16 vs q8_0 KV cache and flash attention on/off, and how close
the memory estimate (``chatglm info``, ``chatglm run --verbose``) comes to the measured peak RSS.

The model is a synthetic ~1.3B ChatGLM3-32K-shaped q4_0 GGUF (hidden 2048, 24 layers, 16 heads, 2 KV heads, FFN
5632, rope_ratio 50, 32K trained context) that ``benchmarks/bench_models.py`` builds and caches. Every configuration
runs in a child process of its own, so each peak RSS is its own. Quantized V caches need flash attention in
llama.cpp, so q8_0 without flash attention is not a configuration.

Two ways to measure prefill:

* ``full``: the whole prompt of N tokens is evaluated in 512-token micro-batches and timed end to end.
* ``sampled`` (the default past 4K tokens, where a full run takes an hour per configuration on a 2-core machine):
  the KV cache is filled to depth d from a synthesized sequence state (real K/V rows of a short prefill, tiled;
  ``llama_state_seq_set_data``), then one 512-token micro-batch is timed at that depth, for five depths from 0 to
  N - 512. A micro-batch's cost is linear in its depth (attention reads every cached token), so the whole prefill
  time is the sum over all N/512 micro-batches, interpolated between the timed depths. By default 4K is measured
  both ways, as a check of the method. Peak RSS is real either way: the cache is full and the
  last micro-batch runs at the deepest position, with the largest attention buffers; it is the largest resident size
  sampled after each timed evaluation (the script's own buffers for synthesizing states are freed by then).

    python benchmarks/long_context.py                      # 4K (full and sampled), 16K, 32K (sampled); 2 threads
    python benchmarks/long_context.py --lengths 8192 --method both
"""

from __future__ import annotations

import argparse
import ctypes
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import CACHE, Shape, build_gguf, machine, size  # noqa: E402

SHAPE = Shape("chatglm3-1.3b-32k", "chatglm3", 2048, 24, 16, 2, 5632, 65024, 32768, rope_ratio=50.0)
CHUNK = 512
SEED_CELLS = 256
CONFIGS = (("f16", "on"), ("f16", "off"), ("q8_0", "on"))


# ------------------------------------------------------------------------------------------------ KV state
def synth_state(seed: bytes, n_cells: int) -> bytes:
    """A one-sequence KV state of ``n_cells`` cells at positions 0..n-1, made from a saved state (llama.cpp's
    ``llama_state_seq_get_data`` layout: cell metadata, then K rows per layer, then V rows or, transposed, V
    columns) by tiling its K/V rows."""
    buf = memoryview(seed)
    pos = 0

    def take(fmt: str, n: int = 1) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(buf, dtype=fmt, count=n, offset=pos)
        pos += arr.nbytes
        return arr

    def raw(nbytes: int) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=pos)
        pos += nbytes
        return arr

    out: list[bytes] = [raw(8).tobytes()]  # llama.cpp's magic number and the sequence id
    n_stream, count = int(take("<u4")[0]), int(take("<u4")[0])
    if n_stream != 1:
        raise ValueError(f"{n_stream} KV streams; one expected")
    meta = take("<i4", 3 * count).reshape(count, 3)  # pos, n_seq_id, seq_id (no cell extension for this arch)
    if not (np.array_equal(meta[:, 0], np.arange(count)) and (meta[:, 1] == 1).all()):
        raise ValueError("unexpected cell metadata (not positions 0..n-1 of one sequence)")
    cells = np.empty((n_cells, 3), dtype="<i4")
    cells[:, 0], cells[:, 1], cells[:, 2] = np.arange(n_cells), 1, meta[0, 2]
    out += [np.array([1, n_cells], dtype="<u4").tobytes(), cells.tobytes()]
    v_trans, n_layer = (int(x) for x in take("<u4", 2))
    out.append(np.array([v_trans, n_layer], dtype="<u4").tobytes())

    def tiled(rows: np.ndarray) -> bytes:  # (count, row bytes) -> (n_cells, row bytes)
        return np.resize(rows, (n_cells, rows.shape[1])).tobytes()

    for _ in range(n_layer):  # K: rows of cells
        ktype, krow = take("<i4")[0], int(take("<u8")[0])
        out += [np.int32(ktype).tobytes(), np.uint64(krow).tobytes(), tiled(raw(count * krow).reshape(count, krow))]
    for _ in range(n_layer):
        vtype = take("<i4")[0]
        if not v_trans:
            vrow = int(take("<u8")[0])
            out += [np.int32(vtype).tobytes(), np.uint64(vrow).tobytes(),
                    tiled(raw(count * vrow).reshape(count, vrow))]
        else:  # for each of the n_embd_v columns: that element of every cell
            el, n_embd_v = (int(x) for x in take("<u4", 2))
            cols = raw(n_embd_v * count * el).reshape(n_embd_v, count, el)
            out += [np.int32(vtype).tobytes(), np.array([el, n_embd_v], dtype="<u4").tobytes(),
                    np.resize(cols.transpose(1, 0, 2), (n_cells, n_embd_v, el)).transpose(1, 0, 2).tobytes()]
    if pos != len(seed):
        raise ValueError(f"{len(seed) - pos} bytes left over: not the layout this script knows")
    return b"".join(out)


def get_state(ll, ctx) -> bytes:
    n = ll.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * n)()
    if ll.llama_state_seq_get_data(ctx, buf, n, 0) != n:
        raise RuntimeError("llama_state_seq_get_data failed")
    return bytes(buf)


def set_state(ll, ctx, blob: bytes) -> None:
    buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
    if ll.llama_state_seq_set_data(ctx, buf, len(blob), 0) != len(blob):
        raise RuntimeError("llama_state_seq_set_data refused the synthesized state")


# ------------------------------------------------------------------------------------------------ child
def child(path: str, n: int, kv: str, fa: bool, threads: int, method: str) -> dict:
    from chatglm.gguf_file import read_header
    from chatglm.runtime import llama_native as native
    from chatglm.runtime.memory import estimate
    from chatglm.runtime.model import load

    est = estimate(read_header(path), n, kv, flash_attn=fa)
    result: dict = {"estimate": est.total, "estimate_parts": [est.weights, est.kv_cache, est.compute]}
    with load(path, n_ctx=n, kv_type=kv, flash_attn=fa, n_threads=threads) as m:
        eng, ll = m.engine, native.lib()
        ids = [int(x) for x in np.random.default_rng(0).integers(100, eng.info.n_vocab - 100, n)]
        peak = 0
        if method in ("full", "both"):
            start = time.perf_counter()
            eng.prefill(ids)
            result["full_tps"] = n / (time.perf_counter() - start)
            peak = max(peak, vm_rss())
        if method in ("sampled", "both"):
            eng.reset()
            eng.prefill(ids[:SEED_CELLS])
            seed = get_state(ll, eng._ctx)
            if synth_state(seed, SEED_CELLS) != seed:
                raise RuntimeError("the state synthesizer does not reproduce llama.cpp's own state")
            depths = sorted({min(n - CHUNK, round(f * n / CHUNK) * CHUNK) for f in (0, 0.25, 0.5, 0.75, 1)})
            times = []
            for d in depths:
                eng.reset()
                if d:
                    set_state(ll, eng._ctx, synth_state(seed, d))  # its buffers are freed again on return
                eng.tokens = ids[:d]
                start = time.perf_counter()
                eng._eval(ids[d:d + CHUNK])
                times.append(time.perf_counter() - start)
                peak = max(peak, vm_rss())
            # every micro-batch's time, linear between the timed depths
            total = float(np.interp(np.arange(0, n, CHUNK), depths, times).sum())
            result.update(sampled_tps=n / total, depths=depths, chunk_seconds=times)
    result["rss"] = peak
    result["max_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # includes this script's buffers
    return result


def vm_rss() -> int:
    """This process's resident memory now. Sampled after each timed evaluation: the KV cache and llama.cpp's
    compute buffer stay allocated, so the sample after the deepest micro-batch is the engine's peak, without the
    transient buffers this script makes to synthesize KV states (which ``ru_maxrss`` would count)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(path: Path, n: int, kv: str, fa: str, threads: int, method: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(path), str(n), kv, fa, str(threads), method],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def row_text(r: dict) -> str:
    if "error" in r:
        return f"| {r['tokens']} | {r['kv']} | {r['flash']} | error: {r['error']} |"
    tps = " / ".join(f"{r[k]:.1f}" for k in ("full_tps", "sampled_tps") if k in r)
    return (f"| {r['tokens']} | {r['kv']} | {r['flash']} | {tps} | {r['method']} | {size(r['rss'])} | "
            f"{size(r['estimate'])} | {r['estimate'] / r['rss']:.2f} |")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        path, n, kv, fa, threads, method = sys.argv[2:8]
        print(json.dumps(child(path, int(n), kv, fa == "on", int(threads), method)))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--method", choices=("auto", "full", "sampled", "both"), default="auto",
                    help="auto: both up to 4K tokens (the check), sampled beyond")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--report", type=Path, metavar="JSON",
                    help="print the table of an earlier --json file, with the memory estimate of the code now")
    args = ap.parse_args()
    path = build_gguf(SHAPE, "q4_0", CACHE / "long")
    head = ["tokens", "KV", "flash", "prefill t/s (full / sampled)", "method", "peak RSS", "estimate", "est/RSS"]
    print(f"{SHAPE.name} q4_0 ({size(path.stat().st_size)}), {args.threads} threads; {machine()}\n")
    print("| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|", flush=True)
    if args.report:
        from chatglm.gguf_file import read_header
        from chatglm.runtime.memory import estimate

        header = read_header(path)
        for r in json.loads(args.report.read_text()):
            r["estimate"] = estimate(header, r["tokens"], r["kv"], flash_attn=r["flash"] == "on").total
            print(row_text(r))
        return 0
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        method = args.method if args.method != "auto" else ("both" if n <= 4096 else "sampled")
        for kv, fa in CONFIGS:
            r = {"tokens": n, "kv": kv, "flash": fa, "method": method, **run(path, n, kv, fa, args.threads, method)}
            rows.append(r)
            print(row_text(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

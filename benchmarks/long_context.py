"""Long-context prefill: tokens/s and peak RSS for f16 vs q8_0 KV cache, flash attention on/off, and how close the
memory estimate (`chatglm info`) comes to the measured RSS.

A synthetic ~1.3B ChatGLM3-shaped q4_0 GGUF (benchmarks/bench_models.py builds and caches it); each configuration
runs in its own child process so peak RSS is its own. Quantized V caches need flash attention in llama.cpp, so
q8_0 with flash attention off is not a configuration.

    python benchmarks/long_context.py                        # 4K, 16K and 32K tokens (slow on a small CPU)
    python benchmarks/long_context.py --lengths 2048,4096 -t 2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import CACHE, CHATGLM3_1B, build_gguf, machine, size  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import numpy as np
from chatglm.gguf_file import read_header
from chatglm.runtime.memory import estimate
from chatglm.runtime.model import load
path, n, kv, fa, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "on", int(sys.argv[5])
n_ctx = n + 256
est = estimate(read_header(path), n_ctx, kv, flash_attn=fa).total
with load(path, n_ctx=n_ctx, kv_type=kv, flash_attn=fa, n_threads=threads) as m:
    ids = list(np.random.default_rng(0).integers(100, 60000, n))
    start = time.perf_counter()
    m.engine.prefill(ids)
    seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"tps": n / seconds, "rss": rss, "estimate": est}))
"""


def run(path: Path, n: int, kv: str, fa: str, threads: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(n), kv, fa, str(threads)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="4096,16384,32768")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    path = build_gguf(CHATGLM3_1B, "q4_0", CACHE / "overhead")  # shared with python_overhead.py
    configs = [("f16", "on"), ("f16", "off"), ("q8_0", "on")]
    rows = []
    print(f"{CHATGLM3_1B.name} q4_0 ({size(path.stat().st_size)}), {args.threads} threads; {machine()}")
    print(f"{'tokens':>7} {'KV':>5} {'flash':>5} {'prefill t/s':>11} {'peak RSS':>9} {'estimate':>9} {'est/RSS':>7}")
    for n in (int(x) for x in args.lengths.split(",")):
        for kv, fa in configs:
            r = {"tokens": n, "kv": kv, "flash": fa, **run(path, n, kv, fa, args.threads)}
            rows.append(r)
            if "error" in r:
                print(f"{n:>7} {kv:>5} {fa:>5}  error: {r['error']}")
                continue
            print(f"{n:>7} {kv:>5} {fa:>5} {r['tps']:>11.1f} {size(r['rss']):>9} {size(r['estimate']):>9} "
                  f"{r['estimate'] / r['rss']:>7.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

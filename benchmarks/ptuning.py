#!/usr/bin/env python
"""P-Tuning v2 cost: prefill and decode of a ~1.3B ChatGLM3 (synthetic q4_0 weights, benchmarks/bench_models.py) with
a 128-entry prefix against the same model without one, in one run (``chatglm bench --json`` in child processes).

The prefix is P cells of the KV cache that every token attends to: it should cost what P more tokens of context
cost, no more.

    python benchmarks/ptuning.py                 # pp128 tg32, one repetition, q4_0
    python benchmarks/ptuning.py -p 512 -n 128 -r 3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import CACHE, CHATGLM3_1B, bench_child, build_gguf, table  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-p", "--n-prompt", type=int, default=128)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-r", "--repetitions", type=int, default=1)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--pre-seq-len", type=int, default=128)
    ap.add_argument("--type", default="q4_0")
    args = ap.parse_args(argv)
    s = CHATGLM3_1B
    head_dim = s.hidden // s.heads
    prefix = np.random.default_rng(0).normal(0, 1, (s.layers, 2, args.pre_seq_len, s.kv_heads * head_dim))
    rows = []
    for name, pre in (("no prefix", None), (f"prefix {args.pre_seq_len}", prefix.astype(np.float32))):
        path = build_gguf(s, args.type, CACHE / "models", prefix=pre)
        report = bench_child(path, args)
        rows.append({"model": f"{s.name}, {name}", "type": args.type, "report": report})
    print(table(rows, args.n_prompt, args.n_gen))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""GLM-1 decode speed: our ggml engine on a ChatGLM-6B-shaped GGUF against llama.cpp on a ChatGLM2-6B-shaped one.

Both models have ~6.2B parameters (ChatGLM2/3-6B: GQA with 2 KV groups, SwiGLU 13696, vocab 65024; ChatGLM-6B:
full multi-head attention, GELU 16384, vocab 130528). Synthetic weights in the real shapes are built by
``bench_models.py`` (cached under ``benchmarks/.cache/``), then both engines are loaded in this process and measured
alternately (A B B A ...), so load drift on a shared machine hits both alike: pp = prefill of N random tokens into an
empty cache, tg = M single-token steps after that prompt. For GLM-1 the prompt is context + ``[gMASK] <sop>`` (all
bidirectional, one graph) and each step's graph-build time is recorded.

Decode is bounded by memory bandwidth, so the two models are compared as GB/s: the bytes one step must read (every
weight but the token embeddings, which are only indexed, plus the K and V cells attended to at the mean cache length
of the steps) over the step time. "w" counts the weights only; "w+kv" adds the cache (ChatGLM-6B's full multi-head
attention reads 16x the cache bytes of ChatGLM2's two KV groups). Targets: issue 6, tg >= 0.9x; issue 21, GB/s >=
0.97x llama.cpp's at 1 and 2 threads. The machine may be shared: each repetition records the 1-minute load average
and the CPU time other processes used meanwhile (in cores), and the table gives their medians and maxima.

    python benchmarks/decode.py                              # real shapes, q4_0 and q8_0, pp128 tg32, 3 repetitions
    python benchmarks/decode.py --shape small -r 2           # seconds: tiny widths, same code paths
    python benchmarks/decode.py --types q4_0 --layers 8 --threads 1,2 -r 7   # real widths, fewer layers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import CACHE, REAL, SMALL, Shape, build_gguf, machine, size  # noqa: E402

from chatglm.gguf_file import read_header  # noqa: E402
from chatglm.runtime.bench import peak_rss_bytes, random_tokens  # noqa: E402
from chatglm.runtime.loader import open_engine  # noqa: E402
from chatglm.runtime.perplexity import causal_prefix  # noqa: E402

log = logging.getLogger("decode")


def shapes(args: argparse.Namespace) -> tuple[Shape, Shape]:
    """(GLM-1 shape, ChatGLM2 shape), with any size overrides applied to both."""
    base = SMALL if args.shape == "small" else REAL
    glm1, glm2 = base["chatglm-6b"], dataclasses.replace(base["chatglm3-6b"], name=base["chatglm3-6b"].name)
    over = {k: v for k, v in (("hidden", args.hidden), ("layers", args.layers), ("heads", args.heads)) if v}
    if not over:
        return glm1, glm2
    tag = "-".join(f"{k}{v}" for k, v in sorted(over.items()))
    return (dataclasses.replace(glm1, name=f"{glm1.name}-{tag}", **over),
            dataclasses.replace(glm2, name=f"{glm2.name}-{tag}", **over))


def timed_prefill(engine, tokens: list[int]) -> float:
    engine.reset()
    start = time.perf_counter()
    engine.prefill(tokens)
    engine.logits()
    return time.perf_counter() - start


def timed_decode(engine, tokens: list[int]) -> tuple[float, float]:
    """(seconds for the steps after what the cache holds, seconds of them spent building graphs; 0 for llama.cpp)."""
    timing = getattr(engine, "timing", None)
    build = 0.0
    start = time.perf_counter()
    for tok in tokens:
        engine.step(tok)
        engine.logits()
        if timing is not None:
            build += engine.timing.build_s
    return time.perf_counter() - start, build


@dataclasses.dataclass
class Samples:
    pp_s: list[float] = dataclasses.field(default_factory=list)
    tg_s: list[float] = dataclasses.field(default_factory=list)
    build_s: list[float] = dataclasses.field(default_factory=list)


class LoadMeter:
    """Other processes' CPU use while a block runs: all CPUs' busy time (/proc/stat) less this process's."""

    def __init__(self) -> None:
        self.load1: list[float] = []
        self.others: list[float] = []  # cores busy with other processes, on average

    @staticmethod
    def _busy_s() -> float:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def __enter__(self) -> "LoadMeter":
        self._start = (time.perf_counter(), self._busy_s(), sum(os.times()[:2]))
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = self._start
        wall = time.perf_counter() - wall
        self.others.append(max(0.0, (self._busy_s() - busy) - (sum(os.times()[:2]) - own)) / wall)
        self.load1.append(os.getloadavg()[0])

    def summary(self) -> str:
        return (f"load1 {statistics.median(self.load1):.2f} (max {max(self.load1):.2f}), other processes "
                f"{statistics.median(self.others):.2f} cores (max {max(self.others):.2f})")


def bytes_per_step(path: Path, n_kv: float) -> tuple[int, int]:
    """(weight bytes, f16 K+V bytes) one decode step reads at a cache of ``n_kv`` cells."""
    h = read_header(path)
    weights = sum(t.nbytes for n, t in h.tensors.items() if n != "token_embd.weight" or "output.weight" not in h.tensors)
    n_head = h.arch_get("attention.head_count")
    head_dim = h.arch_get("embedding_length") // n_head
    n_kv_head = h.arch_get("attention.head_count_kv") or n_head
    return weights, int(2 * 2 * n_kv_head * head_dim * h.arch_get("block_count") * n_kv)


def measure_pair(paths: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """Both engines loaded, warmed up, then measured alternately."""
    import numpy as np

    engines = {k: open_engine(p, n_ctx=args.ctx, n_threads=args.threads, kv_type="f16") for k, p in paths.items()}
    try:
        rng = np.random.default_rng(1234)
        plan = {}
        for name, e in engines.items():
            prefix = causal_prefix(e.info)
            plan[name] = (random_tokens(e.info, args.n_prompt - len(prefix), rng) + prefix, prefix,
                          random_tokens(e.info, args.n_gen, rng))
        samples = {name: Samples() for name in engines}
        for name, e in engines.items():  # warm-up: every weight page touched, buffers allocated
            timed_prefill(e, plan[name][0])
            timed_decode(e, plan[name][2][:2])
        order, meter = list(engines), LoadMeter()
        for rep in range(args.repetitions):
            for name in order if rep % 2 == 0 else order[::-1]:
                e, (prompt, _, gen) = engines[name], plan[name]
                with meter:
                    samples[name].pp_s.append(timed_prefill(e, prompt))  # then the steps after the prompt
                    tg, build = timed_decode(e, gen)
                samples[name].tg_s.append(tg)
                samples[name].build_s.append(build)
                log.info("%s rep %d: pp %.2f t/s, tg %.2f t/s", name, rep + 1, args.n_prompt / samples[name].pp_s[-1],
                         args.n_gen / tg)
        timing = getattr(engines["glm1"], "timing", None)
        out = {name: summary(s, args, engines[name], timing if name == "glm1" else None, paths[name])
               for name, s in samples.items()}
        # Per-repetition ratios (both engines ran back to back): robust to load drift on a shared machine.
        g1, g2 = samples["glm1"], samples["glm2"]
        out["tg_ratio"] = statistics.median(b / a for a, b in zip(g1.tg_s, g2.tg_s, strict=True))
        out["pp_ratio"] = statistics.median(b / a for a, b in zip(g1.pp_s, g2.pp_s, strict=True))
        for key in ("w", "wkv"):  # GB/s ratios, per repetition
            per_step = {n: out[n][f"bytes_{key}"] for n in engines}
            out[f"gbs_ratio_{key}"] = statistics.median(
                (per_step["glm1"] / a) / (per_step["glm2"] / b) for a, b in zip(g1.tg_s, g2.tg_s, strict=True))
        out["load"] = meter.summary()
        return out
    finally:
        for e in engines.values():
            e.close()


def summary(s: Samples, args: argparse.Namespace, engine, timing, path: Path) -> dict[str, Any]:
    pp = [args.n_prompt / x for x in s.pp_s]
    tg = [args.n_gen / x for x in s.tg_s]
    weights, kv = bytes_per_step(path, args.n_prompt + (args.n_gen + 1) / 2)
    out = {"pp_tps": statistics.median(pp), "tg_tps": statistics.median(tg), "pp_samples": pp, "tg_samples": tg,
           "size_bytes": engine.info.size_bytes, "engine": type(engine).__name__,
           "bytes_w": weights, "bytes_wkv": weights + kv}
    for key in ("w", "wkv"):
        out[f"gbs_{key}"] = statistics.median(out[f"bytes_{key}"] * args.n_gen / x / 1e9 for x in s.tg_s)
    if timing is not None:
        out["build_fraction"] = statistics.median(b / t for b, t in zip(s.build_s, s.tg_s, strict=True))
        out["build_ms_per_step"] = 1e3 * statistics.median(s.build_s) / args.n_gen
        out["nodes_per_step"] = timing.n_nodes
        out["repacked_tensors"] = engine.model.repacked
    return out


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    head = ["type", "thr", "model (engine)", "size", f"pp{args.n_prompt} t/s", f"tg{args.n_gen} t/s",
            "tg GB/s w / w+kv", "pp / tg vs llama.cpp", "GB/s vs llama.cpp w / w+kv", "graph build / step"]
    lines = []
    for r in rows:
        g1, g2 = r["glm1"], r["glm2"]
        lines.append([r["type"], str(r["threads"]), f"{r['names'][1]} (llama.cpp)", size(g2["size_bytes"]),
                      f"{g2['pp_tps']:.2f}", f"{g2['tg_tps']:.2f}", f"{g2['gbs_w']:.2f} / {g2['gbs_wkv']:.2f}",
                      "1 / 1", "1 / 1", "-"])
        lines.append([r["type"], str(r["threads"]), f"{r['names'][0]} (GLM-1 ggml)", size(g1["size_bytes"]),
                      f"{g1['pp_tps']:.2f}", f"{g1['tg_tps']:.2f}", f"{g1['gbs_w']:.2f} / {g1['gbs_wkv']:.2f}",
                      f"{r['pp_ratio']:.2f} / {r['tg_ratio']:.2f}",
                      f"{r['gbs_ratio_w']:.3f} / {r['gbs_ratio_wkv']:.3f}",
                      (f"{100 * g1['build_fraction']:.1f}% ({g1['build_ms_per_step']:.1f} ms, "
                       f"{g1['nodes_per_step']} nodes)")])
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in lines])


def profile_decode(path: Path, args: argparse.Namespace, threads: int) -> str:
    """Per-op times of GLM-1's decode graph after an ``n_prompt`` prompt (chatglm.ggml.profile)."""
    import numpy as np

    from chatglm.ggml.profile import table as op_table

    with open_engine(path, n_ctx=args.ctx, n_threads=threads, kv_type="f16") as e:
        rng = np.random.default_rng(1234)
        e.prefill(random_tokens(e.info, args.n_prompt - 2, rng) + causal_prefix(e.info))
        for tok in random_tokens(e.info, 3, rng):
            e.step(tok)
        return op_table(e.profile_last_step())


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("real", "small"), default="real")
    p.add_argument("--hidden", type=int, default=0, help="override the hidden size of both shapes")
    p.add_argument("--layers", type=int, default=0, help="override the layer count of both shapes")
    p.add_argument("--heads", type=int, default=0, help="override the head count of both shapes")
    p.add_argument("--types", default="q4_0,q8_0", help="comma-separated GGUF types")
    p.add_argument("-p", "--n-prompt", type=int, default=128)
    p.add_argument("-n", "--n-gen", type=int, default=32)
    p.add_argument("-r", "--repetitions", type=int, default=3)
    p.add_argument("-t", "--threads", default="2", help="thread counts, comma-separated (1,2): each is measured")
    p.add_argument("-c", "--ctx", type=int, default=512)
    p.add_argument("--json", type=Path, help="also write the results to this file")
    p.add_argument("--profile", action="store_true", help="also time GLM-1's decode graph op by op")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    args = parse_args(argv)
    glm1, glm2 = shapes(args)
    rows, profiles = [], []
    for qtype in args.types.split(","):
        cache = CACHE / args.shape
        paths = {"glm1": build_gguf(glm1, qtype, cache), "glm2": build_gguf(glm2, qtype, cache)}
        for threads in [int(t) for t in args.threads.split(",")]:
            if args.profile:
                profiles.append(f"GLM-1 decode graph, {qtype}, {threads} threads, after {args.n_prompt} tokens:\n"
                                + profile_decode(paths["glm1"], args, threads))
            log.info("measuring %s, %d threads: %s vs %s", qtype, threads, paths["glm1"].name, paths["glm2"].name)
            run = argparse.Namespace(**{**vars(args), "threads": threads})
            rows.append({"type": qtype, "threads": threads, "names": [glm1.name, glm2.name],
                         **measure_pair(paths, run)})
    print(f"{machine()}; threads {args.threads}; ctx {args.ctx}; f16 KV cache; {args.repetitions} repetitions "
          f"(t/s and GB/s: median; ratios: median of per-repetition ratios); peak RSS {size(peak_rss_bytes())}\n")
    print(table(rows, args))
    for text in profiles:
        print("\n" + text)
    print("\nload while measuring: " + "; ".join(f"{r['type']} t{r['threads']}: {r['load']}" for r in rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, default=str), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

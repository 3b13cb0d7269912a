#!/usr/bin/env python
"""Speculative decoding: decode tokens/s without and with each drafter, and the drafts' acceptance rate.

Two tasks, greedy, one table each:

- **edit**: the prompt holds a long code file and asks for it back with one change, the case prompt lookup is for
  (a trained model copies most of the file, so most drafts are right);
- **chat**: a short free-chat question.

Models are synthetic ChatGLM3-layout GGUFs built by ``bench_models.py`` (cached under ``benchmarks/.cache/``): a
~0.3B target and a ~30M draft model sharing its tokenizer. Their weights are random, so what the acceptance measures
here is how often a random model's greedy continuation repeats what the context already holds (random models fall
into loops, which lookup catches; they do not copy a file as a trained model does), and how often an unrelated random
draft model happens to agree with the target (almost never). The speed columns measure the cost side honestly:
what a verification batch costs against one-token steps, and what drafting costs. Each configuration is its own
loaded model; rounds are interleaved (none, lookup, draft, both, none, ...) and the table gives medians.

    python benchmarks/speculative.py                 # 5 rounds, 2 threads, 128 tokens
    python benchmarks/speculative.py --quick         # tiny models, 3 rounds: seconds
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import CACHE, Shape, build_gguf, machine  # noqa: E402

from chatglm.runtime.generation import drain  # noqa: E402
from chatglm.runtime.messages import Message  # noqa: E402
from chatglm.runtime.model import load  # noqa: E402
from chatglm.runtime.sampling import SamplingParams  # noqa: E402
from chatglm.runtime.speculative import SpeculativeConfig  # noqa: E402

log = logging.getLogger("speculative")

TARGET = Shape("chatglm3-0.3b", "chatglm3", 1024, 12, 16, 2, 2816, 65024, 8192)
DRAFT = Shape("chatglm3-30m", "chatglm3", 256, 2, 4, 2, 704, 65024, 8192)
QUICK_TARGET = Shape("chatglm3-quick", "chatglm3", 256, 4, 4, 2, 704, 65024, 8192)
QUICK_DRAFT = Shape("chatglm3-quick-draft", "chatglm3", 128, 1, 2, 2, 352, 65024, 8192)


def code_file() -> str:
    """A long, plausible Python file (the edit task's input)."""
    parts = []
    for i in range(6):
        parts.append(f'''def handler_{i}(request, store, limit={10 + i}):
    """Answer request {i}: read at most limit items from the store."""
    items = store.read(request.key, limit=limit)
    if not items:
        return {{"status": 404, "items": []}}
    total = sum(item.size for item in items)
    return {{"status": 200, "items": [item.name for item in items], "total": total}}
''')
    return "\n\n".join(parts)


TASKS = {
    "edit": "Rename `store` to `repository` everywhere in this file and give the whole file back:\n\n" + code_file(),
    "chat": "What should I see in Beijing in two days? 北京两天怎么玩?",
}


def configs(draft: Path, n: int) -> dict[str, SpeculativeConfig | None]:
    return {"none": None, f"lookup {n}": SpeculativeConfig(lookup=n),
            "draft 4": SpeculativeConfig(draft=draft, draft_max=4),
            f"lookup {n} + draft 4": SpeculativeConfig(lookup=n, draft=draft, draft_max=4)}


def measure(m, prompt: str, n_gen: int) -> tuple[float, int, int]:
    """(decode tokens/s, drafted, accepted) of one greedy reply (the prompt's cache kept from the last round)."""
    ids = m.prompt_ids([Message("user", prompt)])
    gen = drain(m.run(ids, SamplingParams(temperature=0.0, max_tokens=n_gen)))
    s = gen.stats
    return s.decode_tps, s.drafted_tokens, s.accepted_tokens


def run_task(models: dict, prompt: str, rounds: int, n_gen: int) -> list[list[str]]:
    results: dict[str, list[tuple[float, int, int]]] = {name: [] for name in models}
    for r in range(rounds + 1):  # round 0 warms up (and fills each model's cache with the prompt)
        for name, m in models.items():
            got = measure(m, prompt, n_gen)
            if r:
                results[name].append(got)
    base = statistics.median(x[0] for x in results["none"])
    rows = []
    for name, xs in results.items():
        tps = statistics.median(x[0] for x in xs)
        drafted, accepted = sum(x[1] for x in xs), sum(x[2] for x in xs)
        rate = f"{100 * accepted / drafted:.0f}%" if drafted else "-"
        rows.append([name, f"{tps:.1f}", f"{tps / base:.2f}x", f"{drafted / len(xs):.0f}", rate])
    return rows


def table(rows: list[list[str]]) -> str:
    head = ["drafter", "decode t/s", "vs none", "drafted/reply", "accepted"]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in rows])


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-r", "--rounds", type=int, default=5)
    ap.add_argument("-n", "--n-gen", type=int, default=128)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--lookup", type=int, default=8)
    ap.add_argument("--type", default="q8_0")
    ap.add_argument("--quick", action="store_true", help="tiny models, 3 rounds")
    args = ap.parse_args(argv)
    target, draft = (QUICK_TARGET, QUICK_DRAFT) if args.quick else (TARGET, DRAFT)
    rounds = 3 if args.quick else args.rounds
    target_path = build_gguf(target, args.type, CACHE / "speculative")
    draft_path = build_gguf(draft, args.type, CACHE / "speculative")
    print(f"{machine()} (load average {os.getloadavg()[0]:.1f} at the start); {args.threads} threads; target "
          f"{target.name} {args.type}, draft {draft.name} {args.type}; greedy, {args.n_gen} tokens, median of {rounds} "
          "interleaved rounds")
    models = {}
    try:
        for name, spec in configs(draft_path, args.lookup).items():
            models[name] = load(target_path, n_ctx=4096, n_threads=args.threads, speculative=spec)
            models[name].stop_ids = frozenset()  # every reply n_gen tokens long (a random model may say eos early)
        for task, prompt in TASKS.items():
            print(f"\n{task} ({len(models['none'].prompt_ids([Message('user', prompt)]))} prompt tokens)\n")
            print(table(run_task(models, prompt, rounds, args.n_gen)))
    finally:
        for m in models.values():
            m.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python
"""Speculative decoding: decode tokens/s without and with each drafter, and the drafts' acceptance rate.

Greedy, each configuration its own loaded model, rounds interleaved (none, lookup fixed, lookup adaptive, ...;
each round starts one configuration further on), medians of the rounds; the load average is printed with each table (other processes slow a run down).

1. **Random drafters** on two tasks: **edit** (the prompt holds a long code file and asks for it back with a
   change: the case prompt lookup is for) and **chat** (a short free question). Columns: no speculation, prompt
   lookup with its fixed length (the old behaviour) and adaptive (``speculative_adapt.py``), a ~30M random draft
   model fixed and adaptive. Random weights do not copy the file, so lookup's acceptance here is how often a random
   model's greedy continuation repeats n-grams of the context, and the draft model almost never agrees: this
   measures the cost side, and whether adaptive drafting stops paying for bad drafts (the goal: >= 0.97x of none).
2. **Copy task** (edit): drafters whose guesses really are the target's continuation: the target drafting for
   itself (every draft right: acceptance's upper bound, at a drafting cost as high as the target's), the target's
   own weights requantized to q4_0 (mostly right, cheaper), and an oracle as free as lookup that drafts the plain
   greedy reply (what lookup does when a trained model copies the file: the 1.5x goal's case).

Models are synthetic GGUFs built by ``bench_models.py`` (cached under ``benchmarks/.cache/``): a ~0.15B ChatGLM3
target and a ~30M draft model sharing its tokenizer; ``--only mtp``: GLM-4.7's layout cut to ~0.2B with its NextN
layer; ``--only cost``: what a verification batch of k tokens costs in one-token steps.

    python benchmarks/speculative.py                 # 5 rounds, 2 threads, 32 tokens a reply: a few minutes
    python benchmarks/speculative.py --quick         # tiny models
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import CACHE, Shape, build_gguf, machine  # noqa: E402
from shapes import NEW, HFShape  # noqa: E402

from chatglm.runtime.generation import drain  # noqa: E402
from chatglm.runtime.messages import Message  # noqa: E402
from chatglm.runtime.model import load  # noqa: E402
from chatglm.runtime.sampling import SamplingParams  # noqa: E402
from chatglm.runtime.speculative import SpeculativeConfig  # noqa: E402

log = logging.getLogger("speculative")

TARGET = Shape("chatglm3-0.15b", "chatglm3", 768, 8, 12, 2, 2048, 65024, 8192)
DRAFT = Shape("chatglm3-30m", "chatglm3", 256, 2, 4, 2, 704, 65024, 8192)
QUICK_TARGET = Shape("chatglm3-quick", "chatglm3", 256, 4, 4, 2, 704, 65024, 8192)
QUICK_DRAFT = Shape("chatglm3-quick-draft", "chatglm3", 128, 1, 2, 2, 352, 65024, 8192)
# GLM-4.7's layout (glm4moe, its MTP layer kept) cut to ~0.2B: 4 layers + the NextN one, 8 experts, width 1024
_MTP_CUT = {"num_hidden_layers": 4, "first_k_dense_replace": 1, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 512, "num_attention_heads": 8,
            "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 32768, "pad_token_id": None,
            "eos_token_id": None}
MTP_TARGET = HFShape("GLM-4.7-mtp-0.2b", "glm4_moe", NEW["GLM-4.7"].published, _MTP_CUT)
QUICK_MTP_TARGET = HFShape("GLM-4.7-mtp-quick", "glm4_moe", NEW["GLM-4.7"].published,
                           {**_MTP_CUT, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
                            "num_attention_heads": 4, "head_dim": 64})


def code_file() -> str:
    """A long, plausible Python file (the edit task's input)."""
    parts = []
    for i in range(3):
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


def configs(draft: Path, n: int, d: int) -> dict[str, SpeculativeConfig | None]:
    """The main comparison: each drafter with its fixed length (the old behaviour) and adaptive."""
    return {"none": None,
            f"lookup {n} fixed": SpeculativeConfig(lookup=n, adaptive=False),
            f"lookup {n} adaptive": SpeculativeConfig(lookup=n, adaptive=True),
            f"draft {d} fixed": SpeculativeConfig(draft=draft, draft_max=d, adaptive=False),
            f"draft {d} adaptive": SpeculativeConfig(draft=draft, draft_max=d, adaptive=True)}


def copy_configs(target: Path, copy: Path, n: int, d: int) -> dict[str, SpeculativeConfig | None]:
    """Drafters that really copy the target's greedy continuation: the target itself (every draft right: the upper
    bound of acceptance), its own q4_0 copy, and an oracle as free as lookup that drafts the plain reply (what
    lookup does when a trained model copies the file)."""
    out: dict[str, SpeculativeConfig | None] = {"none": None}
    for name, path in (("self", target), ("q4_0 copy", copy)):
        out[f"{name} {d} fixed"] = SpeculativeConfig(draft=path, draft_max=d, adaptive=False)
        out[f"{name} {d} adaptive"] = SpeculativeConfig(draft=path, draft_max=d, adaptive=True)
    out[f"oracle {n} fixed"] = SpeculativeConfig(lookup=n, adaptive=False)
    out[f"oracle {n} adaptive"] = SpeculativeConfig(lookup=n, adaptive=True)
    return out


def mtp_configs(n: int) -> dict[str, SpeculativeConfig | None]:
    return {"none": None, "mtp fixed": SpeculativeConfig(mtp=True, adaptive=False),
            "mtp adaptive": SpeculativeConfig(mtp=True, adaptive=True),
            f"lookup {n} + mtp adaptive": SpeculativeConfig(lookup=n, mtp=True, adaptive=True)}


class Oracle:
    """Drafts the plain greedy reply (known in advance), free like prompt lookup: a copy task's upper bound."""

    name, cheap, kind = "oracle", True, 0

    def __init__(self, prompt_len: int, reply: list[int]):
        self.prompt_len, self.reply = prompt_len, reply

    def draft(self, history, n):
        start = len(history) - self.prompt_len
        return list(self.reply[start:start + n]) if start >= 0 else []

    def close(self) -> None:
        pass


def measure(m, ids: list[int], n_gen: int) -> tuple[float, int, int, int]:
    """(decode tokens/s, drafted, accepted, verifications) of one greedy reply (the prompt's cache kept)."""
    s = drain(m.run(ids, SamplingParams(temperature=0.0, max_tokens=n_gen))).stats
    return s.decode_tps, s.drafted_tokens, s.accepted_tokens, s.verifications


def run_task(models: dict, ids: list[int], rounds: int, n_gen: int) -> list[list[str]]:
    results: dict[str, list[tuple[float, int, int, int]]] = {name: [] for name in models}
    names = list(models)
    for r in range(rounds + 1):  # round 0 warms up (and fills each model's cache with the prompt)
        for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts one further on
            got = measure(models[name], ids, n_gen)
            if r:
                results[name].append(got)
    base = statistics.median(x[0] for x in results["none"])
    rows = []
    for name, xs in results.items():
        tps = statistics.median(x[0] for x in xs)
        drafted, accepted, verified = (sum(x[i] for x in xs) for i in (1, 2, 3))
        rate = f"{100 * accepted / drafted:.0f}%" if drafted else "-"
        mean = f"{drafted / verified:.1f}" if verified else "-"
        rows.append([name, f"{tps:.1f}", f"{tps / base:.2f}x", f"{drafted / len(xs):.0f}", rate, mean])
    return rows


def table(rows: list[list[str]], head=("drafter", "decode t/s", "vs none", "drafted/reply", "accepted",
                                       "tokens/verification")) -> str:
    widths = [max(len(x[i]) for x in [list(head)] + rows) for i in range(len(head))]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in rows])


def load_text() -> str:
    return "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-r", "--rounds", type=int, default=5)
    ap.add_argument("-n", "--n-gen", type=int, default=32)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--lookup", type=int, default=8)
    ap.add_argument("--draft-max", type=int, default=4)
    ap.add_argument("--type", default="q8_0")
    ap.add_argument("--quick", action="store_true", help="tiny models")
    ap.add_argument("--only", choices=("draft", "copy", "mtp", "cost"), help="one of the comparisons (default: "
                    "draft and copy)")
    args = ap.parse_args(argv)
    print(f"{machine()}; {args.threads} threads; greedy, {args.n_gen} tokens a reply, median of {args.rounds} "
          f"interleaved rounds; {load_text()} at the start")
    target_shape, draft_shape = (QUICK_TARGET, QUICK_DRAFT) if args.quick else (TARGET, DRAFT)
    target = build_gguf(target_shape, args.type, CACHE / "speculative")
    if args.only == "cost":
        print(f"\n## verification cost, {target_shape.name} {args.type}\n")
        print(verification_cost(target, args.threads, 7), flush=True)
    if args.only in (None, "draft"):
        draft_path = build_gguf(draft_shape, args.type, CACHE / "speculative")
        print(f"\n## {target_shape.name} {args.type}, draft model {draft_shape.name} {args.type} (random weights)")
        compare(target, configs(draft_path, args.lookup, args.draft_max), args, TASKS)
    if args.only in (None, "copy"):
        copy = q4_copy(target)
        print(f"\n## copy task: drafters that agree with {target_shape.name} {args.type}")
        compare(target, copy_configs(target, copy, args.lookup, args.draft_max), args, {"edit": TASKS["edit"]})
    if args.only == "mtp":
        mtp_shape = QUICK_MTP_TARGET if args.quick else MTP_TARGET
        print(f"\n## {mtp_shape.name} {args.type} (glm4moe with its MTP layer)")
        compare(build_gguf(mtp_shape, args.type, CACHE / "speculative"), mtp_configs(args.lookup), args, TASKS)
    return 0


def q4_copy(target: Path) -> Path:
    """The target's own weights requantized to q4_0 (a draft model that mostly agrees with it)."""
    from chatglm.convert.requantize import quantize_gguf

    dest = target.with_name(target.stem + "-as-q4_0.gguf")
    if not dest.is_file():
        quantize_gguf(target, dest, "q4_0", allow_requantize=True)
    return dest


def verification_cost(path: Path, threads: int, rounds: int, sizes=(2, 5, 9)) -> str:
    """What one batch of k tokens with logits at every position costs, in one-token steps (median of ``rounds``
    interleaved pairs after a 1,000-token prompt): the price of a verification that accepts nothing."""
    from chatglm.runtime.loader import open_engine

    rows = []
    with open_engine(path, n_ctx=2048, n_threads=threads) as e:
        e.prefill([100 + i % 1000 for i in range(1000)])
        n = len(e.tokens)
        for k in sizes:
            ratios = []
            for _ in range(rounds):
                start = time.perf_counter()
                for i in range(k):
                    e.step(200 + i)
                single = (time.perf_counter() - start) / k
                e.drop_after(n)
                start = time.perf_counter()
                e.eval_all([200 + i for i in range(k)])
                ratios.append((time.perf_counter() - start) / single)
                e.drop_after(n)
            rows.append([str(k), f"{statistics.median(ratios):.2f}", f"{min(ratios):.2f}-{max(ratios):.2f}"])
    head = ["batch of k", "cost in steps (median)", "range"]
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(3)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in rows])


def compare(path: Path, specs: dict[str, SpeculativeConfig | None], args: argparse.Namespace,
            tasks: dict[str, str]) -> None:
    models = {}
    try:
        start = time.perf_counter()
        for name, spec in specs.items():
            models[name] = load(path, n_ctx=4096, n_threads=args.threads, **(spec.options() if spec is not None else {}))
            models[name].stop_ids = frozenset()  # every reply n_gen tokens long (a random model may say eos early)
        for task, prompt in tasks.items():
            ids = models["none"].prompt_ids([Message("user", prompt)])
            install_oracles(models, ids, args.n_gen)
            print(f"\n{task} ({len(ids)} prompt tokens)\n")
            print(table(run_task(models, ids, args.rounds, args.n_gen)), flush=True)
            print(f"\n({load_text()}; {time.perf_counter() - start:.0f} s so far)", flush=True)
    finally:
        for m in models.values():
            m.close()


def install_oracles(models: dict, ids: list[int], n_gen: int) -> None:
    """The "oracle" models draft the plain greedy reply to ``ids`` (fixed: always the most; adaptive: controlled)."""
    from chatglm.runtime.speculative_adapt import AdaptiveDrafter

    oracles = [name for name in models if name.startswith("oracle")]
    if not oracles:
        return
    reply = drain(models["none"].run(ids, SamplingParams(temperature=0.0, max_tokens=n_gen + 1))).tokens
    for name in oracles:
        m, oracle = models[name], Oracle(len(ids), reply)
        m.drafter.close()
        m.drafter = AdaptiveDrafter([(oracle, m.n_draft)]) if "adaptive" in name else oracle


if __name__ == "__main__":
    raise SystemExit(main())

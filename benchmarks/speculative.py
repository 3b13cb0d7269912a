#!/usr/bin/env python
"""Speculative decoding: decode tokens/s without and with each drafter, and the drafts' acceptance rate.

Two tasks, greedy, one table each:

- **edit**: the prompt holds a long code file and asks for it back with one change, the case prompt lookup is for
  (a trained model copies most of the file, so most drafts are right);
- **chat**: a short free-chat question.

Models are synthetic GGUFs built by ``bench_models.py`` (cached under ``benchmarks/.cache/``): a ~0.15B ChatGLM3
target and a ~30M draft model sharing its tokenizer; for MTP, GLM-4.7's layout cut to ~0.2B with its NextN layer. Their weights are random, so what the acceptance measures
here is how often a random model's greedy continuation repeats what the context already holds (random models fall
into loops, which lookup catches; they do not copy a file as a trained model does), and how often an unrelated random
draft model happens to agree with the target (almost never). The speed columns measure the cost side honestly:
what a verification batch costs against one-token steps, and what drafting costs. Each configuration is its own
loaded model; rounds are interleaved (none, lookup, draft, both, none, ...) and the table gives medians.

    python benchmarks/speculative.py                 # 5 rounds, 2 threads, 64 tokens
    python benchmarks/speculative.py --quick         # tiny models, 3 rounds: seconds
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


def mtp_configs(n: int) -> dict[str, SpeculativeConfig | None]:
    return {"none": None, "mtp": SpeculativeConfig(mtp=True), f"lookup {n}": SpeculativeConfig(lookup=n),
            f"lookup {n} + mtp": SpeculativeConfig(lookup=n, mtp=True)}


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
    ap.add_argument("-n", "--n-gen", type=int, default=64)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--lookup", type=int, default=8)
    ap.add_argument("--type", default="q8_0")
    ap.add_argument("--quick", action="store_true", help="tiny models, 3 rounds")
    ap.add_argument("--only", choices=("draft", "mtp", "cost"), help="one of the comparisons")
    args = ap.parse_args(argv)
    quick = args.quick
    rounds = 3 if quick else args.rounds
    print(f"{machine()} (load average {os.getloadavg()[0]:.1f} at the start); {args.threads} threads; greedy, "
          f"{args.n_gen} tokens a reply, median of {rounds} interleaved rounds")
    if args.only in (None, "cost"):
        target = QUICK_TARGET if quick else TARGET
        print(f"\n## verification cost, {target.name} {args.type}\n")
        print(verification_cost(build_gguf(target, args.type, CACHE / "speculative"), args.threads, 7), flush=True)
    if args.only in (None, "draft"):
        target, draft = (QUICK_TARGET, QUICK_DRAFT) if quick else (TARGET, DRAFT)
        draft_path = build_gguf(draft, args.type, CACHE / "speculative")
        print(f"\n## {target.name} {args.type}, draft model {draft.name} {args.type}")
        compare(build_gguf(target, args.type, CACHE / "speculative"), configs(draft_path, args.lookup), args, rounds)
    if args.only in (None, "mtp"):
        target = QUICK_MTP_TARGET if quick else MTP_TARGET
        print(f"\n## {target.name} {args.type} (glm4moe with its MTP layer)")
        compare(build_gguf(target, args.type, CACHE / "speculative"), mtp_configs(args.lookup), args, rounds)
    return 0


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


def compare(path: Path, specs: dict[str, SpeculativeConfig | None], args: argparse.Namespace, rounds: int) -> None:
    models = {}
    try:
        for name, spec in specs.items():
            models[name] = load(path, n_ctx=4096, n_threads=args.threads, **(spec.options() if spec is not None else {}))
            models[name].stop_ids = frozenset()  # every reply n_gen tokens long (a random model may say eos early)
        for task, prompt in TASKS.items():
            print(f"\n{task} ({len(models['none'].prompt_ids([Message('user', prompt)]))} prompt tokens)\n")
            print(table(run_task(models, prompt, rounds, args.n_gen)), flush=True)
    finally:
        for m in models.values():
            m.close()


if __name__ == "__main__":
    raise SystemExit(main())

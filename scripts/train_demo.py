#!/usr/bin/env python3
"""Train the bundled demo model: a tiny ChatGLM3-architecture chat model on synthetic bilingual dialogues.

Steps: generate dialogues (chatglm.devtools.dialogues) -> train a SentencePiece tokenizer shaped like ChatGLM3's ->
train a transformers GlmForCausalLM on token-exact ChatGLM3 chat sequences (CPU, seeded) -> save it in the published
ChatGLM3 layout (chatglm.devtools.checkpoints) -> reload the saved files, check greedy replies, write expected.json and
the model card.

    python scripts/train_demo.py --out chatglm/models/demo

Needs torch, transformers, sentencepiece and safetensors (the ``test`` extra). Printing is this script's output.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from chatglm.devtools import checkpoints as ck
from chatglm.devtools.chatformat import ChatEncoder, Message
from chatglm.devtools.corpus import training_texts
from chatglm.devtools.dialogues import GREETING_ZH, all_texts, make_dialogues

IGNORE = -100


@dataclass(frozen=True)
class Shape:
    hidden: int = 256
    layers: int = 4
    heads: int = 4
    kv_groups: int = 2
    ffn: int = 640
    sp_vocab: int = 2000
    padded_vocab: int = 2048
    seq_length: int = 2048


@dataclass(frozen=True)
class Case:
    name: str
    history: tuple[Message, ...]
    query: str


CASES = (
    Case("greeting_zh", (), "你好"),
    Case("add_en", (), "What is 2+3?"),
    Case("add_en_system", (Message("system", "You are a helpful assistant."),), "What is 2+3?"),
    Case("greeting_en", (), "Hello"),
    Case("intro_zh", (), "你是谁？"),
    Case("tool_convert", (), "What does chatglm convert do?"),
    Case("multi_turn", (Message("user", "你好"), Message("assistant", GREETING_ZH)), "What is 2+3?"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("chatglm/models/demo"),
                   help="output folder (default: chatglm/models/demo)")
    p.add_argument("--steps", type=int, default=1200, help="optimizer steps (default: 1200)")
    p.add_argument("--seed", type=int, default=0, help="seed for data, tokenizer and weights (default: 0)")
    p.add_argument("--batch", type=int, default=16, help="dialogues per step (default: 16)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: 1e-3)")
    p.add_argument("--dialogues", type=int, default=6000, help="random dialogues generated (default: 6000)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    return p.parse_args(argv)


def encode_dialogue(enc: ChatEncoder, dialogue: list[Message]) -> tuple[list[int], list[int]]:
    """Ids and labels of one dialogue; only assistant replies (with the closing ``<|user|>``) carry loss."""
    user_id, assistant_id = enc.special["<|user|>"], enc.special["<|assistant|>"]
    ids, labels = enc.prefix(), [IGNORE, IGNORE]
    for msg in dialogue:
        if msg.role == "assistant":
            reply = enc.reply_ids(msg.content)  # "\n" + reply + <|user|>
            ids += [assistant_id, *reply]
            labels += [IGNORE, *reply]
            continue
        part = enc.message(msg)
        if msg.role == "user" and ids[-1] == user_id:  # the previous reply already emitted <|user|>
            part = part[1:]
        ids += part
        labels += [IGNORE] * len(part)
    return ids, labels


def make_batch(examples: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    ids = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T), right-padded with <unk>=0
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)  # (B, T)
    for row, (x, y) in enumerate(examples):
        ids[row, : len(x)] = torch.tensor(x)
        labels[row, : len(y)] = torch.tensor(y)
    return ids, labels


def build_model(shape: Shape, enc: ChatEncoder, seed: int):
    from transformers import GlmConfig, GlmForCausalLM

    torch.manual_seed(seed)
    config = GlmConfig(
        vocab_size=shape.padded_vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.ffn,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_groups,
        head_dim=shape.hidden // shape.heads,
        max_position_embeddings=shape.seq_length,
        rms_norm_eps=1e-5,
        attention_bias=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=enc.stop_ids(),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    return GlmForCausalLM(config).to(torch.float32)


def batches(n_examples: int, lengths: list[int], batch: int, rng: random.Random):
    """Endless epochs of index batches of similar length (little padding), in random order."""
    while True:
        order = list(range(n_examples))
        rng.shuffle(order)
        order.sort(key=lambda i: lengths[i])  # stable: random order among equal lengths
        chunks = [order[i : i + batch] for i in range(0, n_examples, batch)]
        rng.shuffle(chunks)
        yield from chunks


def lr_at(step: int, steps: int, peak: float) -> float:
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, examples, args: argparse.Namespace) -> float:
    """AdamW with warmup + cosine decay; returns the mean loss of the last 50 steps."""
    rng = random.Random(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01)
    model.train()
    recent: list[float] = []
    start = time.time()
    stream = batches(len(examples), [len(x) for x, _ in examples], args.batch, rng)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        ids, labels = make_batch([examples[i] for i in next(stream)])
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-50:]
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:5d}/{args.steps}  loss {loss.item():.4f}  avg50 {sum(recent) / len(recent):.4f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  {time.time() - start:6.1f}s", flush=True)  # fmt: skip
    model.eval()
    return sum(recent) / len(recent)


def min_margin(model, prompt: list[int], out: list[int]) -> float:
    """Smallest gap between the top two logits over the generated positions (how robust the greedy path is)."""
    logits = ck.reference_logits(model, prompt + out)[len(prompt) - 1 : -1]  # (len(out), V)
    top2 = torch.from_numpy(logits).topk(2, dim=-1).values  # (len(out), 2)
    return float((top2[:, 0] - top2[:, 1]).min())


def run_cases(model, enc: ChatEncoder) -> list[dict]:
    results = []
    for case in CASES:
        prompt = enc.prompt(list(case.history), case.query)
        out = ck.greedy_generate(model, prompt, enc.stop_ids())
        results.append(
            {
                "name": case.name,
                "history": [{"role": m.role, "content": m.content} for m in case.history],
                "query": case.query,
                "prompt_ids": prompt,
                "generated_ids": out,
                "reply": enc.decode_reply(out),
                "min_top2_logit_gap": round(min_margin(model, prompt, out), 3),
            }
        )
        print(f"  [{case.name}] {case.query!r} -> {results[-1]['reply']!r}")
    return results


def check_cases(results: list[dict], enc: ChatEncoder) -> list[str]:
    """Problems with the greedy replies (empty list when the demo behaves)."""
    by_name = {r["name"]: r for r in results}
    problems = []
    if "你好" not in by_name["greeting_zh"]["reply"]:
        problems.append(f"greeting_zh: no Chinese greeting in {by_name['greeting_zh']['reply']!r}")
    for name in ("add_en", "add_en_system", "multi_turn"):
        if "= 5" not in by_name[name]["reply"]:
            problems.append(f"{name}: no '= 5' in {by_name[name]['reply']!r}")
    for r in results:
        if not r["generated_ids"] or r["generated_ids"][-1] != enc.special["<|user|>"]:
            problems.append(f"{r['name']}: reply did not end with <|user|>")
    return problems


MODEL_CARD = """\
# ChatGLM3 demo model (toy)

A **toy**: a {params:,}-parameter model with the ChatGLM3-6B architecture, trained for a few minutes on a CPU on
**synthetic** bilingual dialogues generated by `scripts/train_demo.py`. It knows greetings, a self-introduction,
small-number arithmetic, weekdays and months, and one sentence about each `chatglm` command (`convert`, `run`, `serve`,
`info`, `quantize`, `bench`), in Chinese and English. It knows nothing else and is not a language model in any useful
sense: it exists so that conversion, tokenization, chat formatting and generation can be tested end to end with real,
sensible output and without downloading 12 GB.

## Files (Hugging Face ChatGLM3 layout)

| file | content |
|---|---|
| `config.json` | the published ChatGLM3 keys (`model_type: chatglm`, `num_layers`, `padded_vocab_size`, ...) |
| `model.safetensors` | {dtype} weights under the published names (`transformer.encoder.layers.N.self_attention.query_key_value.weight`, ...) |
| `tokenizer.model` | SentencePiece BPE ({sp_vocab} pieces, byte fallback); ChatGLM3's 9 special tokens follow at ids {first_special}-{last_special} |
| `tokenizer_config.json` | as published (remote-code `ChatGLMTokenizer`) |
| `expected.json` | the greedy replies to a few prompts, computed with transformers from the saved files |

The remote-code Python files of the published repository (`modeling_chatglm.py`, ...) are not included.

Shape: hidden {hidden}, {layers} layers, {heads} heads of {head_dim}, {kv_groups} KV groups (`multi_query_group_num`),
FFN {ffn} (SwiGLU), vocabulary {sp_vocab} + 9 special tokens padded to {padded_vocab}, `seq_length` {seq_length},
RoPE on half of each head (base 10000), qkv bias, RMSNorm.

## How it was made

```
{command}
```

- seed {seed}, {steps} steps of AdamW (batch {batch} dialogues, peak lr {lr}, warmup + cosine), torch {torch_version}
  on CPU, `torch.set_num_threads({threads})`; training took {train_s:.0f} s, whole script {total_s:.0f} s
- mean training loss over the last 50 steps: {final_loss:.4f} (loss only on assistant tokens)
- data: {n_dialogues} dialogues ({n_random} random + every `a+b` for single-digit a, b in six phrasings), each an optional
  system message then 1-3 user/assistant turns, encoded token-exactly as ChatGLM3's `build_chat_input`:
  `[gMASK] sop`, then per message `<|role|>` + sp.encode(metadata + "\\n") + sp.encode(content), each assistant reply
  followed by `<|user|>` (where the published model stops)
- tokenizer: trained by the same script on the dialogue texts plus `chatglm.devtools.corpus.training_texts()`

Greedy replies of the saved model (transformers, float32 compute on the {dtype} weights):

{replies}

Single-digit arithmetic over the whole table, greedy, English phrasing ("What is a+b?" etc.): {arithmetic}.
Anything outside the training topics gets a confident but meaningless reply.

Regenerating with the same command and library versions reproduces these files; other torch versions may differ in the
last bits and so in the weights (the tests compare replies, not bytes).
"""


def _history_note(history: list[dict]) -> str:
    if not history:
        return ""
    return " (after " + ", ".join(f"{m['role']}: `{m['content']}`" for m in history) + ")"


def arithmetic_accuracy(model, enc: ChatEncoder) -> str:
    """Exact-reply accuracy of +, - and * over single-digit operands (the card's honesty line)."""
    tables = {
        "addition": [(f"What is {a}+{b}?", f"{a} + {b} = {a + b}.") for a in range(10) for b in range(10)],
        "subtraction": [(f"What is {a}-{b}?", f"{a} - {b} = {a - b}.") for a in range(10) for b in range(a + 1)],
        "multiplication": [(f"What is {a}*{b}?", f"{a} × {b} = {a * b}.") for a in range(10) for b in range(10)],
    }
    parts = []
    for name, pairs in tables.items():
        ok = sum(
            enc.decode_reply(ck.greedy_generate(model, enc.prompt([], q), enc.stop_ids(), 16)) == r for q, r in pairs
        )
        parts.append(f"{name} {ok}/{len(pairs)}")
    return ", ".join(parts)


def write_card(out: Path, shape: Shape, args: argparse.Namespace, stats: dict, results: list[dict]) -> None:
    replies = "\n".join(f"- `{r['query']}`{_history_note(r['history'])} → {r['reply']}" for r in results)
    text = MODEL_CARD.format(
        **vars(shape), **stats, head_dim=shape.hidden // shape.heads, dtype=args.dtype, seed=args.seed,
        steps=args.steps, batch=args.batch, lr=args.lr, threads=args.threads, torch_version=torch.__version__,
        first_special=shape.sp_vocab, last_special=shape.sp_vocab + 8, replies=replies,
    )  # fmt: skip
    (out / "README.md").write_text(text)


def write_expected(out: Path, args: argparse.Namespace, results: list[dict]) -> None:
    doc = {
        "version": 1,
        "about": "Greedy ChatGLM3-format replies of this model, computed with transformers GlmForCausalLM in float32 "
        "from the saved weights. generated_ids end with the stop id (<|user|>); min_top2_logit_gap is the smallest "
        "difference between the best and second-best logit along the greedy path. Regenerate with the command in "
        "README.md.",
        "seed": args.seed,
        "steps": args.steps,
        "cases": results,
    }
    (out / "expected.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    torch.set_num_threads(args.threads)
    shape = Shape()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    dialogues = make_dialogues(args.dialogues, args.seed)
    print(f"{len(dialogues)} dialogues generated")
    tok = ck.train_sentencepiece(out / "tokenizer.model", all_texts(dialogues) + training_texts(),
                                 vocab_size=shape.sp_vocab, seed=args.seed)  # fmt: skip
    enc = ChatEncoder(str(tok))
    examples = [encode_dialogue(enc, d) for d in dialogues]
    print(f"tokenizer: {enc.sp.vocab_size()} pieces; {sum(len(x) for x, _ in examples)} tokens, "
          f"longest dialogue {max(len(x) for x, _ in examples)}")  # fmt: skip
    model = build_model(shape, enc, args.seed)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters")
    t1 = time.time()
    final_loss = train(model, examples, args)
    train_s = time.time() - t1
    ck.save_chatglm_checkpoint(model, out, tok, family="chatglm3", dtype=args.dtype, name_or_path="chatglm-demo")
    print("greedy replies of the saved checkpoint:")
    saved = ck.load_chatglm_checkpoint(out)
    results = run_cases(saved, enc)
    write_expected(out, args, results)
    command = "python scripts/train_demo.py " + " ".join(sys.argv[1:] if argv is None else argv)
    arithmetic = arithmetic_accuracy(saved, enc)
    print(f"arithmetic: {arithmetic}")
    stats = {
        "params": params,
        "final_loss": final_loss,
        "train_s": train_s,
        "total_s": time.time() - t0,
        "command": command,
        "n_dialogues": len(dialogues),
        "n_random": args.dialogues,
        "arithmetic": arithmetic,
    }
    write_card(out, shape, args, stats, results)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out} ({size / 1e6:.2f} MB) in {time.time() - t0:.0f} s; final loss {final_loss:.4f}")
    problems = check_cases(results, enc)
    for problem in problems:
        print("CHECK FAILED:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

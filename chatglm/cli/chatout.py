"""What a chat prints besides the reply, shared by ``chatglm run -p`` and the interactive chat (:mod:`chatglm.cli.repl`):
the model's thinking (dimmed, apart from the answer), tool calls, context notes, the ``--verbose`` stats line."""

from __future__ import annotations

import json
import sys

import typer

DIM, RESET = "\x1b[2m", "\x1b[0m"


class ThinkingPrinter:
    """Prints the reasoning as it streams, before the answer: dimmed on a terminal, between ``<think>`` lines
    otherwise (so a pipe still tells it from the answer); ``shown=False`` hides it."""

    def __init__(self, shown: bool = True, stream=None):
        self.shown = shown
        self._stream = stream
        self.open = False

    @property
    def stream(self):
        return self._stream if self._stream is not None else sys.stdout

    def __call__(self, piece: str) -> None:
        if not self.shown or not piece:
            return
        tty = self.stream.isatty()
        if not self.open:
            self.stream.write(DIM if tty else "<think>\n")
            self.open = True
        self.stream.write(piece)
        self.stream.flush()

    def end(self) -> None:
        """The answer starts: close the thinking block (if one is open)."""
        if self.open:
            self.stream.write(RESET + "\n\n" if self.stream.isatty() else "\n</think>\n\n")
            self.stream.flush()
            self.open = False


def context_notes(m, dropped: int) -> list[str]:
    """What the user should know about the context after a reply: old messages dropped, a reply cut off by it.

    Notes go to stderr on their own line after the reply (or to ``notes`` in --json), never into the reply."""
    n_ctx, s = m.info.n_ctx, m.last_stats
    notes = []
    if dropped:
        notes.append(f"the conversation outgrew the context of {n_ctx} tokens; its {dropped} oldest messages were "
                     "dropped to make room (the system message stays)")
    if s.finish_reason == "length" and s.prompt_tokens + s.generated_tokens >= n_ctx:
        notes.append(f"the reply was cut off at the end of the context of {n_ctx} tokens (--ctx gives more)")
    return notes


def format_tool_call(call) -> str:
    args = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments, ensure_ascii=False)
    return f"[tool call] {call.name}({args})"


def print_stats(m) -> None:
    s = m.last_stats
    typer.echo(f"[prompt {s.prompt_tokens} tokens ({s.evaluated_tokens} evaluated, {s.prefill_tps:.1f} tok/s), "
               f"reply {s.generated_tokens} tokens ({s.decode_tps:.1f} tok/s){speculation_text(m)}, "
               f"{s.finish_reason}]", err=True)


def speculation_text(m) -> str:
    """", drafts 30/40 accepted (75%)" after a reply with speculative decoding ("" without)."""
    s = m.last_stats
    if getattr(m, "drafter", None) is None:
        return ""
    if not s.drafted_tokens:
        return ", nothing drafted"
    return (f", {m.drafter.name} drafts {s.accepted_tokens}/{s.drafted_tokens} accepted ({100 * s.acceptance:.0f}%)"
            f", lengths {lengths_text(s.draft_lengths)}")


def lengths_text(lengths: dict) -> str:
    """"0x12 4x3 8x5": how many steps drafted each number of tokens (0: a plain step)."""
    return " ".join(f"{n}x{k}" for n, k in sorted(lengths.items()))

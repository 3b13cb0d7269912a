"""The interactive chat of `chatglm run`: streamed replies, commands, multi-line input, Ctrl-C to stop a reply.

Replies go to stdout; notes, errors and statistics go to stderr. Ctrl-C while a reply streams stops it within a token
and returns to the prompt (the SIGINT handler only sets the reply's cancel event); Ctrl-C at an empty prompt, Ctrl-D or
/exit leaves.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer

from chatglm.cli.chatout import ThinkingPrinter, context_notes, format_tool_call, print_stats
from chatglm.errors import ChatGLMError, InputError
from chatglm.runtime.messages import Message
from chatglm.runtime.sampling import NULLABLE, knobs
from chatglm.runtime.session import ChatSession

PROMPT, MORE, OBSERVATION = ">>> ", "... ", "observation> "
FENCE = '"""'
HELP = f"""Commands:
  /help                 this help
  /clear                start a new conversation (the system message stays)
  /system [TEXT]        set the system message (show it when no text is given)
  /set [NAME VALUE]     change a setting ("/set seed none" clears {" or ".join(NULLABLE)}; no arguments shows them):
                        {", ".join(knobs())}
  /think [on|off]       thinking on or off (the template's enable_thinking; no argument shows it)
  /thoughts [show|hide] show the model's thinking (dimmed) or hide it
  /show                 model information and current settings
  /save FILE            write the conversation as JSON
  /load FILE            replace the conversation with one saved by /save
  /image PATH           attach an image to the next message, before its text (a model with a projector)
  /audio FILE           attach audio (WAV, MP3, FLAC) to the next message (speech models)
  /exit                 leave (also /quit, /bye, Ctrl-D, or Ctrl-C at an empty prompt)
Input: {FENCE} starts and ends a multi-line message; inside one, a line /image PATH (or /audio FILE) puts the
image where the line is. Ctrl-C stops a reply."""
MEDIA_LINE = re.compile(r"/(image|audio)\s+(\S.*)")  # a line of a multi-line message that places a medium
SETTINGS: dict[str, type] = {name: k.kind for name, k in knobs().items()}  # /set NAME VALUE: SamplingParams


class Leave(Exception):
    """Raised by a command (or Ctrl-C / Ctrl-D at the prompt) to end the chat."""


@contextmanager
def interrupts_set(event: threading.Event) -> Iterator[None]:
    """While inside, Ctrl-C (SIGINT) sets ``event`` instead of raising KeyboardInterrupt."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, lambda _sig, _frame: event.set())
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class LineEditor:
    """``input()`` with GNU readline's line editing and a persistent history when the console has one."""

    def __init__(self, history: Optional[Path] = None):
        self.readline = None
        self.history = history
        self.interactive = sys.stdin.isatty()
        if not self.interactive:  # piped input: one message a line, no prompts in the output
            return
        try:
            import readline
        except ImportError:  # Windows without pyreadline3: plain input() still edits a line
            return
        self.readline = readline
        readline.set_history_length(1000)
        if history is not None and history.is_file():
            try:
                readline.read_history_file(str(history))
            except OSError:
                pass

    def read(self, prompt: str) -> str:
        return input(prompt if self.interactive else "")

    def pending(self) -> str:
        """The text typed on the line when Ctrl-C was pressed (readline only)."""
        return self.readline.get_line_buffer() if self.readline is not None else ""

    def save(self) -> None:
        if self.readline is None or self.history is None:
            return
        try:
            self.history.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(str(self.history))
        except OSError:
            pass


def out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def note(text: str) -> None:
    typer.echo(text, err=True)


class Repl:
    def __init__(self, session: ChatSession, *, verbose: bool = False, editor: Optional[LineEditor] = None):
        self.session = session
        self.model = session.model
        self.verbose = verbose
        self.editor = editor or LineEditor(history_path())
        self.session.on_truncate = self._truncated
        self._told_truncation = False
        self._dropped = 0  # messages dropped to fit the context during the current reply
        self.drafts = [0, 0]  # speculative decoding in this chat: drafts accepted, drafted
        self.commands: dict[str, Callable[[str], None]] = {
            "/help": self.cmd_help, "/?": self.cmd_help, "/clear": self.cmd_clear, "/system": self.cmd_system,
            "/set": self.cmd_set, "/show": self.cmd_show, "/save": self.cmd_save, "/load": self.cmd_load,
            "/exit": self.cmd_exit, "/quit": self.cmd_exit, "/bye": self.cmd_exit,
            "/think": self.cmd_think, "/thoughts": self.cmd_thoughts, "/image": self.cmd_image,
            "/audio": self.cmd_audio,
        }
        self.attached: list = []  # media for the next message (/image, /audio)
        self.thinking = ThinkingPrinter()

    def run(self) -> None:
        info = self.model.info
        note(f"{info.description} ({info.family}, {self.model.format.name} format, {info.n_ctx} tokens of context)"
             " - /help for commands, Ctrl-D or /exit to quit.")
        try:
            while True:
                text = self.read_message()
                if not text.strip():
                    continue
                if text.startswith("/") and not ("\n" in text and MEDIA_LINE.fullmatch(text.partition("\n")[0])):
                    self.command(text.strip())
                else:
                    self.send(text)
        except Leave:
            pass
        finally:
            self.editor.save()

    # -- input ------------------------------------------------------------------------------------------------
    def read_message(self) -> str:
        """One message: a line, or a block between triple quotes. Raises Leave on Ctrl-D / Ctrl-C at the prompt."""
        line = self._read(PROMPT)
        if not line.lstrip().startswith(FENCE):
            return line
        body = line.lstrip()[len(FENCE):]
        lines = []
        while not body.rstrip().endswith(FENCE):
            lines.append(body)
            try:
                body = self.editor.read(MORE)
            except KeyboardInterrupt:
                out("\n")
                return ""  # Ctrl-C abandons the block
            except EOFError:
                raise Leave from None
        lines.append(body.rstrip()[:-len(FENCE)])
        return "\n".join(lines).strip("\n")

    def _read(self, prompt: str) -> str:
        while True:
            try:
                return self.editor.read(prompt)
            except EOFError:
                out("\n")
                raise Leave from None
            except KeyboardInterrupt:
                out("\n")
                if not self.editor.pending().strip():
                    raise Leave from None

    def send(self, text: str) -> None:
        try:
            message = self.compose(text)
        except ChatGLMError as exc:
            note(f"error: {exc}")
            return
        self.attached = []
        self.turn(message)

    def compose(self, text: str) -> Message:
        """The user message typed: media attached with /image or /audio before it stand before its text; in a
        multi-line message, a line ``/image PATH`` (or ``/audio``) puts that medium where the line is."""
        lines = text.split("\n")
        kept: list[str] = []
        media = list(self.attached)
        for line in lines:
            match = MEDIA_LINE.fullmatch(line.strip()) if len(lines) > 1 else None
            if match is None:
                kept.append(line)
                continue
            at = len("\n".join(kept)) + bool(kept)  # the start of the next line
            media.append(replace(self.checked(match[1], match[2]), offset=at))
        body = "\n".join(kept)
        return Message("user", body, media=tuple(replace(x, offset=min(x.offset, len(body))) for x in media))

    # -- replies ----------------------------------------------------------------------------------------------
    def turn(self, message: Optional[Message]) -> None:
        """Send a message and stream the reply; a tool call asks for its observation and continues."""
        while message is not None:
            reply = self.reply(message)
            if reply is None or not reply.tool_calls:
                return
            for call in reply.tool_calls:
                note(format_tool_call(call))
            if not self.session.tools or self.model.last_stats.finish_reason != "stop":
                return
            message = self.read_observation()

    def reply(self, message: Message) -> Optional[Message]:
        cancel = threading.Event()
        wrote = False
        self._dropped = 0
        try:
            with interrupts_set(cancel):
                for delta in self.session.stream_chat(message, cancel=cancel, on_thinking=self.thinking):
                    self.thinking.end()
                    out(delta)
                    wrote = True
            self.thinking.end()
        except ChatGLMError as exc:
            self.thinking.end()
            if wrote:
                out("\n")
            note(f"error: {exc}")
            return None
        out("\n")
        self.tell_context()
        stats = self.model.last_stats
        self.drafts = [self.drafts[0] + stats.accepted_tokens, self.drafts[1] + stats.drafted_tokens]
        if self.verbose:
            print_stats(self.model)
        return self.session.last_reply

    def tell_context(self) -> None:
        """The context notes of the last reply, each on its own line after it (dropped rounds: once a chat)."""
        dropped, self._dropped = self._dropped, 0
        if self._told_truncation:
            dropped = 0
        self._told_truncation = self._told_truncation or bool(dropped)
        for text in context_notes(self.model, dropped):
            note(f"note: {text}")

    def read_observation(self) -> Optional[Message]:
        """The tool's result, typed by the user (nothing is run here). Ctrl-C / Ctrl-D return to the prompt."""
        try:
            text = self.editor.read(OBSERVATION)
        except (KeyboardInterrupt, EOFError):
            out("\n")
            return None
        return Message("observation", text)

    def _truncated(self, dropped: int) -> None:
        self._dropped += dropped  # told after the reply's own line ends (tell_context)

    # -- commands ---------------------------------------------------------------------------------------------
    def command(self, line: str) -> None:
        name, _, arg = line.partition(" ")
        handler = self.commands.get(name.lower())
        if handler is None:
            note(f"error: unknown command {name}; /help lists the commands")
            return
        try:
            handler(arg.strip())
        except ChatGLMError as exc:
            note(f"error: {exc}")

    def cmd_image(self, arg: str) -> None:
        self.attach("image", arg)

    def cmd_audio(self, arg: str) -> None:
        self.attach("audio", arg)

    def attach(self, kind: str, arg: str) -> None:
        """/image, /audio: check the file now (a text-only model refuses it now), send it with the next message."""
        media = self.checked(kind, arg)
        self.attached.append(media)
        size = f"{media.width}x{media.height}" if kind == "image" else f"{media.frames / max(media.sample_rate, 1):.1f} s"
        note(f"attached {media.name} ({size}) to the next message")

    def checked(self, kind: str, arg: str):
        """The medium a /image or /audio names, read and checked (a text-only model refuses it now)."""
        from chatglm.runtime.media import load_media

        if not arg:
            raise InputError(f"/{kind} needs a file name")
        media = load_media(Path(arg).expanduser(), kind)
        self.model.media_of([Message("user", "", media=(media,))])
        return media

    def cmd_help(self, _arg: str) -> None:
        note(HELP)

    def cmd_think(self, arg: str) -> None:
        options = self.session.template_kwargs
        if not arg:
            state = options.get("enable_thinking")
            note(f"thinking: {'the template default' if state is None else 'on' if state else 'off'}")
            return
        if arg.lower() not in ("on", "off"):
            raise InputError(f"/think takes on or off, got {arg!r}")
        options["enable_thinking"] = arg.lower() == "on"
        note(f"thinking {arg.lower()}")

    def cmd_thoughts(self, arg: str) -> None:
        if arg.lower() not in ("show", "hide", ""):
            raise InputError(f"/thoughts takes show or hide, got {arg!r}")
        self.thinking.shown = arg.lower() != "hide" if arg else not self.thinking.shown
        note(f"thinking {'shown' if self.thinking.shown else 'hidden'}")

    def cmd_exit(self, _arg: str) -> None:
        raise Leave

    def cmd_clear(self, _arg: str) -> None:
        self.session.clear()
        note("started a new conversation")

    def cmd_system(self, arg: str) -> None:
        if not arg:
            current = self.session.system
            note(f"system: {current.content}" if current else "no system message (set one with /system TEXT)")
            return
        self.session.set_system(arg, self.session.tools)
        note("system message set")

    def cmd_set(self, arg: str) -> None:
        name, _, value = arg.partition(" ")
        if not name:
            note(settings_line(self.session))
            return
        if name not in SETTINGS:
            raise InputError(f"unknown setting {name!r}; settings: {', '.join(SETTINGS)}")
        value = value.strip()
        if not value:
            raise InputError(f"/set {name} needs a value")
        self.session.sampling = self.session.sampling.updated(**{name: parse_setting(name, value)})
        note(f"{name} = {getattr(self.session.sampling, name)}")

    def cmd_show(self, _arg: str) -> None:
        info, fmt = self.model.info, self.model.format
        system = self.session.system
        lines = [
            f"model       {info.description}",
            f"file        {info.path} ({info.size_bytes / 2**20:.1f} MiB)",
            f"family      {info.family} ({info.arch} architecture, {fmt.name} chat format)",
            f"parameters  {info.n_params:,}",
            f"context     {info.n_ctx} tokens (trained on {info.n_ctx_train}); this conversation uses "
            f"{len(self.session.tokens)}",
            f"messages    {len(self.session.messages)}",
            f"system      {system.content if system else '(none)'}",
            f"tools       {', '.join(str(t.get('name', '?')) for t in self.session.tools or []) or '(none)'}",
            settings_line(self.session),
        ]
        drafter = getattr(self.model, "drafter", None)
        if drafter is not None:
            accepted, drafted = self.drafts
            rate = f"{100 * accepted / drafted:.0f}%" if drafted else "-"
            lines.append(f"speculative {drafter.name}, up to {self.model.n_draft} tokens a step; this chat "
                         f"{accepted}/{drafted} drafts accepted ({rate})")
        out("\n".join(lines) + "\n")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise InputError("/save needs a file name")
        self.session.save(Path(arg).expanduser())
        note(f"saved {len(self.session.messages)} messages to {arg}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise InputError("/load needs a file name")
        self.session.load(Path(arg).expanduser())
        note(f"loaded {len(self.session.messages)} messages from {arg}")


def parse_setting(name: str, value: str):
    if name in NULLABLE and value.lower() in ("none", "off", "default"):
        return None
    try:
        return SETTINGS[name](value)
    except ValueError:
        kind = "an integer" if SETTINGS[name] is int else "a number"
        raise InputError(f"/set {name} needs {kind}, got {value!r}") from None


def settings_line(session: ChatSession) -> str:
    p = session.sampling
    return "settings    " + " ".join(f"{f.name}={getattr(p, f.name)}" for f in fields(p) if f.name in SETTINGS)


def history_path() -> Optional[Path]:
    from chatglm.demo import cache_dir

    try:
        return cache_dir() / "repl_history"
    except (OSError, RuntimeError):  # no home directory
        return None


__all__ = ["HELP", "LineEditor", "Repl", "interrupts_set"]

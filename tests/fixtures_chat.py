"""Fixtures for the chat API and REPL tests: a scripted toy engine and a tiny ChatGLM3 GGUF.

Import the fixtures a test module uses (``from fixtures_chat import chat_gguf, chat_model``); ``chat_gguf`` builds on
conftest's ``glm3`` checkpoint. The toy engine runs the real :class:`~chatglm.runtime.model.Model` decode loop, chat
formats and sessions without llama.cpp; the tiny GGUF goes through the real converter and llama.cpp.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pytest

from chatglm.errors import Cancelled
from chatglm.runtime.engine import Engine, ModelInfo

TOY_SPECIALS = ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "</s>")
EOS = 256 + TOY_SPECIALS.index("</s>")
ALPHABET = b"abcdefghijklmnopqrstuvwxyz"
HASH_MOD = (1 << 61) - 1


class ToyEngine(Engine):
    """Bytes are tokens 0..255, the ChatGLM3 specials follow; tokenize is UTF-8 bytes.

    The "model" answers every ``<|assistant|>`` with a newline (ChatGLM3's empty metadata line), then letters chosen
    by a hash of the whole context (so a wrong cache changes the reply), then ``<|user|>`` after ``reply_len`` tokens
    (never when ``reply_len`` is None). ``script`` overrides the tokens of a reply. Each evaluated token takes
    ``delay`` seconds, and ``cancel`` is honoured between tokens, as llama.cpp's abort callback is.
    """

    def __init__(self, n_ctx: int = 256, reply_len: Optional[int] = 6, delay: float = 0.0,
                 script: Optional[Sequence[int]] = None):
        super().__init__()
        special = {t: 256 + i for i, t in enumerate(TOY_SPECIALS)}
        self.info = ModelInfo(path=Path("toy.gguf"), arch="toy", family="chatglm3", chat_format="chatglm3",
                              n_ctx=n_ctx, n_ctx_train=n_ctx, n_vocab=256 + len(TOY_SPECIALS), n_params=0,
                              size_bytes=0, description="toy", special=special, eog=frozenset({EOS}))
        self.reply_len, self.delay, self.script = reply_len, delay, list(script) if script is not None else None
        self.hashes: list[int] = []
        self.eval_calls: list[int] = []  # tokens per _eval call
        self.eval_times: list[float] = []  # when each token's evaluation started (time.monotonic)
        self.closed = False

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def token_bytes(self, token: int) -> bytes:
        return bytes([token]) if token < 256 else b""

    def _truncate(self, n_keep: int) -> None:
        del self.tokens[n_keep:]
        del self.hashes[n_keep:]

    def _eval(self, tokens: Sequence[int], *, cancel: Optional[threading.Event] = None, progress=None) -> None:
        self.eval_calls.append(len(tokens))
        for tok in tokens:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            self.eval_times.append(time.monotonic())
            if self.delay:
                time.sleep(self.delay)
            prev = self.hashes[-1] if self.hashes else 7
            self.hashes.append((prev * 1000003 + tok + 1) % HASH_MOD)
            self.tokens.append(tok)
            self.n_evaluated += 1

    def next_token(self) -> int:
        assistant = self.info.special["<|assistant|>"]
        since = next((i for i in range(len(self.tokens)) if self.tokens[-1 - i] == assistant), None)
        if since is None:
            return ALPHABET[self.hashes[-1] % 26]
        if self.script is not None:
            return self.script[since] if since < len(self.script) else self.info.special["<|user|>"]
        if since == 0:
            return ord("\n")
        if self.reply_len is not None and since > self.reply_len:
            return self.info.special["<|user|>"]
        return ALPHABET[self.hashes[-1] % 26]

    def logits(self) -> np.ndarray:
        out = np.zeros(self.info.n_vocab, dtype=np.float32)
        out[self.next_token()] = 10.0
        return out

    def close(self) -> None:
        self.closed = True


def toy_model(**kw):
    from chatglm.runtime.model import Model

    return Model(ToyEngine(**kw))


def as_chatglm3_checkpoint(src: Path, folder: Path) -> Path:
    """A copy of a tiny ChatGLM3 checkpoint folder with the published checkpoint's tokenizer source file beside it.

    The converter never reads the checkpoint's Python files (the ChatGLM3 format comes from tokenizer_config.json's
    role tokens); the stub is there so conversion is tested on a folder shaped like the published one.
    """
    shutil.copytree(src, folder)
    (folder / "tokenization_chatglm.py").write_text(
        'ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]\n', encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def chat_gguf(glm3, tmp_path_factory) -> Path:
    """conftest's tiny ChatGLM3 checkpoint as an f32 GGUF in the ChatGLM3 chat format, by the real converter."""
    from chatglm.convert.pipeline import convert

    folder = tmp_path_factory.mktemp("chat")
    ckpt = as_chatglm3_checkpoint(glm3.ckpt, folder / "ckpt")
    return convert(ckpt, folder / "tiny-chatglm3-f32.gguf", "f32").path


@pytest.fixture(scope="session")
def chat_model(chat_gguf):
    """The tiny GGUF loaded once: greedy; one thread (llama.cpp's threads spin-wait for each other, which crawls on a
    busy machine); 512 tokens; f32 KV cache and no flash attention, so evaluating a prompt in one batch or token by
    token gives the same logits to float32 precision."""
    from chatglm.runtime.model import load
    from chatglm.runtime.sampling import SamplingParams

    with load(chat_gguf, n_ctx=512, n_threads=1, kv_type="f32", flash_attn=False,
              sampling=SamplingParams(temperature=0.0)) as model:
        yield model


def toy_repl_main(argv: Sequence[str]) -> None:
    """Run the REPL over a slow toy model that never ends a reply by itself (for the pseudo-terminal tests):
    ``python fixtures_chat.py [DELAY]``."""
    from chatglm.cli.repl import Repl

    delay = float(argv[0]) if argv else 0.01
    Repl(toy_model(n_ctx=4096, reply_len=None, delay=delay).session()).run()


if __name__ == "__main__":
    import sys

    toy_repl_main(sys.argv[1:])

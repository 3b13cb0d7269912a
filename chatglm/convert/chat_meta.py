"""What the checkpoint says about chatting, written into every GGUF: its chat template (``tokenizer.chat_template``,
as llama.cpp's converter writes it) and its end-of-generation ids (``glm.stop_token_ids``: the ``eos_token_id`` of
generation_config.json and config.json, an int or a list), which the runtime stops on besides the vocabulary's eos.
"""

from __future__ import annotations

import logging
from pathlib import Path
import gguf

from chatglm.errors import InputError
from chatglm.limits import MAX_CHAT_TEMPLATE, MAX_STOP_TOKENS
from chatglm.schema import keys

log = logging.getLogger(__name__)


def checkpoint_template(folder: Path) -> str:
    """chat_template.jinja, else tokenizer_config.json's ``chat_template`` (a string or named list), bounded."""
    from chatglm.convert.vocab_bpe import chat_template_of

    jinja = folder / "chat_template.jinja"
    if jinja.is_file() and jinja.stat().st_size > MAX_CHAT_TEMPLATE:
        raise InputError(f"the chat template is larger than {MAX_CHAT_TEMPLATE:,} bytes", jinja)
    template = chat_template_of(folder / "tokenizer_config.json")
    if len(template.encode("utf-8", "surrogatepass")) > MAX_CHAT_TEMPLATE:
        raise InputError(f"the chat template is larger than {MAX_CHAT_TEMPLATE:,} bytes",
                         jinja if jinja.is_file() else folder / "tokenizer_config.json")
    try:
        template.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the chat template is not valid UTF-8 text (a lone surrogate)",
                         folder / "tokenizer_config.json") from None
    return template


def eos_ids(folder: Path, generation: dict, config: dict, n_vocab: int) -> list[int]:
    """generation_config.json's eos ids, then config.json's (both type-checked when the checkpoint was opened),
    deduplicated. Ids outside the vocabulary are left out (the model can never generate them: transformers' default
    configs name the full-size vocabulary's ids), and so is -1 ("none")."""
    found: list[int] = []
    for data, name in ((generation, "generation_config.json"), (config, "config.json")):
        value = data.get("eos_token_id")
        items = [] if value is None else value if isinstance(value, list) else [value]
        if len(items) > MAX_STOP_TOKENS:
            raise InputError(f"eos_token_id lists {len(items)} ids (at most {MAX_STOP_TOKENS})", folder / name)
        for item in items:
            if 0 <= item < n_vocab and item not in found:
                found.append(item)
            elif item >= n_vocab:
                log.info("%s: eos_token_id %d is outside the vocabulary of %d tokens: left out", folder / name, item,
                         n_vocab)
    return found


def write_chat_metadata(w: gguf.GGUFWriter, ckpt, n_vocab: int) -> None:
    """The checkpoint's chat template and eos ids (``ckpt``: the :class:`~chatglm.convert.checkpoint.Checkpoint`)."""
    folder = ckpt.dir
    template = checkpoint_template(folder)
    if template:
        w.add_chat_template(template)
    stops = eos_ids(folder, ckpt.generation, ckpt.config, n_vocab) if n_vocab else []
    if stops:
        w.add_array(keys.STOP_TOKEN_IDS, stops)

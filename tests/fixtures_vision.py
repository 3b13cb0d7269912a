"""What the multimodal tests share: the relative error they bound, and the check that a vision checkpoint's language
model, converted without its projector beside it, chats on text alone with transformers' logits."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from chatglm.runtime.messages import Message
from chatglm.runtime.model import load


def relative(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def check_text_alone(gguf: Path, reference: Callable, question: str, tmp_path: Path, **settings) -> None:
    """``gguf`` loaded with no projector beside it takes text only, and its logits for ``question`` are within 1e-4
    of ``reference`` (a transformers model taking ``input_ids``)."""
    import torch

    alone = tmp_path / "alone.gguf"  # no projector beside it
    alone.symlink_to(gguf)
    with load(alone, **settings) as model:
        assert model.media is None
        ids = model.prompt_ids([Message("user", question)])
        with torch.no_grad():
            ref = reference(input_ids=torch.tensor([ids])).logits[0].numpy()
        assert relative(model.engine.all_logits(ids), ref) < 1e-4

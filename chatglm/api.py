"""``chatglm.load``: the runtime's :func:`chatglm.runtime.model.load`, plus the bundled demo model when no path is
given. The demo's first-use conversion starts here (as it does in the CLI's ``run`` and ``serve``), so the runtime
itself only ever reads GGUF files and has no path to the converter."""

from __future__ import annotations

import os
from typing import Optional, Sequence

from chatglm.runtime import model as runtime
from chatglm.runtime.sampling import SamplingParams
from chatglm.runtime.speculative import DEFAULT_DRAFT
from chatglm.store import resolve


def load(path: Optional[os.PathLike | str] = None, *, n_ctx: Optional[int] = None, n_threads: Optional[int] = None,
         n_gpu_layers: int = 0, flash_attn: Optional[bool] = None, kv_type: str = "f16",
         chat_format: Optional[str] = None, sampling: Optional[SamplingParams] = None,
         on_progress: Optional[runtime.ProgressCallback] = None,
         lora: Sequence[tuple[os.PathLike | str, float]] = (),
         mmproj: Optional[os.PathLike | str] = None, rpc: Sequence[str] = (),
         tensor_split: Sequence[float] = (), lookup: int = 0, draft: Optional[os.PathLike | str] = None,
         draft_max: int = DEFAULT_DRAFT, mtp: bool = False, adaptive: bool = True) -> runtime.Model:
    """Load a GGUF (a path, or a store name such as ``ORG/REPO:q4_k_m``; a path that exists wins; with no path, the
    bundled demo model, converted into the cache on first use) and return a
    :class:`~chatglm.runtime.model.Model`; the keywords are :func:`chatglm.runtime.model.load`'s, and for
    speculative decoding (docs/speculative.md): ``lookup=N`` drafts up to N tokens by prompt lookup, ``draft`` names a
    small GGUF with the same vocabulary that drafts up to ``draft_max`` tokens (a path or a store name), ``mtp=True``
    lets a GLM-4.5-style model's own MTP layer draft one token a step; ``adaptive`` (the default) drafts only as many as pay
    (as the CLI does)."""
    if path is None:
        from chatglm.demo import demo_gguf

        path = demo_gguf()
    path = resolve(path)
    return runtime.load(path, n_ctx=n_ctx, n_threads=n_threads, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn,
                        kv_type=kv_type, chat_format=chat_format, sampling=sampling, on_progress=on_progress,
                        lora=lora, mmproj=mmproj, rpc=rpc, tensor_split=tensor_split, lookup=lookup,
                        draft=resolve(draft) if draft is not None else None, draft_max=draft_max, mtp=mtp,
                        adaptive=adaptive)

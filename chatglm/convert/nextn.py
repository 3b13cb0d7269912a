"""NextN / multi-token-prediction (MTP) layers, kept for speculative decoding.

Published GLM MoE checkpoints (GLM-4.5 ... GLM-4.7, GLM-4.7-Flash, GLM-5) carry ``num_nextn_predict_layers`` layers
after the last decoder layer, ``model.layers.{L}.``: a full decoder block plus ``eh_proj`` (the projection of
[enorm(embedding); hnorm(hidden)]), ``enorm``, ``hnorm``, ``shared_head.norm`` and, in some checkpoints, their own
``embed_tokens`` and ``shared_head.head``. llama.cpp keeps them as ``blk.{L}.nextn.*`` beside the block's ordinary
tensors, with ``block_count`` = L + n and ``nextn_predict_layers`` = n; its trunk graph runs only the first L blocks,
so the model's logits do not change. A family calls :func:`nextn_count` for n and :func:`nextn_tensors` for the
extra tensors of each MTP block (its own code writes the block's decoder tensors with ``bid`` = L, L+1, ...).
"""

from __future__ import annotations

import gguf

from chatglm.convert.family import Family, OutTensor

T = gguf.MODEL_TENSOR
NEXTN_KEY = "num_nextn_predict_layers"
# GGUF tensor -> the source name under model.layers.{bid}. (without .weight); (n_embd,) unless said otherwise
_REQUIRED = {T.NEXTN_EH_PROJ: "eh_proj", T.NEXTN_ENORM: "enorm", T.NEXTN_HNORM: "hnorm",
             T.NEXTN_SHARED_HEAD_NORM: "shared_head.norm"}
_VOCAB_SIZED = {T.NEXTN_EMBED_TOKENS: "embed_tokens", T.NEXTN_SHARED_HEAD_HEAD: "shared_head.head"}


def nextn_count(family: Family, n_layer: int) -> int:
    """``num_nextn_predict_layers`` (0 when absent); fewer than the trunk's layers, as llama.cpp requires."""
    n = family.cfg_int(NEXTN_KEY, default=0, minimum=0)
    if n >= n_layer:  # llama.cpp: NextN layers are counted in, and fewer than, block_count
        raise family.bad(f"num_nextn_predict_layers={n} is not below num_hidden_layers={n_layer}")
    return n


def nextn_tensors(family: Family, bid: int, n_embd: int, n_vocab: int) -> list[OutTensor]:
    """The MTP-specific tensors of block ``bid``: the four every MTP layer has, plus its own embedding and head when
    the checkpoint holds them (llama.cpp falls back to the model's token_embd and output otherwise)."""
    src = f"model.layers.{bid}."
    present = set(family.ckpt.names())
    shapes = {T.NEXTN_EH_PROJ: (n_embd, 2 * n_embd)}
    plan = []
    for kind, name in _REQUIRED.items():
        plan.append(_tensor(kind, bid, shapes.get(kind, (n_embd,)), f"{src}{name}.weight"))
    for kind, name in _VOCAB_SIZED.items():
        if f"{src}{name}.weight" in present:
            plan.append(_tensor(kind, bid, (n_vocab, n_embd), f"{src}{name}.weight"))
    return plan


def _tensor(kind: T, bid: int, shape: tuple[int, ...], source: str) -> OutTensor:
    return OutTensor(f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.weight", shape, (source,))


def write_nextn(w: gguf.GGUFWriter, n_nextn: int) -> None:
    """``nextn_predict_layers``, written only when the file has MTP layers (as llama.cpp's converter does)."""
    if n_nextn:
        w.add_nextn_predict_layers(n_nextn)

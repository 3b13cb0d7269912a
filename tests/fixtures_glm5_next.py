"""The tiny GLM-5.3-Flash checkpoint (chatglm/devtools/glm5_next.py), built once per test session: bfloat16, sharded,
with the vision tower and the NextN layer, as users download it; its f32 GGUF; the transformers model it came from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from chatglm.convert.pipeline import convert

SEQUENCE_LENGTH = 80  # > index_topk (8), the k-pool (4) and the linear attention's 64-token chunk


@dataclass
class Tiny5:
    model: Any  # transformers' Glm5NextForConditionalGeneration, float32, bfloat16-valued weights
    ckpt: Path
    gguf: Path
    ids: list[int]
    ref: np.ndarray  # transformers' float32 logits of ``ids``


@pytest.fixture(scope="session")
def glm5(workdir) -> Tiny5:
    from chatglm.devtools import glm5_next
    from chatglm.devtools.glm4 import GLM4_SPECIALS, GLM45_EXTRA_SPECIALS, train_glm4_bpe

    from chatglm.devtools.glm_vision import IMAGE_SPECIALS

    # the image tokens too, as the published vocabulary has them (the projector beside the GGUF needs <|image|>)
    tok = train_glm4_bpe(vocab_size=400, specials=GLM4_SPECIALS + GLM45_EXTRA_SPECIALS + IMAGE_SPECIALS)
    model = glm5_next.tiny_model(tok.get_vocab_size() + 7, bf16_values=True)
    ckpt = glm5_next.save_checkpoint(model, workdir / "glm5-next", tok, bf16=True)
    path = convert(ckpt, workdir / "glm5-next-f32.gguf", "f32").path
    ids = [int(i) for i in np.random.default_rng(5).integers(0, tok.get_vocab_size(), SEQUENCE_LENGTH)]
    return Tiny5(model, ckpt, path, ids, glm5_next.reference_logits(model, ids))


def rewrite_gguf(src: Path, dst: Path, kv: dict[str, Any], drop: tuple[str, ...] = ()) -> Path:
    """A copy of GGUF ``src`` with metadata ``kv`` changed (None deletes a key) and tensors ``drop`` left out."""
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        value = kv.pop(name, field.contents())
        if value is None:
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            w.add_key_value(name, value, kind, sub_type=field.types[-1] if isinstance(value, list) else None)
        else:
            w.add_key_value(name, value, kind)
    for name, value in kv.items():
        if value is not None:
            w.add_key_value(name, value, gguf.GGUFValueType.UINT32 if type(value) is int else
                            gguf.GGUFValueType.FLOAT32)
    for t in reader.tensors:
        if t.name not in drop:
            w.add_tensor(t.name, np.asarray(t.data), raw_shape=None, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst

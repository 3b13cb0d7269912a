"""Weightless checkpoints: the published tensor names and shapes of a model, without its weights (benchmarks, tests).

A weightless checkpoint is a folder with ``config.json``, the tokenizer files and ``model.weightless.json`` (the
tensor table: name, dtype, shape) in place of the weight files. :class:`WeightlessCheckpoint` is a
:class:`~chatglm.convert.checkpoint.Checkpoint` whose one tensor source, :class:`WeightlessFile`, makes up every
tensor on read: random rows, N(0, 1/cols), taken cyclically from a small bank per row length, so reading any tensor,
or streaming it a block of rows at a time, costs memory proportional to the block, never to the model. Norm weights
are near 1, other vectors near 0. Values depend only on the seed, the tensor's name and the row, so two reads agree.

Every family's converter runs unchanged on it (detection, the declared-count checks against the names, the shape
checks, the tensor plan, streaming reads). :func:`save_safetensors` writes the same values as real bf16 safetensors
shards with an index, for tools that need files (llama.cpp's converter).

:func:`hf_table` gives the names and shapes of a transformers-layout checkpoint from transformers' own model class,
built on the meta device (no memory for weights), under the names ``save_pretrained`` writes (transformers' weight
conversions reverted: experts one tensor each, as published), plus ``n_nextn`` multi-token-prediction layers in the
published layout after the decoder layers.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from chatglm.convert.checkpoint import Checkpoint
from chatglm.convert.tensors import DTYPES, TensorInfo, TensorSource

TABLE_FILE = "model.weightless.json"
BANK_ROWS = 256  # distinct random rows per row length
WRITE_ELEMENTS = 1 << 24  # elements written to a shard at a time

Table = Sequence[tuple[str, tuple[int, ...]]]  # (name, shape) in file order; every tensor bf16


def _seed(seed: int, name: str) -> int:
    return (seed * 0x9E3779B1 + zlib.crc32(name.encode())) & 0xFFFFFFFF


def to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 to bfloat16 bits (uint16), rounding to nearest even."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


class WeightlessFile(TensorSource):
    """The tensors ``model.weightless.json`` lists, made up on read (bf16, deterministic)."""

    def __init__(self, path: Path):
        self.path = path
        data = json.loads(path.read_text(encoding="utf-8"))
        self.seed = int(data["seed"])
        self._infos = {}
        for name, dtype, shape in data["tensors"]:
            shape = tuple(int(x) for x in shape)
            self._infos[name] = TensorInfo(name, dtype, shape, 0, DTYPES[dtype].itemsize * math.prod(shape))
        self._banks: dict[int, np.ndarray] = {}

    def infos(self) -> dict[str, TensorInfo]:
        return self._infos

    def _bank(self, cols: int) -> np.ndarray:
        if cols not in self._banks:
            rng = np.random.default_rng(_seed(self.seed, f"bank{cols}"))
            self._banks[cols] = to_bf16(rng.standard_normal((BANK_ROWS, cols), dtype=np.float32) / math.sqrt(cols))
        return self._banks[cols]

    def raw(self, name: str) -> np.ndarray:
        shape = self._infos[name].shape
        return self.raw_rows(name, 0, shape[0]).reshape(shape)

    def raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        shape = self._infos[name].shape
        stop = min(stop, shape[0])
        if len(shape) == 1:
            rng = np.random.default_rng(_seed(self.seed, name))
            base = 1.0 if "norm" in name and name.endswith(".weight") else 0.0
            return to_bf16(base + 0.02 * rng.standard_normal(shape[0], dtype=np.float32))[start:stop]
        inner, cols = math.prod(shape[1:-1]), shape[-1]  # a 3-D tensor's rows run over its first two axes
        first, last = start * inner, stop * inner
        offset = _seed(self.seed, name) % BANK_ROWS
        rows = self._bank(cols)[(np.arange(first, last) + offset) % BANK_ROWS]
        return rows.reshape((stop - start, *shape[1:]))


class WeightlessCheckpoint(Checkpoint):
    """A :class:`Checkpoint` of a weightless folder: config.json and tokenizer files read as usual, every tensor
    from :class:`WeightlessFile`."""

    def _open_weights(self) -> None:
        self._add(WeightlessFile(self.dir / TABLE_FILE))


def write_weightless(folder: Path, config: Mapping[str, Any], table: Table, seed: int = 0) -> Path:
    """config.json and the tensor table in ``folder`` (the tokenizer files are the caller's)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tensors = [[name, "BF16", list(shape)] for name, shape in table]
    (folder / TABLE_FILE).write_text(json.dumps({"seed": seed, "tensors": tensors}), encoding="utf-8")
    return folder


def n_parameters(table: Table) -> int:
    return sum(math.prod(shape) for _, shape in table)


# ------------------------------------------------------------------------------------------------ real files
def _shards(table: Table, n: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of about equal bytes, as ``save_pretrained(max_shard_size=...)`` cuts them."""
    total = n_parameters(table)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    done = 0
    for name, shape in table:
        if groups[-1] and done >= total * len(groups) / n and len(groups) < n:
            groups.append([])
        groups[-1].append((name, tuple(shape)))
        done += math.prod(shape)
    return groups


def _write_shard(path: Path, tensors: Iterable[tuple[str, tuple[int, ...]]], source: WeightlessFile) -> None:
    tensors = list(tensors)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            step = max(1, WRITE_ELEMENTS // max(1, math.prod(shape[1:])))
            for first in range(0, shape[0], step):
                fh.write(np.ascontiguousarray(source.raw_rows(name, first, first + step), dtype="<u2").tobytes())


def save_safetensors(folder: Path, out_dir: Path, shards: int = 2) -> Path:
    """The weightless checkpoint ``folder`` as a real one in ``out_dir``: its other files copied, its tensors (the
    same values) in ``shards`` bf16 safetensors files with ``model.safetensors.index.json``. Memory: one block."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in folder.iterdir():
        if path.is_file() and path.name != TABLE_FILE:
            (out_dir / path.name).write_bytes(path.read_bytes())
    source = WeightlessFile(folder / TABLE_FILE)
    table = [(name, info.shape) for name, info in source.infos().items()]
    groups = _shards(table, shards)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        _write_shard(out_dir / name, group, source)
        weight_map.update({t: name for t, _ in group})
    index = {"metadata": {"total_size": 2 * n_parameters(table)}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return out_dir


# ------------------------------------------------------------------------------------------------ tables
def hf_config(model_type: str, **settings: Any) -> dict[str, Any]:
    """config.json as transformers saves it for ``model_type`` with these settings (its class's defaults filled in)."""
    import transformers

    config = transformers.AutoConfig.for_model(model_type, **settings)
    generic = set(transformers.PretrainedConfig().to_dict()) - _model_keys(type(config)) - {"model_type"}
    out = {k: v for k, v in config.to_dict().items() if k not in generic or k in settings}
    out.pop("transformers_version", None)
    for key, value in out.items():  # sub-configs (a vision tower, the text model) written the same way
        if isinstance(value, dict) and "model_type" in value:
            out[key] = {k: v for k, v in value.items() if k not in generic or k in settings.get(key, {})}
    return out


def _model_keys(cls: type) -> set[str]:
    return {k for c in cls.__mro__ for k in getattr(c, "__annotations__", {}) if c.__name__ != "PreTrainedConfig"}


def hf_table(config: Mapping[str, Any], n_nextn: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """The published tensor names and shapes of the transformers model ``config`` describes (``architectures[0]``
    of ``model_type``), with ``n_nextn`` multi-token-prediction layers after the decoder layers."""
    import torch
    import transformers
    from transformers.core_model_loading import revert_weight_conversion  # what save_pretrained applies

    settings = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    cfg = transformers.AutoConfig.for_model(config["model_type"], **settings)
    with torch.device("meta"):
        model = getattr(transformers, config["architectures"][0])(cfg)
    saved = revert_weight_conversion(model, model.state_dict())  # the names and shapes save_pretrained writes
    table = [(name, tuple(t.shape)) for name, t in saved.items()
             if not (cfg.tie_word_embeddings and name == "lm_head.weight")]
    text = getattr(cfg, "text_config", cfg)
    n_layer, hidden = text.num_hidden_layers, text.hidden_size
    last = [(name, shape) for name, shape in table if f"layers.{n_layer - 1}." in name]
    for k in range(n_layer, n_layer + n_nextn):
        table += [(name.replace(f"layers.{n_layer - 1}.", f"layers.{k}."), shape) for name, shape in last]
        prefix = last[0][0].split(f"layers.{n_layer - 1}.")[0] + f"layers.{k}."
        table += [(prefix + "eh_proj.weight", (hidden, 2 * hidden)), (prefix + "enorm.weight", (hidden,)),
                  (prefix + "hnorm.weight", (hidden,)), (prefix + "shared_head.norm.weight", (hidden,))]
    return table


# ------------------------------------------------------------------------------------------------ tokenizer
def published_glm4_tokenizer(tokenizer_dir: Path, out_dir: Path, chat_template: str) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` in ``out_dir`` with GLM-4's published vocabulary: the 151,329
    tiktoken ranks of ``tokenizer_dir/tokenizer.model`` as a byte-level BPE (merges recovered from the ranks), its
    special tokens (``special_tokens.json``), then GLM-4.5's thinking and tool-call markers. Tools that recognise a
    tokenizer by how it splits a test string (llama.cpp's converter) see GLM-4's."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from chatglm.convert.vocab_bpe import GLM4_PATTERN, merges_from_ranks, read_tiktoken, spell
    from chatglm.devtools.glm4 import GLM45_EXTRA_SPECIALS, tokenizer_config

    ranks = read_tiktoken(tokenizer_dir / "tokenizer.model")
    merges = [tuple(m.split(" ")) for m in merges_from_ranks(ranks)]
    tok = Tokenizer(models.BPE(vocab={spell(b): r for b, r in ranks.items()}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = json.loads((tokenizer_dir / "special_tokens.json").read_text(encoding="utf-8"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sorted(specials, key=specials.get)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in GLM45_EXTRA_SPECIALS])
    tok.save(str(out_dir / "tokenizer.json"))
    config = tokenizer_config(tok, chat_template, tokenizer_class="PreTrainedTokenizerFast")
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")

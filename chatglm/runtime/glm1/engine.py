"""The GLM-1 engine: ChatGLM-6B GGUFs (``chatglm1``) evaluated by our own ggml graph on the CPU backend.

The KV cache is ours (two ggml tensors per layer); prefill runs in chunks of ``n_batch`` tokens, except that the
bidirectional context (every token before ``<sop>``) is always evaluated in one chunk, since each of its tokens
attends to all others; each chunk builds its graph. Decode evaluates one token per step through one graph, built once
per span of ``kv_pad`` cache cells and reused step after step (positions, the cell written and the mask are its
inputs; cells past the used ones are masked, which flash attention skips), with a compute buffer of its own so that
prefill graphs never move its memory. ggml-alloc reuses one compute buffer for all prefill graphs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from chatglm.errors import Cancelled, ContextOverflowError, InputError, ModelRuntimeError
from chatglm.ggml.backend import Allocator, Backend, Buffer, cpu_buffer_type, tensor_get, tensor_set
from chatglm.ggml.ops import Graph
from chatglm.ggml.profile import Profile, profile
from chatglm.gguf_file import GGUFHeader
from chatglm.runtime import llama_native as native
from chatglm.runtime import ptuning
from chatglm.runtime.engine import Engine, ModelInfo, ProgressFn
from chatglm.runtime.glm1 import graph as G
from chatglm.runtime.glm1 import layout
from chatglm.runtime.glm1.tokenizer import GLM1Tokenizer
from chatglm.runtime.glm1.weights import ModelWeights, load_weights
from chatglm.runtime.kv_types import GLM1_KV_TYPES, KV_TYPES
from chatglm.schema import keys

log = logging.getLogger(__name__)


KV_PAD = 256  # the decode graph attends to a multiple of this many cells (as llama.cpp pads n_kv)


@dataclass
class EvalTiming:
    """Where the last graph's time went (seconds): building it in Python, allocating, setting inputs, computing;
    ``reused`` when the graph was the kept decode graph (nothing built or allocated)."""

    n_tokens: int = 0
    n_nodes: int = 0
    build_s: float = 0.0
    alloc_s: float = 0.0
    compute_s: float = 0.0
    reused: bool = False


class GLM1Engine(Engine):
    def __init__(self, header: GGUFHeader, info: ModelInfo, *, n_ctx: int, n_threads: int, n_gpu_layers: int = 0,
                 flash_attn: Optional[bool] = None, kv_type: str = "f16", on_progress: Optional[ProgressFn] = None,
                 n_batch: int = 512, repack: bool = True):
        super().__init__()
        native.lib()  # routes ggml's own log (e.g. weight repacking) to the "llama.cpp" logger
        self.cfg = G.GLM1Config.from_header(header)
        _check_settings(self.cfg, n_ctx, n_batch, n_threads, kv_type, n_gpu_layers, flash_attn, header)
        self.tok = GLM1Tokenizer(header)
        self.ids = _special_ids(header, self.cfg)  # bos (<sop>), eos (<eop>), mask, gmask, end (</s>)
        self.layout_ids = layout.SpecialIds(bos=self.ids["bos"], mask=self.ids["mask"], gmask=self.ids["gmask"])
        self.n_batch = n_batch
        self._parts: list = []
        # a P-Tuning v2 prefix: cache columns 0..P-1 (keys never rotated, as the published code keeps them), which
        # every token attends to; the tokens' own positions are computed from their index as without it
        prefix = ptuning.read_prefix(header)
        self.n_prefix = 0 if prefix is None else prefix.shape[2]
        if self.n_prefix and ptuning.first_position(header, self.n_prefix):
            raise InputError("ChatGLM-6B runs THUDM's P-Tuning v2 prefixes (first position 0) only", header.path)
        try:
            self.backend = self._own(Backend(n_threads))
            self.model: ModelWeights = self._own(load_weights(header, self.cfg, self.backend, repack, on_progress))
            if self.model.repacked:  # ggml logs each one at debug level; one line here for --verbose
                log.info("%s: %d weight matrices repacked for this CPU's kernels", header.path, self.model.repacked)
            self.kv, kv_parts = _new_cache(self.cfg, n_ctx + self.n_prefix, KV_TYPES[kv_type].ggml_type)
            self._parts += kv_parts
            if prefix is not None:
                _write_prefix(self.cfg, self.kv, prefix, KV_TYPES[kv_type].ggml_type)
            self.allocator = self._own(Allocator(cpu_buffer_type()))
            self._decode_allocator = self._own(Allocator(cpu_buffer_type()))
        except BaseException:
            self.close()
            raise
        eog = frozenset({self.ids["eos"], self.ids["end"]})
        self.info = replace(info, n_ctx=n_ctx, n_vocab=self.cfg.n_vocab, eog=eog, pre_seq_len=self.n_prefix)
        self._logits = np.zeros(self.cfg.n_vocab, dtype=np.float32)
        self._has_logits = False
        self._decode: Optional[G.Forward] = None  # the kept single-token graph (allocated by _decode_allocator)
        self._decode_feed: Optional[tuple] = None  # the inputs of its last step
        self.kv_pad = KV_PAD
        self.timing = EvalTiming()

    def _own(self, part):
        self._parts.append(part)
        return part

    # -- tokenizer --------------------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def token_bytes(self, token: int) -> bytes:
        return self.tok.token_bytes(token)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    # -- cache ------------------------------------------------------------------------------------------------
    def reusable(self, tokens: Sequence[int]) -> int:
        return layout.reusable_prefix(self.tokens, tokens, self.layout_ids)

    def _truncate(self, n_keep: int) -> None:
        del self.tokens[n_keep:]
        if n_keep == 0:
            self._has_logits = False

    # -- evaluation -------------------------------------------------------------------------------------------
    def _eval(self, tokens: Sequence[int], *, cancel: Optional[threading.Event] = None,
              progress: Optional[ProgressFn] = None, all_logits: bool = False) -> Optional[np.ndarray]:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise ModelRuntimeError("nothing to evaluate")
        bad = [t for t in tokens if not 0 <= t < self.cfg.n_vocab]
        if bad:
            raise ModelRuntimeError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.n_vocab - 1})")
        full = self.tokens + tokens
        if len(full) > self.kv.n_ctx - self.n_prefix:
            raise ContextOverflowError(f"{len(full)} tokens do not fit the context of "
                                       f"{self.kv.n_ctx - self.n_prefix} tokens")
        ids = self.layout_ids
        context = layout.context_length(full, ids)
        start = 0 if context > len(self.tokens) else len(self.tokens)  # a grown context spoils every cached token
        del self.tokens[start:]
        pos, block_pos = layout.positions(full, ids)
        rows = []
        for first, last in self._chunks(start, len(full), context):
            out = self._run(full, first, last, pos, block_pos, context, all_logits, cancel)
            self.tokens = full[:last]
            self.n_evaluated += last - first
            if all_logits:
                rows.append(out)
            if progress:
                progress(last - start, len(full) - start)
        return np.concatenate(rows) if all_logits else None

    def _chunks(self, start: int, end: int, context: int) -> list[tuple[int, int]]:
        """[first, last) spans of at most n_batch tokens; the context (if any is left) in the first, whole, with the
        tokens after it that still fit (``<sop>`` and a prompt's reply prefix: no pass of the weights for them
        alone)."""
        spans, first = [], start
        if first < context:
            last = max(context, min(end, first + self.n_batch))
            spans.append((first, last))
            first = last
        spans += [(a, min(a + self.n_batch, end)) for a in range(first, end, self.n_batch)]
        return spans

    def _run(self, full: list[int], first: int, last: int, pos: np.ndarray, block_pos: np.ndarray, context: int,
             all_logits: bool, cancel: Optional[threading.Event]) -> np.ndarray:
        t0 = time.perf_counter()
        n, T = self.n_prefix, last - first
        keep = T == 1 and not all_logits  # the decode graph: kept for the next steps
        kept = keep and self._decode is not None and self._decode.n_kv == self._span(n + last)
        fwd = self._decode_graph(n + last) if keep else G.build(self.cfg, self.model.weights, self.kv, n + last, T,
                                                                all_logits)
        try:
            t1 = time.perf_counter()
            if not keep:
                self.allocator.allocate(fwd.graph)
            t2 = time.perf_counter()
            feed = (full[first:last], np.concatenate([pos[first:last], block_pos[first:last]]),
                    np.arange(n + first, n + last, dtype=np.int32), _mask(first, last, context, n, fwd.n_kv))
            _feed(fwd.inputs, *feed, self.kv.n_ctx)
            if keep:
                self._decode_feed = feed
            self._has_logits = False
            if not self.backend.compute(fwd.graph, cancel.is_set if cancel is not None else None):
                raise Cancelled("cancelled")
            n_rows = fwd.logits.ne[1]
            out = tensor_get(fwd.logits, np.empty((n_rows, self.cfg.n_vocab), dtype=np.float32))
            self._logits[:] = out[-1]
            self._has_logits = True
            self.timing = EvalTiming(T, fwd.graph.n_nodes, t1 - t0, t2 - t1, time.perf_counter() - t2, kept)
            return out
        finally:
            if not keep:
                fwd.close()

    def _span(self, n_used: int) -> int:
        return min(self.kv.n_ctx, -(-n_used // self.kv_pad) * self.kv_pad)

    @property
    def decode_graph(self) -> Optional[G.Forward]:
        """The kept single-token graph (None before the first step): for profiling and tests."""
        return self._decode

    def profile_last_step(self, repeats: int = 5) -> Profile:
        """Per-op times of the last decode step, evaluated again (it writes the same cache cell again)."""
        if self._decode is None or self._decode_feed is None:
            raise ModelRuntimeError("no decode step to profile: step() first")
        fwd, feed = self._decode, self._decode_feed
        return profile(self.backend, fwd.graph, lambda: _feed(fwd.inputs, *feed, self.kv.n_ctx), repeats)

    def _decode_graph(self, n_used: int) -> G.Forward:
        """The single-token graph attending to ``n_used`` cells, rounded up to a multiple of ``kv_pad``: the kept
        one when its span is that, else a new one (built and allocated once, kept until the span changes)."""
        n_kv = self._span(n_used)
        if self._decode is not None and self._decode.n_kv == n_kv:
            return self._decode
        if self._decode is not None:
            self._decode.close()
            self._decode, self._decode_feed = None, None
        fwd = G.build(self.cfg, self.model.weights, self.kv, n_kv, 1, False)
        try:
            self._decode_allocator.allocate(fwd.graph)
        except BaseException:
            fwd.close()
            raise
        self._decode = fwd
        return fwd

    def logits(self) -> np.ndarray:
        if not self._has_logits:
            raise ModelRuntimeError("no logits available: nothing has been evaluated")
        return self._logits

    def all_logits(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits of every position of ``tokens`` evaluated from an empty cache: (len(tokens), n_vocab)."""
        tokens = list(tokens)
        if not tokens:
            raise ModelRuntimeError("empty prompt: nothing to evaluate")
        self.reset()
        return self._eval(tokens, all_logits=True)  # type: ignore[return-value]

    def close(self) -> None:
        if getattr(self, "_decode", None) is not None:
            self._decode.close()
            self._decode = None
        for part in reversed(getattr(self, "_parts", [])):
            part.close()
        self._parts = []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def _check_settings(cfg: G.GLM1Config, n_ctx: int, n_batch: int, n_threads: int, kv_type: str, n_gpu_layers: int,
                    flash_attn: Optional[bool], header: GGUFHeader) -> None:
    if kv_type not in GLM1_KV_TYPES:
        raise InputError(f"the GLM-1 engine keeps its KV cache in {' or '.join(GLM1_KV_TYPES)}, not {kv_type!r}")
    if n_ctx < 1 or n_batch < 1 or n_threads < 1:
        raise InputError(f"context ({n_ctx}), batch ({n_batch}) and thread ({n_threads}) counts must be positive")
    if n_ctx > cfg.n_ctx_train:
        log.warning("%s: context of %d tokens is longer than the %d ChatGLM-6B was trained on; positions past "
                    "%d are untrained and output quality will drop", header.path, n_ctx, cfg.n_ctx_train,
                    cfg.n_ctx_train)
    if n_gpu_layers:
        log.warning("the GLM-1 engine runs on the CPU; ignoring n_gpu_layers=%d", n_gpu_layers)
    if flash_attn is False:
        log.info("the GLM-1 engine always uses flash attention (ggml_flash_attn_ext); ignoring flash_attn=False")


def _special_ids(header: GGUFHeader, cfg: G.GLM1Config) -> dict[str, int]:
    ids = {}
    for name, key in (("bos", "tokenizer.ggml.bos_token_id"), ("eos", "tokenizer.ggml.eos_token_id"),
                      ("mask", "tokenizer.ggml.mask_token_id"), ("gmask", keys.GLM1_GMASK),
                      ("end", keys.GLM1_END)):
        value = header.get(key, ids.get("eos") if name == "end" else None)
        if type(value) is not int or not 0 <= value < cfg.n_vocab:
            raise InputError(f"GGUF lacks a valid {key}", header.path)
        ids[name] = value
    return ids


def _feed(inp: G.Inputs, tokens: Sequence[int], positions: np.ndarray, rows: np.ndarray, mask: np.ndarray,
          n_cells: int) -> None:
    """A graph's inputs, each checked: ggml asserts while computing that every cell written is inside the cache."""
    if rows.size and not 0 <= int(rows.min()) <= int(rows.max()) < n_cells:
        raise ModelRuntimeError(f"cache cells {rows.min()}..{rows.max()} are outside the {n_cells} cells")
    tensor_set(inp.tokens, np.asarray(tokens, dtype=np.int32))
    tensor_set(inp.positions, np.ascontiguousarray(positions, dtype=np.int32))
    tensor_set(inp.rows, rows)
    tensor_set(inp.mask, mask)


def _mask(first: int, last: int, context: int, n_prefix: int, n_kv: int) -> np.ndarray:
    """f16 (T, n_kv): the prefix cells visible to all, then the layout's mask, then -inf up to ``n_kv``."""
    mask = np.full((last - first, n_kv), -np.inf, dtype=np.float16)
    mask[:, :n_prefix] = 0
    mask[:, n_prefix:n_prefix + last] = layout.attention_mask(first, last, context)
    return mask


def _write_prefix(cfg: G.GLM1Config, kv: G.KVCache, prefix: np.ndarray, kv_type: int) -> None:
    """The prefix into cache cells 0..P-1 of every layer (each cell per head [k | v]: (2 hd, nh, n_ctx))."""
    n = prefix.shape[2]
    for il in range(cfg.n_layer):
        cells = np.zeros((kv.n_ctx, cfg.n_head, 2, cfg.head_dim), np.float32)
        for i in range(2):  # keys, values
            cells[:n, :, i] = prefix[il, i].reshape(n, cfg.n_head, cfg.head_dim)
        rows = cells.reshape(-1, 2 * cfg.head_dim)
        tensor_set(kv.kv[il], np.frombuffer(ptuning.encode(rows, kv_type), np.uint8))


def _new_cache(cfg: G.GLM1Config, n_ctx: int, kv_type: int) -> tuple[G.KVCache, list]:
    ctx = Graph(cfg.n_layer)
    try:
        kv = [ctx.new(kv_type, (2 * cfg.head_dim, cfg.n_head, n_ctx), f"cache_kv{il}") for il in range(cfg.n_layer)]
        buf = Buffer.for_tensors(ctx.ctx, cpu_buffer_type())
    except BaseException:
        ctx.close()
        raise
    buf.clear()
    return G.KVCache(kv, n_ctx), [ctx, buf]

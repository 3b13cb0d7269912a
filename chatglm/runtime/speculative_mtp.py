"""MTP (NextN) drafting: the GGUF's own next-token-prediction layer drafts one token ahead (docs/speculative.md).

GLM-4.5's MTP layer predicts the token after next from the trunk's last hidden state ``h`` (after the output norm)
and the embedding of the next token. llama.cpp runs that layer as its own graph in a second context of the same
model (``LLAMA_CONTEXT_TYPE_MTP``), with its own cache of (``h[p-1]``, ``token[p]``) pairs at every position p. Only
the public C API is used:

- the target context outputs embeddings (``llama_set_embeddings``) and logits at every position, so that
  ``llama_get_embeddings_ith`` gives ``h`` for each token it evaluates; in llama.cpp's graphs for these
  architectures ``h_nextn`` IS the output-norm embedding (``result_norm``), so no staging API is needed for it;
- after each evaluation the pairs go into the MTP context through ``llama_batch_ext`` (token id plus the state row,
  ``llama_batch_ext_set_embd_token``) and ``llama_process``; rejected drafts leave both caches by
  ``llama_memory_seq_rm``;
- a draft is the MTP layer's greedy token for the pending token paired with the last ``h``.

One token per verification: a second drafted token would need the MTP layer's OWN hidden state, which llama.cpp
exports only through the C++ staging functions ``llama_get_embeddings_nextn*`` (llama-ext.h, mangled names, no C
declaration in llama.h), not through the C API.
"""

from __future__ import annotations

import ctypes
import logging
from typing import TYPE_CHECKING, Sequence

import gguf
import numpy as np

from chatglm.errors import InputError, ModelRuntimeError, UnsupportedModelError
from chatglm.runtime import llama_native as native

if TYPE_CHECKING:  # pragma: no cover
    from chatglm.gguf_file import GGUFHeader
    from chatglm.runtime.llama_engine import LlamaEngine

log = logging.getLogger(__name__)

# llama.cpp architectures whose MTP graph is checked here (greedy-identical test, one NextN block)
MTP_ARCHES = (gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GLM4_MOE],)
CONTEXT_TYPE_MTP = 1  # LLAMA_CONTEXT_TYPE_MTP
PROCESS_DECODE = 1  # LLAMA_PROCESS_TYPE_DECODE
# the tensors llama.cpp's MTP graph asserts on (blk.N is the first layer past the trunk)
MTP_TENSORS = ("nextn.eh_proj.weight", "nextn.enorm.weight", "nextn.hnorm.weight", "ffn_gate_inp.weight",
               "attn_norm.weight")


def check_mtp(header: "GGUFHeader") -> None:
    """Refuse, in one line and before anything native, a file whose MTP layer llama.cpp's graph cannot run."""
    if header.arch not in MTP_ARCHES:
        raise UnsupportedModelError(f"MTP drafting runs on {', '.join(MTP_ARCHES)} models, not {header.arch!r}",
                                    header.path)
    n_nextn = header.arch_get("nextn_predict_layers", 0)
    n_layer = header.arch_get("block_count", 0)
    if type(n_nextn) is not int or n_nextn != 1 or type(n_layer) is not int:
        raise UnsupportedModelError("MTP drafting needs exactly one NextN layer (nextn_predict_layers = 1); this "
                                    f"file has {n_nextn!r}", header.path)
    block = n_layer - n_nextn
    missing = [f"blk.{block}.{t}" for t in MTP_TENSORS if f"blk.{block}.{t}" not in header.tensors]
    if missing:
        raise InputError(f"its NextN layer lacks {', '.join(missing)}: MTP drafting cannot run", header.path)


class MtpDrafter:
    """Drafts with the target model's MTP layer; follows every evaluation of the target (``LlamaEngine.observer``)."""

    name = "mtp"
    cheap, kind = False, 0

    def __init__(self, engine: "LlamaEngine"):
        ll = native.lib()
        self.engine = engine
        self._ctx = self._batch = None
        self.n_embd = ll.llama_model_n_embd(engine.native_model)
        self._h = np.zeros((engine.info.n_ctx + engine.n_prefix, self.n_embd), dtype=np.float32)
        self._tok = np.zeros(engine.info.n_ctx + engine.n_prefix, dtype=np.int64)
        self.fed = 0  # positions of the target whose pairs the MTP cache holds
        self.known = 0  # positions whose token and h are kept here (fed to the MTP cache when a draft needs them)
        try:
            self._ctx = native.new_context(engine.native_model, n_ctx=engine.info.n_ctx + engine.n_prefix,
                                           n_batch=engine.n_batch, n_threads=engine.n_threads,
                                           flash_attn=engine.flash_attn, kv_type=engine.kv_type,
                                           ctx_type=CONTEXT_TYPE_MTP, ctx_other=engine.native_context)
            self._mem = ll.llama_get_memory(self._ctx)
            self._batch = ll.llama_batch_ext_init(self._ctx)
            if not self._batch:
                raise ModelRuntimeError("llama.cpp could not create a batch for the MTP context")
            ll.llama_set_embeddings(engine.native_context, True)
        except BaseException:
            self.close()
            raise
        engine.observer = self

    # -- following the target ---------------------------------------------------------------------------------
    def evaluated(self, tokens: Sequence[int], pos0: int) -> None:
        """The target evaluated ``tokens`` at positions pos0...: keep their tokens and ``h`` rows. The pairs reach
        the MTP cache only when a draft is asked for, in one batch: while the adaptive controller does not draft,
        the MTP layer costs nothing per token."""
        ll = native.lib()
        if pos0 != self.known:  # the cache was filled behind our back (all_logits): stop until it starts over
            return
        for i in range(len(tokens)):
            ptr = ll.llama_get_embeddings_ith(self.engine.native_context, i)
            if not ptr:
                raise ModelRuntimeError("the model gave no hidden state for MTP drafting")
            self._h[pos0 + i] = np.ctypeslib.as_array(ptr, shape=(self.n_embd,))
        self._tok[pos0:pos0 + len(tokens)] = tokens
        self.known = pos0 + len(tokens)

    def dropped(self, pos: int) -> None:
        """The target dropped its cells from ``pos`` on: so does the MTP cache."""
        if pos < self.fed:
            native.lib().llama_memory_seq_rm(self._mem, 0, pos, -1)
            self.fed = pos
        self.known = min(self.known, pos)

    # -- drafting ---------------------------------------------------------------------------------------------
    def draft(self, history: Sequence[int], n: int) -> list[int]:
        ll = native.lib()
        pos = self.engine.n_prefix + len(history) - 1  # the pending token's position
        if n <= 0 or pos != self.known or pos == 0:
            return []
        for start in range(self.fed, pos, self.engine.n_batch):  # the pairs kept since the last draft
            stop = min(pos, start + self.engine.n_batch)
            self._process([(int(self._tok[p]), p) for p in range(start, stop)], output=False)
            self.fed = stop
        self._process([(history[-1], pos)], output=True)
        ptr = ll.llama_get_logits_ith(self._ctx, 0)
        guess = int(np.argmax(np.ctypeslib.as_array(ptr, shape=(self.engine.info.n_vocab,)))) if ptr else -1
        ll.llama_memory_seq_rm(self._mem, 0, pos, -1)  # the pending token is fed with the verification
        return [guess] if guess >= 0 else []

    def _process(self, items: list[tuple[int, int]], *, output: bool) -> None:
        """One MTP batch: each token at its position with the state ``h`` of the position before it."""
        ll = native.lib()
        batch = self._batch
        ll.llama_batch_ext_clear(batch)
        keep = []  # the state rows must stay alive until llama_process has read them
        for tok, pos in items:
            idx = ll.llama_batch_ext_add_token(batch, 0, tok)
            if idx < 0:
                raise ModelRuntimeError(f"llama.cpp refused an MTP batch entry (code {idx})")
            where = (native.lib().llama_pos * 1)(pos)
            row = np.ascontiguousarray(self._h[pos - 1] if pos > 0 else np.zeros(self.n_embd, np.float32))
            keep.append((where, row))
            embd = ll.llama_embd(row.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), 1, self.n_embd)
            if not (ll.llama_batch_ext_set_pos(batch, idx, where) and ll.llama_batch_ext_set_embd_token(batch, idx,
                                                                                                       embd)):
                raise ModelRuntimeError("llama.cpp refused an MTP batch entry")
            if output:
                ll.llama_batch_ext_set_output_logits(batch, idx, True)
        rc = ll.llama_process(self._ctx, PROCESS_DECODE, batch)
        if rc != 0:
            raise ModelRuntimeError(f"the MTP layer's evaluation failed with code {rc}")

    def close(self) -> None:
        ll = native.lib()
        if getattr(self.engine, "observer", None) is self:
            self.engine.observer = None
        batch, self._batch = self._batch, None
        if batch:
            ll.llama_batch_ext_free(batch)
        ctx, self._ctx = self._ctx, None
        if ctx:
            ll.llama_free(ctx)


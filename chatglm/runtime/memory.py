"""Memory estimates before loading: weights + KV cache at a context size and KV type + compute buffers."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import gguf

from chatglm import families
from chatglm.errors import InputError
from chatglm.families.descriptor import ENGINE_GLM1
from chatglm.gguf_file import GGUFHeader
from chatglm.runtime.kv_types import KV_TYPES
from chatglm.runtime.validate import check_kv_type
from chatglm.schema.llama_names import ARCH_GLM5_NEXT

OVERHEAD = 64 * 2**20  # runtime, tokenizer tables, allocator slack


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int
    kv_cache: int
    compute: int  # the graph allocator's buffer (llama.cpp logs it as the compute buffer)
    work: int = 0  # the CPU backend's scratch for converted matrix operands

    @property
    def buffers(self) -> int:
        return self.compute + self.work

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.buffers + OVERHEAD


def kv_per_token(header: GGUFHeader, kv_type: str = "f16") -> float:
    """KV-cache bytes per token of context: K and V of every trunk layer's KV heads (llama.cpp's main context
    leaves NextN/MTP blocks out of its cache: llama-model.cpp's create_memory filters them)."""
    check_kv_type(kv_type)
    special = _ARCH_CACHE.get(header.arch)
    if special is not None:
        return special(header, kv_type)[0]
    n_layer = _size(header, "block_count", 0)
    n_nextn = _size(header, "nextn_predict_layers", 0)
    n_layer -= n_nextn if n_nextn < n_layer else 0
    elements = n_layer * _kv_per_layer(header) + _indexer_keys(header, n_layer)
    return elements * KV_TYPES[kv_type].bytes_per_element


def _kv_per_layer(header: GGUFHeader) -> int:
    """K and V values one attention layer caches per token."""
    n_embd = _size(header, "embedding_length", 0)
    n_head = _size(header, "attention.head_count", 1)
    n_head_kv = _size(header, "attention.head_count_kv", n_head)
    head_k = _size(header, "attention.key_length", n_embd // n_head)
    head_v = 0 if _is_mla(header) else _size(header, "attention.value_length", head_k)
    return n_head_kv * (head_k + head_v)


def _is_mla(header: GGUFHeader) -> bool:
    """llama.cpp's hparams.is_mla(): multi-head latent attention caches only K ([latent | rope] per token, one KV
    head); V is a view of its latent part (llama-kv-cache.cpp: has_v = !is_mla)."""
    return all(_size(header, f"attention.{k}_length_mla", 0) for k in ("key", "value"))


def _indexer_keys(header: GGUFHeader, n_trunk: int) -> int:
    """The DSA indexer (glm-dsa) caches one key of attention.indexer.key_length per token for each trunk layer
    that runs it."""
    index_dim = _size(header, "attention.indexer.key_length", 0)
    if not index_dim:
        return 0
    types = header.arch_get("attention.indexer.types")
    n_full = sum(map(bool, types)) if isinstance(types, list) else n_trunk
    return min(n_full, n_trunk) * index_dim


def _size(header: GGUFHeader, key: str, default: int) -> int:
    """A positive size from the header (the first of a per-layer array), or ``default`` for anything else: estimates
    are also made for files that validation will refuse, and must not fail on them first."""
    value = header.arch_get(key, default)
    if isinstance(value, list) and value:
        value = value[0]
    return value if type(value) is int and value > 0 else default


def estimate(header: GGUFHeader, n_ctx: int, kv_type: str = "f16", n_batch: int = 512,
             flash_attn: bool = True) -> MemoryEstimate:
    """What the process will hold resident at this context: every weight once (on the CPU the repacked copies
    replace their mapped source pages, see ``runtime/pages.py``), the whole KV cache (llama.cpp clears it when the
    context is made), and the compute buffer llama.cpp's graph allocator reserves for one micro-batch."""
    check_kv_type(kv_type)
    weights = sum(t.nbytes for t in header.tensors.values())
    n_embd = _size(header, "embedding_length", 0)
    n_head = _size(header, "attention.head_count", 1)
    n_vocab = len(header.get("tokenizer.ggml.tokens") or [])
    n_ctx = padded_context(n_ctx)
    n_ub = min(n_batch, n_ctx) if n_ctx else n_batch
    n_ff = _size(header, "feed_forward_length", 4 * n_embd)
    hidden = 3 * n_ub * n_embd * 4  # the residual stream and the few hidden-state tensors alive beside it
    glm1 = families.arch_value(header.arch, "engine") == ENGINE_GLM1
    if glm1:  # our graph: one micro-batch's activations, and T x T scores per head
        compute = n_ub * (n_vocab + 6 * n_embd + 3 * n_ff) * 4 + n_head * n_ctx * n_ctx * 4
    else:
        # The peak of llama.cpp's graph allocator for a micro-batch (it reserves with every logit requested):
        # either the logits, or, inside a layer, the attention mask (f16 with flash attention) beside the larger
        # of the FFN's activations (fused gate and up, then their product) and, without flash attention, the f32
        # scores of every head.
        mask = n_ub * n_ctx * (2 if flash_attn else 4)
        scores = 0 if flash_attn else n_head * n_ctx * n_ub * 4
        compute = max(n_ub * n_vocab * 4, mask + max(3 * n_ub * n_ff * 4, scores)) + hidden
        compute += n_vocab * 4  # the output buffer: one row of logits
        compute += _ARCH_COMPUTE.get(header.arch, _no_extra)(header, n_ctx, n_ub, flash_attn)
    # Without flash attention the CPU backend converts the attention weights to f16 for the product with the
    # (f16) V cache, in a scratch buffer of its own.
    work = 0 if flash_attn or glm1 else n_head * n_ctx * n_ub * 2
    kv_cache = int(kv_per_token(header, kv_type) * n_ctx) + state_bytes(header, kv_type)
    return MemoryEstimate(weights, kv_cache, compute, work)


def padded_context(n_ctx: int) -> int:
    """The context llama.cpp allocates for ``n_ctx`` tokens (a multiple of 256 above 256)."""
    return -(-n_ctx // 256) * 256 if n_ctx > 256 else n_ctx


@dataclass(frozen=True)
class SpeculationEstimate:
    """What speculative decoding adds to the model's estimate (docs/speculative.md)."""

    draft: Optional[MemoryEstimate] = None  # the draft model: its weights, its KV cache at the same context, compute
    mtp_kv: int = 0  # the MTP context's cache: the NextN layer(s) at the context
    mtp_compute: int = 0  # the MTP graph's buffer (one layer and the logits of a micro-batch)
    mtp_states: int = 0  # the hidden state of every position, kept to pair with the next token
    outputs: int = 0  # the target's logits (and hidden states for MTP) at every position evaluated at once
    snapshots: int = 0  # copies of a recurrent state kept to roll rejected drafts back

    @property
    def total(self) -> int:
        draft = self.draft.total if self.draft is not None else 0
        return draft + self.mtp_kv + self.mtp_compute + self.mtp_states + self.outputs + self.snapshots

    @property
    def resident(self) -> int:
        """Beyond the mapped weights: what must fit in memory beside the model's own KV cache and buffers."""
        return self.total - (self.draft.weights if self.draft is not None else 0)


def speculation_estimate(header: GGUFHeader, n_ctx: int, kv_type: str = "f16", flash_attn: bool = True, *,
                         draft: Optional[GGUFHeader] = None, mtp: bool = False, n_max: int = 0,
                         n_batch: int = 512) -> SpeculationEstimate:
    """The draft model runs on a context as long as the model's, with the same KV type; the MTP drafter keeps a
    second context of the same model whose cache holds only the NextN layers (llama-model.cpp's create_memory
    filters the layers by context type), and the hidden state of each position (f32, ``speculative_mtp.py``).
    A verification outputs logits at each of its ``n_max`` + 1 positions; with MTP every evaluated position gives
    logits and its hidden state (up to a batch of ``n_batch``)."""
    check_kv_type(kv_type)
    n_vocab = len(header.get("tokenizer.ggml.tokens") or [])
    n_embd = _size(header, "embedding_length", 0)
    rows = max(n_max + 1, min(n_batch, n_ctx) if mtp else 0)
    outputs = (rows - 1) * n_vocab * 4 + (rows * n_embd * 4 if mtp else 0)  # one row of logits is the model's own
    est = SpeculationEstimate(
        draft=estimate(draft, n_ctx, kv_type, n_batch, flash_attn) if draft is not None else None,
        outputs=outputs, snapshots=state_bytes(header, kv_type) * n_max)
    if not mtp:
        return est
    n_nextn = min(_size(header, "nextn_predict_layers", 0), _size(header, "block_count", 0))
    kv = int(n_nextn * _kv_per_layer(header) * KV_TYPES[kv_type].bytes_per_element) * padded_context(n_ctx)
    return replace(est, mtp_kv=kv, mtp_compute=estimate(header, n_ctx, kv_type, n_batch, flash_attn).compute,
                   mtp_states=n_ctx * n_embd * 4)


def state_bytes(header: GGUFHeader, kv_type: str = "f16") -> int:
    """Recurrent (linear-attention) state of one sequence: the same whatever the context."""
    special = _ARCH_CACHE.get(header.arch)
    return special(header, kv_type)[1] if special is not None else 0


def _dsa_compute(header: GGUFHeader, n_ctx: int, n_ub: int, flash_attn: bool) -> int:
    """DeepSeek sparse attention's lightning indexer: its own mask (typed like the attention mask) and its f32
    score of every cached key for each token, alive beside the attention's (measured on glm-dsa: within 8%)."""
    if header.arch_get("attention.indexer.key_length") is None:
        return 0
    return n_ub * n_ctx * ((2 if flash_attn else 4) + 4)


def available_memory() -> int:
    """Physical memory that may be used (MemAvailable on Linux, total memory elsewhere)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def default_context(header: GGUFHeader, kv_type: str = "f16", budget: float = 0.8, floor: int = 512) -> int:
    """The trained context length, capped so that the whole estimate fits in ``budget`` of available memory."""
    n_train = _size(header, "context_length", 4096)
    room = budget * available_memory() - estimate(header, 0, kv_type).total
    per_token = kv_per_token(header, kv_type) or 1.0
    fits = int(room // per_token) if room > 0 else floor
    n_ctx = max(min(n_train, fits), min(floor, n_train))
    return n_ctx - n_ctx % 256 if n_ctx > 256 else n_ctx


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def check_fits(header: GGUFHeader, n_ctx: int, kv_type: str = "f16", flash_attn: bool = True,
               extra: int = 0) -> None:
    """Refuse a context whose KV cache and compute buffers (and ``extra`` bytes: a projector libmtmd loads into
    memory) cannot fit in the memory available (weights are mapped from the file and not counted): llama.cpp would
    try, and fail or swap, after allocating."""
    est = estimate(header, n_ctx, kv_type, flash_attn=flash_attn)
    need, avail = est.kv_cache + est.buffers + extra, available_memory()
    if need > avail:
        what = " and the projector" if extra else ""
        raise InputError(f"a context of {n_ctx} tokens needs about {human(need)} for its KV cache and compute "
                         f"buffers{what}, more than the {human(avail)} of memory available; choose a smaller --ctx",
                         header.path)


def params_text(n: int) -> str:
    """A parameter count as people write it: 6.2B, 3.8M, 12K."""
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            value = n / scale
            return f"{value:.1f}{unit}" if value < 100 else f"{value:.0f}{unit}"
    return str(n)


# -- architectures whose cache is not K and V of every layer (keyed by llama.cpp's architecture name) -----------


def _flags(header: GGUFHeader, key: str, n: int, default: bool) -> list[bool]:
    """A per-layer array read as booleans (``default`` for each layer when it is missing or malformed)."""
    value = header.arch_get(key)
    values = list(value) if isinstance(value, list) else []
    return [bool(v) for v in values[:n]] if len(values) >= n else [default] * n


def _glm5next_cache(header: GGUFHeader, kv_type: str) -> tuple[float, int]:
    """glm5-next's hybrid memory (llama_memory_hybrid_idx): per token, the latent (kv_lora_rank values, no V) of each
    trunk latent-attention layer and the indexer's key | gate | pooled row (3 x its key length) of each layer with
    a full indexer, in the KV type; per linear-attention layer, its conv (3 x (kernel - 1) x inner) and delta
    (head_dim^2 x heads) states in f32, constant in the context (one sequence, no rollback snapshots)."""
    n_block = _size(header, "block_count", 0)
    nextn = header.arch_get("nextn_predict_layers", 0)
    n_trunk = max(0, n_block - (nextn if type(nextn) is int and 0 <= nextn <= n_block else 0))
    latent = _flags(header, "attention.head_count_kv", n_block, True)[:n_trunk]
    full = _flags(header, "attention.indexer.types", n_trunk, True)
    n_head = _size(header, "attention.head_count", 1)
    kda, conv = _size(header, "kda.head_dim", 0), _size(header, "ssm.conv_kernel", 1)
    per_element = KV_TYPES[kv_type].bytes_per_element
    rows = sum(latent) * _size(header, "attention.kv_lora_rank", 0)
    rows += sum(a and f for a, f in zip(latent, full)) * 3 * _size(header, "attention.indexer.key_length", 0)
    n_linear = len(latent) - sum(latent)
    state = n_linear * (3 * (conv - 1) * kda * n_head + kda * kda * n_head) * 4
    return rows * per_element, state


def _no_extra(header: GGUFHeader, n_ctx: int, n_ub: int, flash_attn: bool) -> int:
    return 0


def _glm5next_compute(header: GGUFHeader, n_ctx: int, n_ub: int, flash_attn: bool) -> int:
    """Beside the attention mask, glm5-next's sparse attention builds its selection as two more masks of the same
    size (the scattered selection, then it plus the causal mask) and a pool mask of one value per k-pool."""
    mask = n_ctx * n_ub * (2 if flash_attn else 4)
    return 2 * mask + -(-n_ctx // _size(header, "attention.indexer.kpool", 1)) * n_ub * 4


_ARCH_CACHE = {ARCH_GLM5_NEXT: _glm5next_cache}
_ARCH_COMPUTE = {gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GLM_DSA]: _dsa_compute, ARCH_GLM5_NEXT: _glm5next_compute}


"""The KV cache types: the one table of them. llama.cpp's context params take the ggml type; the head size must be a
multiple of the block; the memory estimate counts bytes per element. The CLI's ``--kv-type`` choices, the checks and
both engines read this table."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVType:
    name: str
    ggml_type: int  # enum ggml_type
    block: int  # elements per block (1: not block-quantized)
    block_bytes: int  # bytes per block

    @property
    def bytes_per_element(self) -> float:
        return self.block_bytes / self.block

    @property
    def quantized(self) -> bool:
        return self.block > 1


KV_TYPES: dict[str, KVType] = {t.name: t for t in (
    KVType("f16", 1, 1, 2), KVType("f32", 0, 1, 4), KVType("bf16", 30, 1, 2), KVType("q8_0", 8, 32, 34),
    KVType("q4_0", 2, 32, 18), KVType("q4_1", 3, 32, 20), KVType("q5_0", 6, 32, 22), KVType("q5_1", 7, 32, 24),
)}
GLM1_KV_TYPES = ("f16", "f32", "bf16")  # what the GLM-1 engine's own cache holds (no quantized cache)

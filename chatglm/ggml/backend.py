"""Native resources of the CPU backend, each owned by a small class with ``close()``: :class:`Backend` (the CPU
backend: threads, cancel hook, extra buffer types), :class:`Buffer` (a backend buffer, allocated or wrapping host
memory such as an mmap), :class:`Allocator` (ggml-alloc's graph allocator), and checked tensor data copies.

The functions are declared in :mod:`chatglm.ggml.ops`; every argument is checked here before C sees it.
"""

from __future__ import annotations

import ctypes
from typing import Callable, Optional, Sequence

import numpy as np

from chatglm.ggml.ops import ABORT_CALLBACK, F32, GGMLError, Graph, P, Tensor, api

STATUS_ABORTED = 1  # enum ggml_status


class Backend:
    """ggml's CPU backend with a thread count and a cancel hook."""

    def __init__(self, n_threads: int):
        if n_threads < 1:
            raise GGMLError(f"thread count must be positive, got {n_threads}")
        a = api()
        self.ptr = a.backend_cpu_init()
        if not self.ptr:
            raise GGMLError("ggml_backend_cpu_init failed")
        a.backend_cpu_set_n_threads(self.ptr, n_threads)
        self._should_abort: Callable[[], bool] = lambda: False
        self._abort_cb = ABORT_CALLBACK(lambda _data: bool(self._should_abort()))

    def compute(self, graph: Graph, should_abort: Optional[Callable[[], bool]] = None) -> bool:
        """Run the graph; False when ``should_abort`` stopped it. ggml asks the hook after every node, and each
        call into Python costs ~0.6 us of CPU (0.5 ms of a 28-layer decode step's ~800 nodes, measured), so
        without ``should_abort`` no hook is set at all."""
        a = api()
        if should_abort is not None:
            self._should_abort = should_abort
            a.backend_cpu_set_abort_callback(self.ptr, self._abort_cb, None)
        try:
            status = a.backend_graph_compute(self.ptr, graph.graph)
        finally:
            if should_abort is not None:
                a.backend_cpu_set_abort_callback(self.ptr, ABORT_CALLBACK(), None)
                self._should_abort = lambda: False
        if status == STATUS_ABORTED:
            return False
        if status != 0:
            raise GGMLError(f"graph compute failed with status {status}")
        return True

    def extra_buffer_types(self) -> list[int]:
        """The CPU device's extra buffer types (e.g. CPU_REPACK: weights re-laid out for faster matmuls)."""
        a = api()
        reg = a.backend_dev_backend_reg(a.backend_get_device(self.ptr))
        fn_ptr = a.backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not fn_ptr:
            return []
        fn = ctypes.CFUNCTYPE(ctypes.POINTER(P), P)(fn_ptr)
        arr = fn(a.backend_get_device(self.ptr))
        out, i = [], 0
        while arr and arr[i]:
            out.append(int(arr[i]))
            i += 1
        return out

    def supports_mul_mat_in(self, buft: int, ggml_type: int, ne: Sequence[int], n_cols: int = 8) -> bool:
        """Whether a mul_mat by a (ne0, ne1) weight of ``ggml_type`` living in ``buft`` runs on the CPU device.

        Asked as llama.cpp asks it: a throw-away op over such a weight in an empty buffer of ``buft``.
        """
        a = api()
        with Graph(4, 4) as g:
            w = g.new(ggml_type, ne[:2])
            op = g.mul_mat(w, g.new(F32, (ne[0], n_cols)))
            dummy = a.backend_buft_alloc_buffer(buft, 0)
            if not dummy:
                return False
            w.struct().buffer = dummy
            try:
                return bool(a.backend_dev_supports_op(a.backend_get_device(self.ptr), op.ptr))
            finally:
                w.struct().buffer = None
                a.backend_buffer_free(dummy)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            api().backend_free(self.ptr)
            self.ptr = None


def cpu_buffer_type() -> int:
    return int(api().backend_cpu_buffer_type())


class Buffer:
    """A backend buffer: allocated for a context's tensors, or wrapping host memory (an mmap) without copying."""

    def __init__(self, ptr: int, keep_alive: object = None):
        if not ptr:
            raise GGMLError("could not allocate a ggml buffer (out of memory?)")
        self.ptr = ptr
        self._keep = keep_alive

    @classmethod
    def for_tensors(cls, ctx_ptr: int, buft: int) -> "Buffer":
        return cls(api().backend_alloc_ctx_tensors_from_buft(ctx_ptr, buft))

    @classmethod
    def from_host(cls, address: int, size: int, keep_alive: object) -> "Buffer":
        if address % 32:
            raise GGMLError("host memory for a ggml buffer must be 32-byte aligned")
        return cls(api().backend_cpu_buffer_from_ptr(address, size), keep_alive)

    @property
    def size(self) -> int:
        return int(api().backend_buffer_get_size(self.ptr))

    def place(self, t: Tensor, address: int, base: int) -> None:
        """Give tensor ``t`` the memory at ``address`` inside this buffer (which starts at ``base``)."""
        if address < base or address + t.nbytes > base + self.size or address % 32:
            raise GGMLError("tensor data outside its buffer or misaligned")
        status = api().backend_tensor_alloc(self.ptr, t.ptr, address)
        if status != 0:
            raise GGMLError(f"ggml_backend_tensor_alloc failed with status {status}")

    def clear(self) -> None:
        api().backend_buffer_clear(self.ptr, 0)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            api().backend_buffer_free(self.ptr)
            self.ptr = None
        self._keep = None


def tensor_set(t: Tensor, data: np.ndarray | memoryview | int, nbytes: Optional[int] = None) -> None:
    """Copy host data (a C-contiguous array, or ``nbytes`` at an address) into all of ``t``."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise GGMLError("tensor_set takes C-contiguous data")
        address, nbytes = data.ctypes.data, data.nbytes
    else:
        address = int(data)  # type: ignore[arg-type]
    if nbytes != t.nbytes or not t.is_contiguous():
        raise GGMLError(f"tensor_set: {nbytes} bytes for a tensor of {t.nbytes}")
    api().backend_tensor_set(t.ptr, address, 0, nbytes)


def tensor_get(t: Tensor, out: np.ndarray) -> np.ndarray:
    if not out.flags.c_contiguous or out.nbytes != t.nbytes or not t.is_contiguous():
        raise GGMLError(f"tensor_get: {out.nbytes} bytes for a tensor of {t.nbytes}")
    api().backend_tensor_get(t.ptr, out.ctypes.data, 0, out.nbytes)
    return out


class Allocator:
    """ggml-alloc's graph allocator: one reusable buffer for every graph's intermediate tensors."""

    def __init__(self, buft: int):
        self.ptr = api().gallocr_new(buft)
        if not self.ptr:
            raise GGMLError("ggml_gallocr_new failed")

    def allocate(self, graph: Graph) -> None:
        if not api().gallocr_alloc_graph(self.ptr, graph.graph):
            raise GGMLError("could not allocate the compute graph (out of memory?)")

    def close(self) -> None:
        if getattr(self, "ptr", None):
            api().gallocr_free(self.ptr)
            self.ptr = None

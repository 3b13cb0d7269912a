"""The ggml functions the GLM-1 engine calls (argtypes and restype for each), and graph building, every call checked.

A failing ``GGML_ASSERT`` aborts the whole process, so each builder here checks in Python what ggml would assert
(shapes, strides, view bounds, types) and raises :class:`GGMLError` instead. Shapes are tracked on the Python side
(:class:`Tensor`), in ggml order (``ne[0]`` is the row length), so checks cost no native call.

:class:`Graph` owns a no-alloc ggml context and one graph; the CPU backend, buffers and ggml-alloc's allocator are
owned by :mod:`chatglm.ggml.backend`. Functions are looked up with ``CDLL[name]`` so the declarations here never
clash with other modules' on the same library handle.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence

from gguf import GGMLQuantizationType

from chatglm.errors import ChatGLMError
from chatglm.ggml import lib

F32, F16, I32, I64, BF16 = 0, 1, 26, 27, 30  # ggml_type ids used directly by graphs
ATTN_KV_TYPES = (F32, F16, BF16)  # K/V types flash attention reads on the CPU
ROPE_NEOX = 2
MAX_DIMS = 4

P, SZ, I64, F, INT, B = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_bool
ABORT_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_bool, ctypes.c_void_p)  # ggml_abort_callback


class GGMLError(ChatGLMError):
    """A ggml call was refused before reaching C (it would have aborted the process) or failed in C."""


class InitParams(ctypes.Structure):
    _fields_ = [("mem_size", SZ), ("mem_buffer", P), ("no_alloc", B)]


class TensorStruct(ctypes.Structure):
    """``struct ggml_tensor`` (ggml.h); the layout is checked against ggml_tensor_overhead() on first use."""

    _fields_ = [("type", INT), ("buffer", P), ("ne", I64 * 4), ("nb", SZ * 4), ("op", INT),
                ("op_params", ctypes.c_int32 * 16), ("flags", ctypes.c_int32), ("src", P * 10), ("view_src", P),
                ("view_offs", SZ), ("data", P), ("name", ctypes.c_char * 64), ("extra", P),
                ("padding", ctypes.c_char * 8)]


_OBJECT_SIZE = 32  # struct ggml_object, which precedes every tensor in a context

# (library, name): (restype, argtypes)
_BASE = {
    "ggml_tensor_overhead": (SZ, []), "ggml_graph_overhead_custom": (SZ, [SZ, B]),
    "ggml_init": (P, [InitParams]), "ggml_free": (None, [P]),
    "ggml_type_size": (SZ, [INT]), "ggml_blck_size": (I64, [INT]), "ggml_type_name": (ctypes.c_char_p, [INT]),
    "ggml_new_tensor": (P, [P, INT, INT, ctypes.POINTER(I64)]), "ggml_set_name": (P, [P, ctypes.c_char_p]),
    "ggml_set_input": (None, [P]), "ggml_set_output": (None, [P]),
    "ggml_new_graph_custom": (P, [P, SZ, B]), "ggml_build_forward_expand": (None, [P, P]),
    "ggml_graph_n_nodes": (INT, [P]),
    "ggml_get_rows": (P, [P, P, P]), "ggml_norm": (P, [P, P, F]), "ggml_add": (P, [P, P, P]),
    "ggml_mul": (P, [P, P, P]), "ggml_scale": (P, [P, P, F]), "ggml_scale_bias": (P, [P, P, F, F]),
    "ggml_sqr": (P, [P, P]), "ggml_tanh": (P, [P, P]), "ggml_sigmoid": (P, [P, P]), "ggml_mul_mat": (P, [P, P, P]),
    "ggml_gelu_erf": (P, [P, P]), "ggml_im2col": (P, [P, P, P, INT, INT, INT, INT, INT, INT, B, INT]),
    "ggml_cont": (P, [P, P]), "ggml_cpy": (P, [P, P, P]), "ggml_permute": (P, [P, P, INT, INT, INT, INT]),
    "ggml_reshape_4d": (P, [P, P, I64, I64, I64, I64]),
    "ggml_view_4d": (P, [P, P, I64, I64, I64, I64, SZ, SZ, SZ, SZ]),
    "ggml_soft_max_ext": (P, [P, P, P, F, F]),
    "ggml_rope_ext": (P, [P, P, P, P, INT, INT, INT, F, F, F, F, F, F]), "ggml_rope_set_offset": (P, [P, INT]),
    "ggml_rope_ext_inplace": (P, [P, P, P, P, INT, INT, INT, F, F, F, F, F, F]),
    "ggml_flash_attn_ext": (P, [P, P, P, P, P, F, F, F]), "ggml_set_rows": (P, [P, P, P, P]),
    "ggml_graph_node": (P, [P, INT]), "ggml_graph_add_node": (None, [P, P]), "ggml_op_desc": (ctypes.c_char_p, [P]),
    "ggml_backend_graph_compute": (INT, [P, P]), "ggml_backend_free": (None, [P]),
    "ggml_backend_get_device": (P, [P]), "ggml_backend_dev_supports_op": (B, [P, P]),
    "ggml_backend_dev_backend_reg": (P, [P]), "ggml_backend_reg_get_proc_address": (P, [P, ctypes.c_char_p]),
    "ggml_backend_cpu_buffer_type": (P, []), "ggml_backend_cpu_buffer_from_ptr": (P, [P, SZ]),
    "ggml_backend_buft_alloc_buffer": (P, [P, SZ]),
    "ggml_backend_buffer_free": (None, [P]), "ggml_backend_buffer_get_size": (SZ, [P]),
    "ggml_backend_buffer_clear": (None, [P, ctypes.c_uint8]),
    "ggml_backend_alloc_ctx_tensors_from_buft": (P, [P, P]), "ggml_backend_tensor_alloc": (INT, [P, P, P]),
    "ggml_backend_tensor_set": (None, [P, P, SZ, SZ]), "ggml_backend_tensor_get": (None, [P, P, SZ, SZ]),
    "ggml_gallocr_new": (P, [P]), "ggml_gallocr_free": (None, [P]),
    "ggml_gallocr_alloc_graph": (B, [P, P]),
}
_CPU = {
    "ggml_backend_cpu_init": (P, []), "ggml_backend_cpu_set_n_threads": (None, [P, INT]),
    "ggml_backend_cpu_set_abort_callback": (None, [P, ABORT_CALLBACK, P]),
}


class _Api:
    """The functions above, declared once, as attributes."""

    def __init__(self) -> None:
        for handle, table in ((lib.base(), _BASE), (lib.cpu(), _CPU)):
            lib.bind(self, handle, table, "ggml_")


@functools.cache
def api() -> _Api:
    a = _Api()
    expected = a.tensor_overhead() - _OBJECT_SIZE
    if ctypes.sizeof(TensorStruct) != expected:
        raise GGMLError(f"struct ggml_tensor is {expected} bytes in this libggml, {ctypes.sizeof(TensorStruct)} here: "
                        "the llama-cpp-python version does not match")
    return a


_KNOWN_TYPES = frozenset(int(t) for t in GGMLQuantizationType)  # ggml_type_name reads past its table otherwise


@functools.cache
def type_traits(ggml_type: int) -> tuple[int, int]:
    """(block size, bytes per block) of a ggml type."""
    if ggml_type not in _KNOWN_TYPES or not api().type_name(ggml_type) or api().blck_size(ggml_type) <= 0:
        raise GGMLError(f"unknown ggml type {ggml_type}")
    return int(api().blck_size(ggml_type)), int(api().type_size(ggml_type))


def type_name(ggml_type: int) -> str:
    return (api().type_name(ggml_type) or b"?").decode()


# ------------------------------------------------------------------------------------------------------- tensors
class Tensor(NamedTuple):
    """A ggml tensor handle with its shape and strides as ggml has them (4 dims, ggml order).

    Kept on the Python side so that checks cost no native call (a graph has ~50 tensors per layer).
    """

    ptr: int
    type: int
    ne: tuple[int, int, int, int]
    nb: tuple[int, int, int, int]
    root_nbytes: int  # bytes of the storage this tensor (or view) lives in
    offs: int = 0  # byte offset inside that storage

    @property
    def nbytes(self) -> int:
        blck, _ = type_traits(self.type)
        if any(n == 0 for n in self.ne):
            return 0
        size = self.ne[0] * self.nb[0] // blck
        return size + sum((self.ne[i] - 1) * self.nb[i] for i in range(1, MAX_DIMS))

    @property
    def nelements(self) -> int:
        return math.prod(self.ne)

    def is_contiguous(self, first_free_dim: int = -1) -> bool:
        """ggml_is_contiguous (``first_free_dim=-1``) and ggml_is_contiguous_1 (``first_free_dim=1``)."""
        blck, size = type_traits(self.type)
        if self.ne[0] != blck and self.nb[0] != size:
            return False
        next_nb = size * (self.ne[0] // blck)
        for i in range(1, MAX_DIMS):
            if i <= first_free_dim:
                next_nb = self.ne[i] * self.nb[i]
                continue
            if self.ne[i] != 1 and self.nb[i] != next_nb:
                return False
            next_nb *= self.ne[i]
        return True

    def struct(self) -> TensorStruct:
        return TensorStruct.from_address(self.ptr)


def _pad4(shape: Sequence[int]) -> tuple[int, int, int, int]:
    if not 1 <= len(shape) <= MAX_DIMS or any(int(n) < 1 for n in shape):
        raise GGMLError(f"invalid tensor shape {list(shape)}")
    return tuple(int(n) for n in shape) + (1,) * (MAX_DIMS - len(shape))  # type: ignore[return-value]


def _can_repeat(b: Tensor, a: Tensor) -> bool:
    x, y = a.ne, b.ne
    return x[0] % y[0] == 0 and x[1] % y[1] == 0 and x[2] % y[2] == 0 and x[3] % y[3] == 0


# ------------------------------------------------------------------------------------------------------- graphs
class Graph:
    """A no-alloc ggml context holding one compute graph and the tensors built for it.

    Every builder checks its operands as ggml would and returns a :class:`Tensor`; ``expand(t)`` adds ``t`` and
    what it depends on to the graph, in order.
    """

    def __init__(self, max_tensors: int, max_nodes: int = 0):
        """``max_nodes`` bounds nodes and leaves each: at least ``max_tensors`` plus the outside tensors used.
        With ``max_nodes=0`` the context only holds tensors (weights, a KV cache) and has no graph."""
        a = self._a = api()
        if max_nodes and max_nodes < max_tensors:
            raise GGMLError("a graph needs room for at least as many nodes as it has tensors")
        self.max_tensors, self.max_nodes = max_tensors, max_nodes
        mem = a.tensor_overhead() * max_tensors + (a.graph_overhead_custom(max_nodes, False) if max_nodes else 0)
        self.ctx = a.init(InitParams(mem, None, True))
        if not self.ctx:
            raise GGMLError("ggml_init failed (out of memory)")
        self.n_tensors = 0
        self.graph = a.new_graph_custom(self.ctx, max_nodes, False) if max_nodes else None

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self._a.free(self.ctx)
            self.ctx = None

    def __enter__(self) -> "Graph":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def _made(self, ptr: Optional[int], ggml_type: int, ne4: tuple, nb4: Optional[tuple] = None,
              root: Optional[Tensor] = None, offs: int = 0) -> Tensor:
        """The handle of a tensor ggml just made: ``ne4`` its 4-dim shape; ``nb4`` None for a contiguous tensor;
        ``root`` the tensor whose storage a view shares, at ``offs`` bytes."""
        if not ptr:
            raise GGMLError("ggml returned no tensor")
        if nb4 is None:
            blck, size = type_traits(ggml_type)
            row = size * (ne4[0] // blck)
            nb4 = (size, row, row * ne4[1], row * ne4[1] * ne4[2])
        if root is None:
            return Tensor(ptr, ggml_type, ne4, nb4, nb4[3] * ne4[3], 0)
        return Tensor(ptr, ggml_type, ne4, nb4, root.root_nbytes, root.offs + offs)

    def _reserve(self) -> None:
        self.n_tensors += 1
        if self.n_tensors > self.max_tensors:
            self.n_tensors -= 1
            raise GGMLError(f"graph context full ({self.max_tensors} tensors): raise max_tensors")

    def new(self, ggml_type: int, shape: Sequence[int], name: str = "") -> Tensor:
        ne4 = _pad4(shape)
        blck, _ = type_traits(ggml_type)
        if ne4[0] % blck:
            raise GGMLError(f"row length {ne4[0]} is not a multiple of {type_name(ggml_type)}'s block {blck}")
        self._reserve()
        n = len(shape)
        ptr = self._a.new_tensor(self.ctx, ggml_type, n, (I64 * n)(*ne4[:n]))
        if name:
            self._a.set_name(ptr, name.encode()[:63])
        return self._made(ptr, ggml_type, ne4)

    def input(self, ggml_type: int, shape: Sequence[int], name: str) -> Tensor:
        t = self.new(ggml_type, shape, name)
        self._a.set_input(t.ptr)
        return t

    def output(self, t: Tensor) -> Tensor:
        self._a.set_output(t.ptr)
        return t

    def expand(self, t: Tensor) -> None:
        """Add ``t`` and its dependencies. Tensors of this context are at most ``max_tensors`` nodes; the caller
        sized ``max_nodes`` for the outside ones (weights, cache)."""
        if self.graph is None:
            raise GGMLError("this context has no graph")
        self._a.build_forward_expand(self.graph, t.ptr)

    @property
    def n_nodes(self) -> int:
        return int(self._a.graph_n_nodes(self.graph)) if self.graph is not None else 0

    # -- element-wise -----------------------------------------------------------------------------------------
    def _binary(self, fn: Callable, a: Tensor, b: Tensor, what: str) -> Tensor:
        if not _can_repeat(b, a):
            raise GGMLError(f"{what}: shape {list(b.ne)} does not broadcast to {list(a.ne)}")
        if a.type != F32 or b.type != F32:
            raise GGMLError(f"{what}: takes f32 tensors, not {type_name(a.type)}/{type_name(b.type)}")
        self._reserve()
        return self._made(fn(self.ctx, a.ptr, b.ptr), a.type, a.ne)

    def add(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(self._a.add, a, b, "add")

    def mul(self, a: Tensor, b: Tensor) -> Tensor:
        return self._binary(self._a.mul, a, b, "mul")

    def _unary(self, fn: Callable, a: Tensor, *args: float, what: str, rows_only: bool = True) -> Tensor:
        ok = a.nb[0] == type_traits(a.type)[1] if rows_only else _is_padded_1d(a)
        if not ok or a.type != F32:
            raise GGMLError(f"{what}: needs an f32 tensor with contiguous rows")
        self._reserve()
        return self._made(fn(self.ctx, a.ptr, *args), a.type, a.ne)

    def sqr(self, a: Tensor) -> Tensor:
        return self._unary(self._a.sqr, a, what="sqr")

    def tanh(self, a: Tensor) -> Tensor:
        return self._unary(self._a.tanh, a, what="tanh")

    def sigmoid(self, a: Tensor) -> Tensor:
        return self._unary(self._a.sigmoid, a, what="sigmoid")

    def gelu_erf(self, a: Tensor) -> Tensor:
        """GELU with erf (PyTorch's exact ``gelu``, not the tanh approximation)."""
        return self._unary(self._a.gelu_erf, a, what="gelu_erf")

    def scale(self, a: Tensor, s: float) -> Tensor:
        return self._unary(self._a.scale, a, s, what="scale", rows_only=False)

    def scale_bias(self, a: Tensor, s: float, b: float) -> Tensor:
        return self._unary(self._a.scale_bias, a, s, b, what="scale_bias", rows_only=False)

    def norm(self, a: Tensor, eps: float) -> Tensor:
        return self._unary(self._a.norm, a, eps, what="norm")

    # -- matrix ops -------------------------------------------------------------------------------------------
    def mul_mat(self, a: Tensor, b: Tensor) -> Tensor:
        """(K, M, ...) x (K, N, ...) -> (M, N, ...): ``a``'s rows dotted with ``b``'s rows."""
        if a.ne[0] != b.ne[0] or b.ne[2] % a.ne[2] or b.ne[3] % a.ne[3]:
            raise GGMLError(f"mul_mat: shapes {list(a.ne)} and {list(b.ne)} do not multiply")
        if a.nb[0] > a.nb[1]:
            raise GGMLError("mul_mat: the first operand is transposed")
        if b.nb[0] != type_traits(b.type)[1]:
            raise GGMLError("mul_mat: the second operand's rows are not contiguous")
        self._reserve()
        return self._made(self._a.mul_mat(self.ctx, a.ptr, b.ptr), F32, (a.ne[1], b.ne[1], b.ne[2], b.ne[3]))

    def conv1d(self, kernel: Tensor, x: Tensor, stride: int, pad: int) -> Tensor:
        """A 1-D convolution as im2col (f32) and mul_mat: ``kernel`` (K, C_in, C_out) of any matmul type, ``x``
        (L, C_in) f32 contiguous (time along rows) -> (C_out, L_out) f32: channels along rows, one per step."""
        k, c_in, c_out = kernel.ne[0], kernel.ne[1], kernel.ne[2]
        if x.type != F32 or not x.is_contiguous() or x.ne[1] != c_in or x.ne[2:] != (1, 1) or kernel.ne[3] != 1:
            raise GGMLError(f"conv1d: kernel {list(kernel.ne)} does not fit input {list(x.ne)}")
        if stride < 1 or pad < 0 or not kernel.is_contiguous():
            raise GGMLError("conv1d: needs a contiguous kernel, a positive stride and a non-negative padding")
        n_out = (x.ne[0] + 2 * pad - k) // stride + 1
        if n_out < 1:
            raise GGMLError(f"conv1d: input of {x.ne[0]} steps is shorter than the kernel of {k}")
        self._reserve()
        ptr = self._a.im2col(self.ctx, kernel.ptr, x.ptr, stride, 0, pad, 0, 1, 0, False, F32)
        cols = self._made(ptr, F32, (k * c_in, n_out, 1, 1))  # (K * C_in, L_out)
        return self.mul_mat(self.reshape(kernel, (k * c_in, c_out)), cols)

    def get_rows(self, a: Tensor, ids: Tensor) -> Tensor:
        """Rows ``ids`` (i32 vector) of the matrix ``a`` as f32 (ne0, len(ids))."""
        if ids.type != I32 or ids.ne[1:] != (1, 1, 1) or a.ne[2:] != (1, 1):
            raise GGMLError("get_rows: takes a matrix and an i32 vector of row ids")
        self._reserve()
        return self._made(self._a.get_rows(self.ctx, a.ptr, ids.ptr), F32, (a.ne[0], ids.ne[0], 1, 1))

    def soft_max(self, a: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
        """softmax(a * scale + mask) over rows; ``mask`` (f32/f16, contiguous) broadcasts over ne2/ne3."""
        if not a.is_contiguous() or a.type != F32:
            raise GGMLError("soft_max: needs a contiguous f32 tensor")
        if mask is not None:
            if mask.type not in (F32, F16) or not mask.is_contiguous():
                raise GGMLError("soft_max: the mask must be a contiguous f32 or f16 tensor")
            if mask.ne[0] != a.ne[0] or mask.ne[1] < a.ne[1] or a.ne[2] % mask.ne[2] or a.ne[3] % mask.ne[3]:
                raise GGMLError(f"soft_max: mask {list(mask.ne)} does not fit scores {list(a.ne)}")
        self._reserve()
        return self._made(self._a.soft_max_ext(self.ctx, a.ptr, mask.ptr if mask else None, scale, 0.0), F32, a.ne)

    def rope_neox(self, a: Tensor, pos: Tensor, n_dims: int, base: float, offset: int = 0,
                  inplace: bool = False) -> Tensor:
        """Rotate dims [offset, offset + n_dims) of every row (rotate-half pairs i, i + n_dims/2) by ``pos``.

        ``a``: (row, n, T, ...) f32, rows contiguous (may be a strided view); ``pos``: i32 (T,): row r of dim-2
        index t turns by pos[t]. The result is contiguous, the dims outside the rotated range copied; ``inplace``
        writes into ``a`` instead and returns it (a view with its strides).
        """
        if a.type != F32 or a.nb[0] != 4:
            raise GGMLError("rope: needs f32 rows")
        if pos.type != I32 or pos.ne[1:] != (1, 1, 1) or pos.ne[0] != a.ne[2]:
            raise GGMLError(f"rope: positions {list(pos.ne)} do not match {a.ne[2]} tokens")
        if n_dims <= 0 or n_dims % 2 or offset < 0 or offset % 2 or offset + n_dims > a.ne[0]:
            raise GGMLError(f"rope: cannot rotate dims {offset}..{offset + n_dims} of rows of {a.ne[0]}")
        self._reserve()
        fn = self._a.rope_ext_inplace if inplace else self._a.rope_ext
        ptr = fn(self.ctx, a.ptr, pos.ptr, None, n_dims, ROPE_NEOX, 0, base, 1.0, 0.0, 1.0, 0.0, 0.0)
        if offset:
            self._a.rope_set_offset(ptr, offset)
        return self._made(ptr, F32, a.ne, a.nb, a, 0) if inplace else self._made(ptr, F32, a.ne)

    def flash_attn(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
        """softmax(q·kᵀ * scale + mask)·v per head, in one op: q (D, T, H) f32, k and v (D, n_kv, H) of one of
        ``ATTN_KV_TYPES`` (rows contiguous, may be strided views), mask f16 (n_kv, >= T), contiguous, broadcast over
        heads; -inf there skips the key. Result (D, H, T) f32, contiguous: heads already side by side per token."""
        if q.type != F32 or q.nb[0] != 4:
            raise GGMLError("flash_attn: q must be f32 with contiguous rows")
        for what, t in (("k", k), ("v", v)):
            if t.type not in ATTN_KV_TYPES or t.nb[0] != type_traits(t.type)[1]:
                raise GGMLError(f"flash_attn: {what} must be f32/f16/bf16 with contiguous rows")
        if k.ne[0] != q.ne[0] or v.ne[1:] != k.ne[1:] or q.ne[2] % k.ne[2] or q.ne[3] != k.ne[3]:
            raise GGMLError(f"flash_attn: q {list(q.ne)}, k {list(k.ne)}, v {list(v.ne)} do not fit")
        if mask.type != F16 or not mask.is_contiguous() or mask.ne[0] != k.ne[1] or mask.ne[1] < q.ne[1] \
                or mask.ne[2:] != (1, 1):
            raise GGMLError(f"flash_attn: mask {list(mask.ne)} must be contiguous f16 ({k.ne[1]}, >= {q.ne[1]})")
        self._reserve()
        ptr = self._a.flash_attn_ext(self.ctx, q.ptr, k.ptr, v.ptr, mask.ptr, scale, 0.0, 0.0)
        return self._made(ptr, F32, (v.ne[0], q.ne[2], q.ne[1], q.ne[3]))

    def set_rows(self, dst: Tensor, src: Tensor, rows: Tensor) -> Tensor:
        """Write row i of ``src`` (f32 (D, T, H)) into row ``rows[i]`` of ``dst`` ((D, N, H), any f32/f16/bf16 view)
        for every H; returns the written view, to be expanded. The row ids are checked by whoever fills them:
        ggml asserts 0 <= id < N while computing."""
        if src.type != F32 or src.nb[0] != 4 or dst.type not in ATTN_KV_TYPES or dst.nb[0] != type_traits(dst.type)[1]:
            raise GGMLError("set_rows: f32 rows into f32/f16/bf16 rows, each contiguous")
        if rows.type != I32 or rows.ne[1:] != (1, 1, 1) or rows.ne[0] != src.ne[1]:
            raise GGMLError(f"set_rows: {list(rows.ne)} row ids for {src.ne[1]} rows")
        if dst.ne[0] != src.ne[0] or dst.ne[2:] != src.ne[2:]:
            raise GGMLError(f"set_rows: rows {list(src.ne)} into {list(dst.ne)}")
        self._reserve()
        return self._made(self._a.set_rows(self.ctx, dst.ptr, src.ptr, rows.ptr), dst.type, dst.ne, dst.nb, dst, 0)

    # -- layout -----------------------------------------------------------------------------------------------
    def view(self, a: Tensor, ne: Sequence[int], nb: Sequence[int], offset: int) -> Tensor:
        """A strided view of ``a``'s storage: ``nb`` gives the strides of dims 1.. in bytes, ``offset`` in bytes."""
        n = len(ne)
        if not 1 <= n <= MAX_DIMS or len(nb) != n - 1 or min(ne) < 1 or offset < 0:
            raise GGMLError(f"view: bad shape {list(ne)} / strides {list(nb)} / offset {offset}")
        ne4 = (*ne, 1, 1, 1)[:4]
        nb4 = [a.nb[0], *nb]
        while len(nb4) < MAX_DIMS:
            nb4.append(nb4[-1] * ne4[len(nb4) - 1])
        blck, _ = type_traits(a.type)
        extent = ne4[0] * nb4[0] // blck + (ne4[1] - 1) * nb4[1] + (ne4[2] - 1) * nb4[2] + (ne4[3] - 1) * nb4[3]
        start = a.offs + offset
        if ne4[0] % blck or start + extent > a.root_nbytes:
            raise GGMLError(f"view {list(ne4)} at byte {start} runs past its storage of {a.root_nbytes} bytes")
        self._reserve()
        ptr = self._a.view_4d(self.ctx, a.ptr, *ne4, nb4[1], nb4[2], nb4[3], offset)
        return self._made(ptr, a.type, ne4, tuple(nb4), a, offset)

    def reshape(self, a: Tensor, shape: Sequence[int]) -> Tensor:
        ne4 = _pad4(shape)
        if not a.is_contiguous() or math.prod(ne4) != a.nelements:
            raise GGMLError(f"reshape: cannot view {list(a.ne)} as {list(ne4)}")
        self._reserve()
        return self._made(self._a.reshape_4d(self.ctx, a.ptr, *ne4), a.type, ne4, None, a, 0)

    def permute(self, a: Tensor, *axes: int) -> Tensor:
        """Dim i of ``a`` moves to position ``axes[i]`` (ggml_permute)."""
        axes4 = tuple(axes) + tuple(range(len(axes), 4))
        if sorted(axes4) != [0, 1, 2, 3]:
            raise GGMLError(f"permute: {list(axes)} is not a permutation")
        ne, nb = [0] * 4, [0] * 4
        for i, ax in enumerate(axes4):
            ne[ax], nb[ax] = a.ne[i], a.nb[i]
        self._reserve()
        return self._made(self._a.permute(self.ctx, a.ptr, *axes4), a.type, tuple(ne), tuple(nb), a, 0)

    def cont(self, a: Tensor) -> Tensor:
        self._reserve()
        return self._made(self._a.cont(self.ctx, a.ptr), a.type, a.ne)

    def cpy(self, src: Tensor, dst: Tensor) -> Tensor:
        """Copy (and convert) ``src`` into ``dst``'s memory; the result must be expanded into the graph."""
        if src.nelements != dst.nelements:
            raise GGMLError(f"cpy: {list(src.ne)} into {list(dst.ne)}")
        self._reserve()
        return self._made(self._a.cpy(self.ctx, src.ptr, dst.ptr), dst.type, dst.ne, dst.nb, dst, 0)


def _is_padded_1d(t: Tensor) -> bool:
    return t.nb[0] == type_traits(t.type)[1] and t.nb[2] == t.nb[1] * t.ne[1] and t.nb[3] == t.nb[2] * t.ne[2]

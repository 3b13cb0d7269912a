"""ggml quantization through ctypes: type traits, bytes against gguf-py's independent numpy code, threading, and the
argument checks that keep ggml's aborts unreachable. (Bytes against llama.cpp's quantizer: test_qtypes.py.)"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from chatglm.errors import InputError
from chatglm.ggml import quants
from chatglm.ggml.quants import quantize, row_nbytes, tensor_nbytes


def _name(value: object) -> str:
    return getattr(value, "name", str(value))


def _rows(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * rng.exponential(1.0, shape[-1:])).astype(np.float32)


def test_type_traits_match_gguf_tables() -> None:
    for qtype in quants.QUANTIZABLE:
        blck, size = gguf.GGML_QUANT_SIZES[qtype]
        assert quants.block_size(qtype) == blck
        assert row_nbytes(qtype, 4 * 256) == 4 * 256 // blck * size
        assert quants.type_name(qtype).lower() == qtype.name.lower()
    assert quants.type_name(QT.Q4_K) == "q4_K"
    assert quants.is_quantized(QT.IQ4_NL) and not quants.is_quantized(QT.BF16)
    assert {t for t in quants.QUANTIZABLE if quants.requires_imatrix(t)} == {QT.IQ2_XXS, QT.IQ2_XS, QT.IQ1_S}
    assert tensor_nbytes(QT.Q8_0, (8, 3, 64)) == 24 * 68 and tensor_nbytes(QT.F16, (5,)) == 10


# gguf-py implements these in numpy, mirroring the C reference kernels bit for bit.
@pytest.mark.parametrize("qtype", [QT.F32, QT.F16, QT.BF16, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1, QT.Q8_0, QT.MXFP4,
                                   QT.TQ2_0], ids=_name)
def test_bytes_equal_gguf_py(qtype: QT) -> None:
    x = _rows((33, 512))
    x[3, :] = 0.0  # an all-zero row: scales of 0
    x[4, 7] = 30000.0  # an outlier that dominates its block
    ours = quantize(x, qtype)
    assert ours.dtype == np.uint8 and ours.shape == (33, row_nbytes(qtype, 512))
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, qtype).view(np.uint8).reshape(ours.shape))


# Relative RMS error after a round trip through gguf-py's numpy dequantizers.
@pytest.mark.parametrize("qtype, bound", [
    (QT.Q8_0, 0.01), (QT.Q6_K, 0.03), (QT.Q5_K, 0.06), (QT.Q4_K, 0.12), (QT.Q3_K, 0.25), (QT.Q2_K, 0.5),
    (QT.IQ4_NL, 0.12), (QT.IQ4_XS, 0.12), (QT.IQ3_S, 0.3), (QT.IQ3_XXS, 0.35), (QT.MXFP4, 0.2),
], ids=_name)
def test_round_trip_error(qtype: QT, bound: float) -> None:
    x = _rows((16, 512))
    back = gguf.quants.dequantize(quantize(x, qtype), qtype).reshape(x.shape)
    rel = np.sqrt(np.mean((back - x) ** 2) / np.mean(x**2))
    assert rel < bound, f"{qtype.name}: relative RMS error {rel:.3f}"


def test_threads_and_chunks_do_not_change_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _rows((97, 256))
    single = quantize(x, QT.Q4_K, threads=1)
    monkeypatch.setattr(quants, "_CHUNK_ELEMENTS", 256 * 10)  # 10 chunks, the last one short
    np.testing.assert_array_equal(quantize(x, QT.Q4_K, threads=2), single)
    np.testing.assert_array_equal(quantize(x, QT.Q4_K, threads=3), single)


def test_experts_use_their_own_imatrix_rows() -> None:
    x = _rows((3, 20, 256))  # (n_expert, rows, cols)
    imatrix = np.random.default_rng(5).exponential(1.0, (3, 256)).astype(np.float32)
    ours = quantize(x, QT.Q4_K, imatrix)
    assert ours.shape == (3, 20, row_nbytes(QT.Q4_K, 256))
    for e in range(3):
        np.testing.assert_array_equal(ours[e], quantize(x[e], QT.Q4_K, imatrix[e]))
    assert not np.array_equal(ours, quantize(x, QT.Q4_K))  # the weights matter
    np.testing.assert_array_equal(quantize(x, QT.Q4_K, imatrix.reshape(-1)), ours)  # flat n_expert*cols works too


def test_imatrix_type_runs_with_imatrix_only() -> None:
    x = _rows((2, 256))
    with pytest.raises(InputError, match="quantizing to IQ2_XXS needs an importance matrix"):
        quantize(x, QT.IQ2_XXS)  # ggml would abort the process here
    assert quantize(x, QT.IQ2_XXS, np.ones(256, np.float32)).shape == (2, 66)


@pytest.mark.parametrize("data, qtype, error, message", [
    (np.zeros((2, 256), np.float64), QT.Q4_0, ValueError, "quantize takes a float32 numpy array, not float64"),
    (np.zeros(256, np.float32), QT.Q4_0, ValueError, r"quantize takes non-empty \(rows, cols\)"),
    (np.zeros((0, 256), np.float32), QT.Q4_0, ValueError, r"quantize takes non-empty \(rows, cols\)"),
    (np.zeros((256, 4), np.float32).T, QT.Q4_0, ValueError, "quantize takes C-contiguous data"),
    (np.zeros((2, 100), np.float32), QT.Q4_0, ValueError,
     "a Q4_0 row needs a positive multiple of 32 elements, not 100"),
    (np.zeros((2, 288), np.float32), QT.Q4_K, ValueError,
     "a Q4_K row needs a positive multiple of 256 elements, not 288"),
    (np.zeros((2, 256), np.float32), QT.Q8_K, ValueError, "ggml cannot quantize to Q8_K; it can to BF16, F16, F32,"),
])
def test_bad_arguments_raise_before_c(data: np.ndarray, qtype: QT, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        quantize(data, qtype)


def test_bad_values_raise() -> None:
    x = _rows((4, 256))
    x[2, 5] = np.nan
    with pytest.raises(InputError, match=r"rows 0\.\.3 hold NaN or infinite values"):
        quantize(x, QT.IQ4_XS)
    big = np.full((1, 32), 1e6, np.float32)
    with pytest.raises(InputError, match=r"rows 0\.\.0 do not fit in F16"):
        quantize(big, QT.F16)
    with pytest.raises(ValueError, match=r"the importance matrix has 255 values, the tensor needs 1 x 256"):
        quantize(x[:1], QT.Q4_K, np.ones(255, np.float32))
    with pytest.raises(InputError, match="the importance matrix has negative or non-finite values"):
        quantize(x[:1], QT.Q4_K, -np.ones(256, np.float32))

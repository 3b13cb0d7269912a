"""Recipes and per-tensor types, checked against llama.cpp's own quantizer (llama-cpp-python 0.3.36).

* Bytes: tiny random f32 GGUFs of each architecture go through ``llama_model_quantize``; :func:`plan_types` must
  pick the same type for every tensor and :func:`quantize` must write the same bytes, with and without an
  importance matrix (llama.cpp takes it through ``llama_model_quantize_params.imatrix``).
* Types at real sizes: sparse GGUFs with the exact tensor tables of ChatGLM3-6B, GLM-4-9B, GLM-4-0414, GLM-4.5-Air
  and ChatGLM-6B go through llama.cpp's dry run (no data is read); the type it logs for every tensor must equal ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Optional

import gguf
import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from chatglm.convert import qtypes
from chatglm.convert.imatrix import load_imatrix, n_values, write_legacy
from chatglm.convert.qtypes import ModelInfo, Slot, get_recipe, plan_types
from chatglm.errors import InputError
from chatglm.ggml.quants import quantize


@dataclass(frozen=True)
class Layout:
    """A model's tensor table in llama.cpp's names; shapes numpy order. ``rows`` caps matrix rows (llama.cpp's
    recipes look only at names, row length and expert count, and ggml quantizes rows independently)."""

    arch: str  # the GGUF's architecture (llama.cpp has no chatglm1: GLM-1 layouts say chatglm)
    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 8
    n_head_kv: int = 2
    head_dim: int = 32
    n_ff: int = 160  # not a multiple of 256: ffn_down falls back
    n_vocab: int = 64
    fused_qkv: bool = True
    tied: bool = False
    post_norms: bool = False
    glm1: bool = False  # LayerNorm and dense biases, plain (not gated) ffn_up
    n_expert: int = 0
    n_ff_exp: int = 64
    n_dense_lead: int = 1
    nextn: bool = False
    rows: Optional[int] = 16
    our_arch: Optional[str] = None  # ModelInfo.arch when it differs from ``arch``
    mla: Optional[tuple[int, int, int, int, int]] = None  # deepseek2: q_lora, kv_lora, nope, rope, v head sizes

    def info(self) -> ModelInfo:
        n_block = self.n_layer + int(self.nextn)
        n_head_kv = 1 if self.mla else self.n_head_kv
        return ModelInfo(self.our_arch or self.arch, n_block, self.n_head, n_head_kv, self.n_expert)

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        cap = self.rows or 1 << 62
        return [(n, s[:-2] + (min(s[-2], cap),) + s[-1:] if len(s) > 1 else s) for n, s in self._tensors()]

    def _tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        e, v = self.n_embd, self.n_vocab
        out = [("token_embd.weight", (v, e)), ("output_norm.weight", (e,))]
        out += [("output_norm.bias", (e,))] if self.glm1 else []
        out += [] if self.tied else [("output.weight", (v, e))]
        for i in range(self.n_layer + int(self.nextn)):
            out += [(f"blk.{i}.{name}", shape) for name, shape in self._attention() + self._ffn(i)]
            if self.nextn and i == self.n_layer:
                out += [(f"blk.{i}.nextn.{n}", s) for n, s in [
                    ("eh_proj.weight", (e, 2 * e)), ("enorm.weight", (e,)), ("hnorm.weight", (e,)),
                    ("shared_head_head.weight", (v, e)), ("shared_head_norm.weight", (e,))]]
        return out

    def _attention(self) -> list[tuple[str, tuple[int, ...]]]:
        if self.mla:
            return self._mla_attention()
        e, q, kv = self.n_embd, self.n_head * self.head_dim, self.n_head_kv * self.head_dim
        out = [("attn_norm.weight", (e,)), ("attn_output.weight", (e, q)), ("ffn_norm.weight", (e,))]
        if self.fused_qkv:
            out += [("attn_qkv.weight", (q + 2 * kv, e)), ("attn_qkv.bias", (q + 2 * kv,))]
        else:
            out += [("attn_q.weight", (q, e)), ("attn_k.weight", (kv, e)), ("attn_v.weight", (kv, e)),
                    ("attn_q.bias", (q,)), ("attn_k.bias", (kv,)), ("attn_v.bias", (kv,))]
        out += [("post_attention_norm.weight", (e,)), ("post_ffw_norm.weight", (e,))] if self.post_norms else []
        out += [(n, (e,)) for n in ("attn_norm.bias", "ffn_norm.bias", "attn_output.bias")] if self.glm1 else []
        return out

    def _mla_attention(self) -> list[tuple[str, tuple[int, ...]]]:
        """deepseek2's multi-head latent attention, kv_b split per head (GLM-4.7-Flash)."""
        (ql, kl, nope, rope, v), e, h = self.mla, self.n_embd, self.n_head
        return [("attn_norm.weight", (e,)), ("attn_q_a.weight", (ql, e)), ("attn_q_a_norm.weight", (ql,)),
                ("attn_q_b.weight", (h * (nope + rope), ql)), ("attn_kv_a_mqa.weight", (kl + rope, e)),
                ("attn_kv_a_norm.weight", (kl,)), ("attn_k_b.weight", (h, kl, nope)), ("attn_v_b.weight", (h, v, kl)),
                ("attn_output.weight", (e, h * v)), ("ffn_norm.weight", (e,))]

    def _ffn(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        e, f, x = self.n_embd, self.n_ff_exp, self.n_expert
        if self.mla and not (x and i >= self.n_dense_lead):  # deepseek2: separate gate and up
            return [("ffn_gate.weight", (self.n_ff, e)), ("ffn_up.weight", (self.n_ff, e)),
                    ("ffn_down.weight", (e, self.n_ff))]
        if x and i >= self.n_dense_lead:
            return [("ffn_gate_inp.weight", (x, e)), ("exp_probs_b.bias", (x,)),
                    ("ffn_gate_exps.weight", (x, f, e)), ("ffn_up_exps.weight", (x, f, e)),
                    ("ffn_down_exps.weight", (x, e, f)), ("ffn_gate_shexp.weight", (f, e)),
                    ("ffn_up_shexp.weight", (f, e)), ("ffn_down_shexp.weight", (e, f))]
        up = self.n_ff if self.glm1 else 2 * self.n_ff  # GLM-1: GELU MLP; later GLMs: gate and up fused
        out = [("ffn_up.weight", (up, e)), ("ffn_down.weight", (e, self.n_ff))]
        return out + ([("ffn_up.bias", (up,)), ("ffn_down.bias", (e,))] if self.glm1 else [])

    def _writer(self, path: Path) -> gguf.GGUFWriter:
        w = gguf.GGUFWriter(path, self.arch)
        w.add_context_length(128)
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_layer + int(self.nextn))
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_layer_norm_rms_eps(1e-5)
        if self.mla:
            self._mla_keys(w)
        else:
            w.add_head_count_kv(self.n_head_kv)
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
            w.add_rope_dimension_count(self.head_dim // 2)
        if self.n_expert:
            w.add_expert_count(self.n_expert)
            w.add_expert_used_count(2)
            w.add_expert_shared_count(1)
            w.add_expert_feed_forward_length(self.n_ff_exp)
            w.add_leading_dense_block_count(self.n_dense_lead)
            w.add_nextn_predict_layers(int(self.nextn))
        return w

    def _mla_keys(self, w: gguf.GGUFWriter) -> None:
        ql, kl, nope, rope, v = self.mla
        w.add_head_count_kv(1)
        w.add_key_length(kl + rope)
        w.add_value_length(kl)
        w.add_rope_dimension_count(rope)
        w.add_q_lora_rank(ql)
        w.add_kv_lora_rank(kl)
        w.add_key_length_mla(nope + rope)
        w.add_value_length_mla(v)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)

    def write(self, path: Path, seed: int = 0) -> dict[str, np.ndarray]:
        """A GGUF with random heavy-tailed f32 weights; returns them."""
        rng, w, data = np.random.default_rng(seed), self._writer(path), {}
        for name, shape in self.tensors():
            data[name] = (rng.standard_normal(shape) * rng.exponential(1.0, shape[-1:])).astype(np.float32)
            w.add_tensor(name, data[name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return data

    def write_sparse(self, path: Path) -> None:
        """The header of an f32 GGUF and a hole where its data would be (for dry runs, which read no data)."""
        w = self._writer(path)
        for name, shape in self.tensors():
            w.add_tensor_info(name, shape, np.dtype(np.float32), 4 * int(np.prod(shape)))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        data_size = sum(w.ggml_pad(4 * int(np.prod(s)), w.data_alignment) for _, s in self.tensors())
        fout = w.fout[0]
        fout.truncate(w.ggml_pad(fout.tell(), w.data_alignment) + data_size)
        w.close()


def _imatrix_table(imatrix: dict[str, np.ndarray]) -> ctypes.Array:
    """llama_model_imatrix_data[], name-NULL terminated; the arrays must outlive the call."""
    table = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
    for slot, (name, values) in zip(table[:-1], imatrix.items(), strict=True):
        slot.name = name.encode()
        slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = values.size
    return table


def llama_quantize(src: Path, dst: Path, ftype: int, imatrix: Optional[dict[str, np.ndarray]] = None,
                   pure: bool = False, dry_run: bool = False) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread, params.pure, params.dry_run = ftype, 2, pure, dry_run
    if imatrix is not None:
        imatrix = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in imatrix.items()}
        params.imatrix = table = _imatrix_table(imatrix)  # noqa: F841  (kept alive through the call)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, "llama_model_quantize failed (see its log)"


@contextlib.contextmanager
def captured_llama_log() -> Iterator[list[str]]:
    """Collects llama.cpp's log text, then puts the previous logger back."""
    old_cb, old_ud = llama_cpp.llama_log_callback(), ctypes.c_void_p()
    llama_cpp.llama_log_get(ctypes.byref(old_cb), ctypes.byref(old_ud))
    chunks: list[str] = []
    callback = llama_cpp.llama_log_callback(lambda level, text, ud: chunks.append(text.decode(errors="replace")))
    llama_cpp.llama_log_set(callback, None)
    try:
        yield chunks
    finally:
        llama_cpp.llama_log_set(old_cb, old_ud)


_DRY_RUN_LINE = re.compile(r"^\[\s*\d+/\s*\d+\]\s+(\S+)\s+- \[[^\]]*\], type =\s*(\S+), size =\s*[\d.]+ MiB"
                           r"(?:\s+->\s+[\d.]+ MiB \((\S+)\))?", re.M)


def llama_dry_run_types(src: Path, ftype: int, has_imatrix: bool) -> dict[str, str]:
    """Tensor name -> ggml type name that llama.cpp's dry run reports."""
    with captured_llama_log() as chunks:
        llama_quantize(src, src.with_suffix(".none"), ftype, imatrix={} if has_imatrix else None, dry_run=True)
    return {m[1]: (m[3] or m[2]).lower() for m in _DRY_RUN_LINE.finditer("".join(chunks))}


def ours(recipe_name: str, layout: Layout, data: dict[str, np.ndarray],
         imatrix: Optional[dict[str, np.ndarray]] = None, pure: bool = False) -> dict[str, tuple[QT, bytes]]:
    recipe = get_recipe(recipe_name, pure=pure)
    shapes = {name: a.shape for name, a in data.items()}
    plan = plan_types(recipe, list(shapes.items()), layout.info(), has_imatrix=imatrix is not None)
    out = {}
    for name, qtype in plan.items():
        weights = None if imatrix is None else imatrix.get(name)
        blob = data[name] if qtype == QT.F32 else quantize(data[name], qtype, weights)
        out[name] = (qtype, blob.tobytes())
    return out


def assert_same(theirs_path: Path, mine: dict[str, tuple[QT, bytes]]) -> None:
    theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
    assert sorted(theirs) == sorted(mine)
    wrong_type = {n: (t.tensor_type.name, mine[n][0].name) for n, t in theirs.items() if t.tensor_type != mine[n][0]}
    assert not wrong_type, f"tensor: (llama.cpp, ours) {wrong_type}"
    wrong_bytes = [n for n, t in theirs.items() if t.data.tobytes() != mine[n][1]]
    assert not wrong_bytes, f"bytes differ for {wrong_bytes}"


TINY = {
    "chatglm": Layout("chatglm"),  # ChatGLM2/3, GLM-4-9B: fused qkv, gqa 4
    "glm4": Layout("glm4", n_head_kv=8, fused_qkv=False, post_norms=True, tied=True, n_ff=200),  # gqa 1, n_ff%32
    "glm4moe": Layout("glm4moe", n_layer=4, fused_qkv=False, n_expert=8, nextn=True),  # 8 experts, MTP block
    # GLM-4.7-Flash's MLA: k_b/v_b are 3-D (heads), rows of 32/64 (k-quants fall back), MTP block
    "deepseek2": Layout("deepseek2", n_layer=4, n_expert=8, nextn=True, mla=(64, 256, 32, 32, 64)),
    "chatglm1": Layout("chatglm", n_head_kv=8, glm1=True, our_arch="chatglm1"),
}

PLAIN_RECIPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
                 "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", "iq3_s", "iq3_m", "mxfp4_moe"]
# Recipes that need an importance matrix or choose differently with one. ggml builds the search tables of iq1_*,
# iq2_xs and iq2_s on first use (5-20 s each here), so recipes using those (iq1_*, iq2_xs/s/m, and iq3_xxs where q/k
# are separate tensors) are checked by the dry-run test only; iq2_xxs (3 s) on one layout.
IMATRIX_CASES = [(key, r) for key in ("chatglm", "glm4", "glm4moe", "deepseek2")
                 for r in ("iq3_xs", "q2_k_s", "q4_0", "q5_0", "iq4_nl", "iq4_xs", "q3_k_m", "q4_k_m")]
IMATRIX_CASES += [("chatglm", "iq2_xxs"), ("chatglm", "iq3_xxs")]
PURE_RECIPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "iq4_xs"]


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("tiny")
    return {key: (root / f"{key}.gguf", layout.write(root / f"{key}.gguf")) for key, layout in TINY.items()}


def imatrix_for(data: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """Writes a legacy imatrix for the quantizable weights (plus a wrong-sized token_embd entry, which llama.cpp
    ignores) and reads it back as the converter will."""
    rng = np.random.default_rng(1)
    raw = {n: (5, rng.exponential(1.0, n_values(a.shape)).astype(np.float32)) for n, a in data.items()
           if qtypes.allows_quantization(n, a.shape) and n != "token_embd.weight"}
    raw["token_embd.weight"] = (5, np.ones(3, np.float32))
    write_legacy(path, raw, chunk_count=5, dataset="tiny.txt")
    matrix = load_imatrix(path)
    matrix.check_model({n: a.shape for n, a in data.items()})
    return {n: v for n in matrix.entries if (v := matrix.for_tensor(n, data[n].shape)) is not None}


@pytest.mark.parametrize("key, recipe", [(key, r) for key in ("chatglm", "glm4", "glm4moe", "deepseek2")
                                         for r in PLAIN_RECIPES]
                         + [("chatglm1", r) for r in ("q8_0", "q4_k_m", "iq4_xs", "bf16")])
def test_bytes_match_llama_cpp(tiny_files, tmp_path: Path, key: str, recipe: str) -> None:
    src, data = tiny_files[key]
    llama_quantize(src, tmp_path / "out.gguf", get_recipe(recipe).ftype)
    assert_same(tmp_path / "out.gguf", ours(recipe, TINY[key], data))


@pytest.mark.parametrize("key, recipe", IMATRIX_CASES)
def test_bytes_with_imatrix_match_llama_cpp(tiny_files, tmp_path: Path, key: str, recipe: str) -> None:
    src, data = tiny_files[key]
    imatrix = imatrix_for(data, tmp_path / "imatrix.dat")
    llama_quantize(src, tmp_path / "out.gguf", get_recipe(recipe).ftype, imatrix=imatrix)
    assert_same(tmp_path / "out.gguf", ours(recipe, TINY[key], data, imatrix))


@pytest.mark.parametrize("recipe", PURE_RECIPES)
def test_pure_bytes_match_llama_cpp(tiny_files, tmp_path: Path, recipe: str) -> None:
    src, data = tiny_files["chatglm"]
    llama_quantize(src, tmp_path / "out.gguf", get_recipe(recipe).ftype, pure=True)
    assert_same(tmp_path / "out.gguf", ours(recipe, TINY["chatglm"], data, pure=True))


REAL = {  # published configs; rows uncapped (the files are sparse)
    "chatglm3-6b": Layout("chatglm", 28, 4096, 32, 2, 128, 13696, 65024, rows=None),
    "glm-4-9b-chat": Layout("chatglm", 40, 4096, 32, 2, 128, 13696, 151552, rows=None),
    "glm-4-9b-0414": Layout("glm4", 40, 4096, 32, 2, 128, 13696, 151552, fused_qkv=False, post_norms=True,
                            rows=None),
    "glm-4-32b-0414": Layout("glm4", 61, 6144, 48, 8, 128, 23040, 151552, fused_qkv=False, post_norms=True,
                             rows=None),
    "glm-4.5-air": Layout("glm4moe", 46, 4096, 96, 8, 128, 10944, 151552, fused_qkv=False, n_expert=128,
                          n_ff_exp=1408, nextn=True, rows=None),
    "chatglm-6b": Layout("chatglm", 28, 4096, 32, 32, 128, 16384, 130528, glm1=True, our_arch="chatglm1", rows=None),
    "glm-4.7-flash": Layout("deepseek2", 47, 2048, 20, 20, 256, 10240, 154880, n_expert=64, n_ff_exp=1536,
                            nextn=True, mla=(768, 512, 192, 64, 256), rows=None),
}
# Every recipe; the imatrix flag only for recipes whose choices depend on it.
DRY_RUNS = [(r, False) for r in qtypes.RECIPES] + [(r, True) for r in ("iq3_xxs", "iq4_nl", "iq4_xs", "q4_0", "q5_0")]


@pytest.mark.parametrize("key", list(REAL))
def test_types_match_llama_cpp_at_real_sizes(tmp_path: Path, key: str) -> None:
    layout = REAL[key]
    layout.write_sparse(tmp_path / "model.gguf")
    tensors = layout.tensors()
    mismatches = {}
    for recipe_name, has_imatrix in DRY_RUNS:
        recipe = get_recipe(recipe_name)
        theirs = llama_dry_run_types(tmp_path / "model.gguf", recipe.ftype, has_imatrix)
        assert len(theirs) == len(tensors), "could not read llama.cpp's dry-run log"
        mine = plan_types(recipe, tensors, layout.info(), has_imatrix=has_imatrix)
        mismatches.update({(recipe_name, has_imatrix, n): (theirs[n], t.name.lower())
                           for n, t in mine.items() if theirs[n] != t.name.lower()})
    assert not mismatches, f"(recipe, imatrix, tensor): (llama.cpp, ours) {mismatches}"


def test_q4_k_m_on_chatglm3_keeps_llama_cpp_choices() -> None:
    """Spelled out: which ChatGLM3-6B tensors q4_k_m keeps at higher precision, and the shape fallbacks."""
    layout = REAL["chatglm3-6b"]
    plan = plan_types(get_recipe("q4_k_m"), layout.tensors(), layout.info())
    assert plan["output.weight"] == QT.Q6_K and plan["token_embd.weight"] == QT.Q4_K
    # attn_qkv counts as attn_v (i_attention_wv): q6_k on layers 0-2, 5, 8, ..., 24-27 of 28; llama.cpp's own
    # attn_qkv rule (q5_k for q4_k_m) is never reached.
    more_bits = [i for i in range(28) if plan[f"blk.{i}.attn_qkv.weight"] == QT.Q6_K]
    assert more_bits == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
    assert all(plan[f"blk.{i}.attn_qkv.weight"] == QT.Q4_K for i in set(range(28)) - set(more_bits))
    # ffn_down rows are 13696 long, not a multiple of 256: q6_k falls back to q8_0, q4_k to q5_0
    assert {plan[f"blk.{i}.ffn_down.weight"] for i in more_bits} == {QT.Q8_0}
    assert plan["blk.3.ffn_down.weight"] == QT.Q5_0
    assert plan["blk.3.attn_qkv.bias"] == QT.F32 and plan["blk.3.ffn_norm.weight"] == QT.F32


def test_unknown_type_lists_valid_ones() -> None:
    with pytest.raises(InputError) as e:
        get_recipe("q4_k_x")
    assert str(e.value).startswith("unknown output type 'q4_k_x'; valid types: f32, f16, bf16, q4_0,")
    assert "q4_k_m" in str(e.value) and "iq4_xs" in str(e.value)


def test_names_and_aliases() -> None:
    assert get_recipe("Q4_K_M") == get_recipe("q4_k_m")
    assert get_recipe("q4_k").ftype == gguf.LlamaFileType.MOSTLY_Q4_K_M  # llama-quantize's alias
    assert get_recipe("q4_k", pure=True).pure and get_recipe("q4_k", pure=True).default == QT.Q4_K
    assert qtypes.recipe_for_ftype(gguf.LlamaFileType.MOSTLY_Q5_K_M).name == "q5_k_m"
    assert qtypes.recipe_for_ftype(gguf.LlamaFileType.MOSTLY_TQ1_0) is None
    assert not get_recipe("bf16").quantized and get_recipe("iq4_nl").quantized


@pytest.mark.parametrize("qtype, n_cols, expected", [
    (QT.Q4_K, 4096, QT.Q4_K), (QT.Q4_K, 13696, QT.Q5_0), (QT.Q5_K, 13696, QT.Q5_1), (QT.Q6_K, 13696, QT.Q8_0),
    (QT.Q2_K, 13696, QT.Q4_0), (QT.Q3_K, 13696, QT.Q4_0), (QT.IQ4_XS, 13696, QT.IQ4_NL), (QT.IQ2_XXS, 160, QT.IQ4_NL),
    (QT.Q4_K, 200, QT.F16), (QT.Q8_0, 200, QT.F16), (QT.Q4_0, 96, QT.Q4_0),
])
def test_fallback_types(qtype: QT, n_cols: int, expected: QT) -> None:
    assert qtypes.fallback_type(qtype, n_cols) == expected


def test_choose_type_keeps_what_llama_cpp_never_quantizes() -> None:
    info, slot = TINY["glm4moe"].info(), Slot(0, 1, False, False)
    recipe = get_recipe("q4_k_m")
    for name, shape in [("blk.1.ffn_gate_inp.weight", (8, 256)), ("blk.0.attn_norm.weight", (256,)),
                        ("blk.0.attn_q.bias", (256,)), ("blk.0.attn_k.weight", (1, 256))]:
        assert qtypes.choose_type(recipe, name, shape, info, slot) == QT.F32
    assert qtypes.choose_type(recipe, "blk.0.attn_norm.weight", (256,), info, slot, source=QT.F16) == QT.F16


def test_requantize_and_imatrix_predicates() -> None:
    assert qtypes.is_lossy_requantize(QT.Q4_0, QT.Q4_K)
    assert not qtypes.is_lossy_requantize(QT.Q4_0, QT.Q4_0)
    assert not qtypes.is_lossy_requantize(QT.F16, QT.Q4_0) and not qtypes.is_lossy_requantize(QT.BF16, QT.F16)
    q2ks, q2k = get_recipe("q2_k_s"), get_recipe("q2_k")
    assert qtypes.tensor_requires_imatrix(q2ks, "blk.0.ffn_up.weight", QT.Q2_K)
    assert not qtypes.tensor_requires_imatrix(q2k, "blk.0.ffn_up.weight", QT.Q2_K)
    assert qtypes.tensor_requires_imatrix(q2k, "blk.0.ffn_up.weight", QT.IQ2_XS)
    assert not qtypes.tensor_requires_imatrix(q2ks, "token_embd.weight", QT.IQ2_XS)
    layout = TINY["chatglm"]
    plan = plan_types(q2ks, layout.tensors(), layout.info())
    needing = qtypes.tensors_needing_imatrix(q2ks, plan)
    assert "blk.0.attn_output.weight" in needing and "output.weight" not in needing
    assert "blk.0.attn_qkv.weight" not in needing  # q4_k at gqa 4
    assert qtypes.tensors_needing_imatrix(get_recipe("q4_k_m"), plan_types(get_recipe("q4_k_m"), layout.tensors(),
                                                                           layout.info())) == []


def test_model_info_rejects_other_architectures() -> None:
    with pytest.raises(ValueError, match="no quantization recipe for architecture 'qwen2'"):
        ModelInfo("qwen2", 32, 32, 8)
    assert replace(TINY["chatglm"], n_head_kv=8).info().n_gqa == 1

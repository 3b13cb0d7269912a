"""Recipes and per-tensor types against llama.cpp's own quantizer.

Each case writes a tiny random f32 GGUF of a llama.cpp architecture, runs ``llama_model_quantize`` (the
llama-cpp-python 0.3.36 build) on it, and checks that :func:`plan_types` picks the same type for every tensor and
:func:`quantize` writes the same bytes. The importance-matrix cases pass the same values to both sides (llama.cpp
takes them through ``llama_model_quantize_params.imatrix``).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

from chatglm.convert import qtypes
from chatglm.convert.imatrix import load_imatrix, n_values, write_legacy
from chatglm.convert.qtypes import ModelInfo, get_recipe, plan_types
from chatglm.errors import InputError
from chatglm.ggml.quants import quantize

llama_cpp = pytest.importorskip("llama_cpp")  # a declared dependency: absent only in a broken install


ROWS = 16


@dataclass(frozen=True)
class Tiny:
    """A tiny model in llama.cpp's tensor layout; shapes are numpy order (rows, cols)."""

    arch: str  # what the GGUF says (llama.cpp knows no chatglm1: it gets "chatglm")
    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 8
    n_head_kv: int = 2
    n_ff: int = 160  # not a multiple of 256: ffn_down rows fall back
    n_vocab: int = 64
    fused_qkv: bool = True
    tied: bool = False
    post_norms: bool = False
    glm1_biases: bool = False
    n_expert: int = 0
    n_ff_exp: int = 64
    n_dense_lead: int = 1
    nextn: bool = False

    @property
    def n_block(self) -> int:
        return self.n_layer + int(self.nextn)

    def info(self, arch: Optional[str] = None) -> ModelInfo:
        return ModelInfo(arch or self.arch, self.n_block, self.n_head, self.n_head_kv, self.n_expert)

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes; matrices keep their row length but only ``ROWS`` rows (llama.cpp's recipes look at
        names, row length and expert count only, and the kernels quantize rows independently)."""
        return [(name, shape[:-2] + (min(shape[-2], ROWS),) + shape[-1:] if len(shape) > 1 else shape)
                for name, shape in self._tensors()]

    def _tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        e, v = self.n_embd, self.n_vocab
        out = [("token_embd.weight", (v, e)), ("output_norm.weight", (e,))]
        out += [] if self.tied else [("output.weight", (v, e))]
        for i in range(self.n_block):
            out += [(f"blk.{i}.{name}", shape) for name, shape in self._block(i)]
        return out

    def _block(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        e, kv = self.n_embd, self.n_embd // self.n_head * self.n_head_kv
        out: list[tuple[str, tuple[int, ...]]] = [("attn_norm.weight", (e,)), ("attn_output.weight", (e, e))]
        if self.fused_qkv:
            out += [("attn_qkv.weight", (e + 2 * kv, e)), ("attn_qkv.bias", (e + 2 * kv,))]
        else:
            out += [("attn_q.weight", (e, e)), ("attn_k.weight", (kv, e)), ("attn_v.weight", (kv, e)),
                    ("attn_q.bias", (e,)), ("attn_k.bias", (kv,)), ("attn_v.bias", (kv,))]
        out += [("post_attention_norm.weight", (e,)), ("post_ffw_norm.weight", (e,))] if self.post_norms else []
        out += [("ffn_norm.weight", (e,))]
        if self.glm1_biases:
            out += [(n, (e,)) for n in ("attn_norm.bias", "ffn_norm.bias", "attn_output.bias", "ffn_down.bias")]
            out += [("ffn_up.bias", (2 * self.n_ff,))]
        if self.n_expert and i >= self.n_dense_lead:
            x, f = self.n_expert, self.n_ff_exp
            out += [("ffn_gate_inp.weight", (x, e)), ("exp_probs_b.bias", (x,)),
                    ("ffn_gate_exps.weight", (x, f, e)), ("ffn_up_exps.weight", (x, f, e)),
                    ("ffn_down_exps.weight", (x, e, f)), ("ffn_gate_shexp.weight", (f, e)),
                    ("ffn_up_shexp.weight", (f, e)), ("ffn_down_shexp.weight", (e, f))]
        else:
            out += [("ffn_up.weight", (2 * self.n_ff, e)), ("ffn_down.weight", (e, self.n_ff))]
        if self.nextn and i == self.n_layer:
            out += [("nextn.eh_proj.weight", (e, 2 * e)), ("nextn.enorm.weight", (e,)), ("nextn.hnorm.weight", (e,)),
                    ("nextn.shared_head_head.weight", (self.n_vocab, e)), ("nextn.shared_head_norm.weight", (e,))]
        return out

    def write(self, path: Path, seed: int = 0) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        w = gguf.GGUFWriter(path, self.arch)
        w.add_context_length(128)
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_block)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_rope_dimension_count(self.n_embd // self.n_head // 2)
        if self.n_expert:
            w.add_expert_count(self.n_expert)
            w.add_expert_used_count(2)
            w.add_expert_shared_count(1)
            w.add_expert_feed_forward_length(self.n_ff_exp)
            w.add_leading_dense_block_count(self.n_dense_lead)
            w.add_nextn_predict_layers(int(self.nextn))
        data = {}
        for name, shape in self.tensors():
            # heavy-tailed values so scales and outliers matter
            data[name] = (rng.standard_normal(shape) * rng.exponential(1.0, shape[-1:])).astype(np.float32)
            w.add_tensor(name, data[name])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return data


def llama_quantize(src: Path, dst: Path, ftype: int, imatrix: Optional[dict[str, np.ndarray]] = None,
                   pure: bool = False) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    params.pure = pure
    if imatrix is not None:
        arrays = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in imatrix.items()}
        table = (llama_cpp.llama_model_imatrix_data * (len(arrays) + 1))()
        for slot, (name, values) in zip(table, arrays.items()):
            slot.name = name.encode()
            slot.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            slot.size = values.size
        params.imatrix = table  # arrays and table stay referenced until the call returns
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    assert rc == 0, "llama_model_quantize failed (see its log above)"


def ours(recipe_name: str, model: Tiny, data: dict[str, np.ndarray], imatrix: Optional[dict[str, np.ndarray]] = None,
         pure: bool = False, arch: Optional[str] = None) -> dict[str, tuple[QT, np.ndarray]]:
    recipe = get_recipe(recipe_name, pure=pure)
    shapes = {name: a.shape for name, a in data.items()}
    plan = plan_types(recipe, list(shapes.items()), model.info(arch), has_imatrix=imatrix is not None)
    out = {}
    for name, qtype in plan.items():
        weights = None if imatrix is None else imatrix.get(name)
        blob = data[name] if qtype == QT.F32 else quantize(data[name].reshape(-1, shapes[name][-1])
                                                           if data[name].ndim == 1 else data[name], qtype, weights)
        out[name] = (qtype, np.asarray(blob).view(np.uint8).reshape(-1))
    return out


def assert_same(theirs_path: Path, mine: dict[str, tuple[QT, np.ndarray]]) -> None:
    theirs = {t.name: t for t in gguf.GGUFReader(theirs_path).tensors}
    assert sorted(theirs) == sorted(mine)
    wrong_type = {n: (t.tensor_type.name, mine[n][0].name) for n, t in theirs.items() if t.tensor_type != mine[n][0]}
    assert not wrong_type, f"llama.cpp vs ours: {wrong_type}"
    wrong_bytes = [n for n, t in theirs.items() if not np.array_equal(t.data.view(np.uint8).reshape(-1), mine[n][1])]
    assert not wrong_bytes, f"bytes differ for {wrong_bytes}"


CHATGLM = Tiny("chatglm")  # ChatGLM2/3, GLM-4-9B: fused qkv, gqa 4
GLM4 = Tiny("glm4", n_head_kv=8, fused_qkv=False, post_norms=True, tied=True, n_ff=200)  # gqa 1, n_ff % 32 != 0
GLM4MOE = Tiny("glm4moe", n_layer=4, fused_qkv=False, n_expert=8, nextn=True)  # dense lead block, 8 experts, MTP
GLM1 = Tiny("chatglm", n_head_kv=8, glm1_biases=True)  # our chatglm1 tensor set (llama.cpp reads it as chatglm)
MODELS = {"chatglm": (CHATGLM, None), "glm4": (GLM4, None), "glm4moe": (GLM4MOE, None), "glm1": (GLM1, "chatglm1")}

PLAIN_RECIPES = ["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l",
                 "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_nl", "iq4_xs", "iq3_s", "iq3_m", "mxfp4_moe"]
# Recipes that need an importance matrix, and ones whose choices or bytes change with one.
IMATRIX_RECIPES = ["iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s",
                   "q4_0", "q5_0", "iq4_nl", "iq4_xs", "q2_k", "q3_k_m", "q4_k_m", "q6_k"]
PURE_RECIPES = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q4_0", "iq4_xs"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Tiny, Path, dict[str, np.ndarray]]]:
    root = tmp_path_factory.mktemp("tiny")
    made = {}
    for key, (model, _) in MODELS.items():
        path = root / f"{key}.f32.gguf"
        made[key] = (model, path, model.write(path))
    return made


def imatrix_for(data: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    """Writes a legacy imatrix for every quantizable weight (plus a wrong-sized token_embd entry, which llama.cpp
    ignores) and reads it back as the quantizer will use it."""
    rng = np.random.default_rng(1)
    raw = {n: (5, rng.exponential(1.0, n_values(a.shape)).astype(np.float32)) for n, a in data.items()
           if qtypes.allows_quantization(n, a.shape) and n != "token_embd.weight"}
    raw["token_embd.weight"] = (5, np.ones(3, np.float32))
    write_legacy(path, raw, chunk_count=5, dataset="tiny.txt")
    matrix = load_imatrix(path)
    matrix.check_model({n: a.shape for n, a in data.items()})
    return {n: v for n in matrix.entries if (v := matrix.for_tensor(n, data[n].shape)) is not None}


@pytest.mark.parametrize("recipe", PLAIN_RECIPES)
@pytest.mark.parametrize("model_key", list(MODELS))
def test_recipes_match_llama_cpp(files, tmp_path: Path, model_key: str, recipe: str) -> None:
    model, src, data = files[model_key]
    llama_quantize(src, tmp_path / "out.gguf", get_recipe(recipe).ftype)
    assert_same(tmp_path / "out.gguf", ours(recipe, model, data, arch=MODELS[model_key][1]))


@pytest.mark.parametrize("recipe", IMATRIX_RECIPES)
@pytest.mark.parametrize("model_key", list(MODELS))
def test_recipes_with_imatrix_match_llama_cpp(files, tmp_path: Path, model_key: str, recipe: str) -> None:
    model, src, data = files[model_key]
    imatrix = imatrix_for(data, tmp_path / "imatrix.dat")
    llama_quantize(src, tmp_path / "out.gguf", get_recipe(recipe).ftype, imatrix=imatrix)
    assert_same(tmp_path / "out.gguf", ours(recipe, model, data, imatrix, arch=MODELS[model_key][1]))


@pytest.mark.parametrize("recipe", PURE_RECIPES)
def test_pure_recipes_match_llama_cpp(files, tmp_path: Path, recipe: str) -> None:
    model, src, data = files["chatglm"]
    llama_quantize(src, tmp_path / "out.gguf", get_recipe(recipe).ftype, pure=True)
    assert_same(tmp_path / "out.gguf", ours(recipe, model, data, pure=True))

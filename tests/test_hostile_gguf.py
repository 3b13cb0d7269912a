"""Hostile GGUF files given to run/info/bench, and settings that used to reach llama.cpp unchecked (issue #16).

Every file is written here with gguf.GGUFWriter (or struct): a tiny synthetic model of each architecture whose
tensors have the shapes llama.cpp's loaders create (read from src/models/chatglm.cpp, glm4-moe.cpp), then one field
or tensor made hostile. Cases that reached a GGML_ASSERT, a C++ throw through ctypes or a double free run in child
processes: the headline ones one command per child, the rest of the corpus in one child that runs each command
through Typer's runner and reports every outcome (an abort there fails the whole table instead of killing pytest).
"""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import gguf
import numpy as np
import pytest

from hostile import ROOT, Outcome, assert_refused, cli, digest

# -- tiny synthetic GGUFs ----------------------------------------------------------------------------------------------
E, H, HKV, HD, FF, L = 16, 2, 1, 8, 24, 2  # embedding, heads, KV heads, head size, FFN, blocks
N_EXPERT, N_USED, FF_EXP = 4, 2, 8
SPM_TOKENS = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "▁", "▁hi", "hi", "▁a", "a"]
SPM_TYPES = [2, 3, 3, *[6] * 256, 1, 1, 1, 1, 1]
BPE_TOKENS = ["a", "b", "ab", "Ġ", "Ġa", "<|endoftext|>", "[gMASK]", "<sop>", "<|user|>", "<|assistant|>"]
BPE_TYPES = [1, 1, 1, 1, 1, 3, 3, 3, 3, 3]


def _attention(p: str, fused: bool) -> dict[str, tuple[int, ...]]:
    q, kv = HD * H, HD * HKV
    if fused:
        return {f"{p}attn_qkv.weight": (E, q + 2 * kv), f"{p}attn_qkv.bias": (q + 2 * kv,)}
    return {f"{p}attn_q.weight": (E, q), f"{p}attn_k.weight": (E, kv), f"{p}attn_v.weight": (E, kv),
            f"{p}attn_q.bias": (q,), f"{p}attn_k.bias": (kv,), f"{p}attn_v.bias": (kv,)}


def chatglm_model() -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """(metadata, tensor shapes in ggml order) of a valid two-block chatglm GGUF with a SentencePiece vocab."""
    v = len(SPM_TOKENS)
    kv = {"general.architecture": "chatglm", "general.name": "hostile", "chatglm.context_length": 64,
          "chatglm.embedding_length": E, "chatglm.feed_forward_length": FF, "chatglm.block_count": L,
          "chatglm.attention.head_count": H, "chatglm.attention.head_count_kv": HKV,
          "chatglm.attention.layer_norm_rms_epsilon": 1e-5, "chatglm.rope.dimension_count": HD // 2,
          "chatglm.rope.freq_base": 10000.0, "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default",
          "tokenizer.ggml.tokens": list(SPM_TOKENS), "tokenizer.ggml.scores": [0.0] * v,
          "tokenizer.ggml.token_type": list(SPM_TYPES), "tokenizer.ggml.bos_token_id": 1,
          "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    shapes = {"token_embd.weight": (E, v), "output_norm.weight": (E,), "output.weight": (E, v)}
    for il in range(L):
        p = f"blk.{il}."
        shapes.update({f"{p}attn_norm.weight": (E,), **_attention(p, True), f"{p}attn_output.weight": (E, E),
                       f"{p}ffn_norm.weight": (E,), f"{p}ffn_up.weight": (E, 2 * FF), f"{p}ffn_down.weight": (FF, E)})
    return kv, shapes


def glm4moe_model() -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """A valid glm4moe GGUF: block 0 dense, block 1 with 4 experts (2 used) and a shared expert; BPE vocab."""
    v, a = len(BPE_TOKENS), "glm4moe"
    kv = {"general.architecture": a, f"{a}.context_length": 64, f"{a}.embedding_length": E,
          f"{a}.feed_forward_length": FF, f"{a}.block_count": L, f"{a}.attention.head_count": H,
          f"{a}.attention.head_count_kv": HKV, f"{a}.attention.key_length": HD, f"{a}.attention.value_length": HD,
          f"{a}.attention.layer_norm_rms_epsilon": 1e-5, f"{a}.rope.dimension_count": HD // 2,
          f"{a}.expert_count": N_EXPERT, f"{a}.expert_used_count": N_USED, f"{a}.expert_shared_count": 1,
          f"{a}.expert_feed_forward_length": FF_EXP, f"{a}.leading_dense_block_count": 1,
          "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "chatglm-bpe",
          "tokenizer.ggml.tokens": list(BPE_TOKENS),
          "tokenizer.ggml.token_type": list(BPE_TYPES), "tokenizer.ggml.merges": ["a b", "Ġ a"],
          "tokenizer.ggml.eos_token_id": 5}
    shapes = {"token_embd.weight": (E, v), "output_norm.weight": (E,), "output.weight": (E, v)}
    for il in range(L):
        p = f"blk.{il}."
        shapes.update({f"{p}attn_norm.weight": (E,), **_attention(p, False), f"{p}attn_output.weight": (HD * H, E),
                       f"{p}post_attention_norm.weight": (E,)})
        if il == 0:
            shapes.update({f"{p}ffn_gate.weight": (E, FF), f"{p}ffn_down.weight": (FF, E),
                           f"{p}ffn_up.weight": (E, FF)})
        else:
            shapes.update({f"{p}ffn_gate_inp.weight": (E, N_EXPERT), f"{p}exp_probs_b.bias": (N_EXPERT,),
                           f"{p}ffn_gate_exps.weight": (E, FF_EXP, N_EXPERT),
                           f"{p}ffn_down_exps.weight": (FF_EXP, E, N_EXPERT),
                           f"{p}ffn_up_exps.weight": (E, FF_EXP, N_EXPERT), f"{p}ffn_gate_shexp.weight": (E, FF_EXP),
                           f"{p}ffn_down_shexp.weight": (FF_EXP, E), f"{p}ffn_up_shexp.weight": (E, FF_EXP)})
    return kv, shapes


def glm4_model() -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """A valid glm4 (GLM-4-0414) GGUF: the chatglm base renamed, with GLM-4's extra post-norms."""
    kv, shapes = chatglm_model()
    kv = {k.replace("chatglm.", "glm4.", 1): v for k, v in kv.items()}
    kv["general.architecture"] = "glm4"
    for il in range(L):
        p = f"blk.{il}."
        shapes.update({f"{p}attn_output.weight": (HD * H, E), f"{p}post_attention_norm.weight": (E,),
                       f"{p}post_ffw_norm.weight": (E,)})
    return kv, shapes


def with_mtp(full: bool) -> Callable[[dict, dict], None]:
    """glm4moe with one NextN/MTP block after the trunk: its tensors all there (full) or left out (trunk only)."""
    def edit(kv: dict, shapes: dict) -> None:
        kv["glm4moe.block_count"], kv["glm4moe.nextn_predict_layers"] = L + 1, 1
        if full:
            p, v = f"blk.{L}.", len(BPE_TOKENS)
            shapes.update({n.replace(f"blk.{L - 1}.", p): s for n, s in list(shapes.items())
                           if n.startswith(f"blk.{L - 1}.")})
            shapes.update({f"{p}nextn.eh_proj.weight": (2 * E, E), f"{p}nextn.enorm.weight": (E,),
                           f"{p}nextn.hnorm.weight": (E,), f"{p}nextn.embed_tokens.weight": (E, v),
                           f"{p}nextn.shared_head_head.weight": (E, v), f"{p}nextn.shared_head_norm.weight": (E,)})
    return edit


def chatglm1_model() -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """Only the metadata of a chatglm1 file (our own engine) and its embedding: enough to reach the block check."""
    v, a = len(SPM_TOKENS), "chatglm1"
    kv = {"general.architecture": a, f"{a}.context_length": 64, f"{a}.embedding_length": E,
          f"{a}.feed_forward_length": FF, f"{a}.block_count": L, f"{a}.attention.head_count": H,
          f"{a}.attention.layer_norm_epsilon": 1e-5, f"{a}.rope.dimension_count": HD // 2,
          f"{a}.rope.freq_base": 10000.0, f"{a}.residual_scale": 7.5, "tokenizer.ggml.model": "llama",
          "tokenizer.ggml.tokens": list(SPM_TOKENS), "tokenizer.ggml.token_type": list(SPM_TYPES)}
    return kv, {"token_embd.weight": (E, v), "output_norm.weight": (E,), "output_norm.bias": (E,)}


def _vtype(value: Any) -> gguf.GGUFValueType:
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    if isinstance(value, float):
        return gguf.GGUFValueType.FLOAT32
    if value < 0:
        return gguf.GGUFValueType.INT32
    return gguf.GGUFValueType.UINT32 if value < 2**32 else gguf.GGUFValueType.UINT64


def write_gguf(path: Path, kv: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> Path:
    writer = gguf.GGUFWriter(str(path), kv["general.architecture"])
    for key, value in kv.items():
        if key == "general.architecture":
            continue
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            writer.add_key_value(key, value, _vtype(value))
    for name, shape in shapes.items():  # a shape (ggml order) for f32 zeros, or the array itself
        writer.add_tensor(name, shape if isinstance(shape, np.ndarray) else np.zeros(shape[::-1], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def crafted(tmp_path: Path, name: str, base: Callable, edit: Callable[[dict, dict], Any]) -> Path:
    kv, shapes = base()
    edit(kv, shapes)
    return write_gguf(tmp_path / f"{name}.gguf", kv, shapes)


def put(**changes: Any) -> Callable[[dict, dict], None]:
    """An edit setting metadata keys (``__`` stands for ``.``; a value of None removes the key)."""
    def edit(kv: dict, _shapes: dict) -> None:
        for key, value in changes.items():
            key = key.replace("__", ".")
            if value is None:
                kv.pop(key, None)
            else:
                kv[key] = value
    return edit


def shape(name: str, new: tuple[int, ...] | np.ndarray | None) -> Callable[[dict, dict], None]:
    def edit(_kv: dict, shapes: dict) -> None:
        if new is None:
            del shapes[name]
        else:
            shapes[name] = new
    return edit


def both(*edits: Callable[[dict, dict], None]) -> Callable[[dict, dict], None]:
    def edit(kv: dict, shapes: dict) -> None:
        for one in edits:
            one(kv, shapes)
    return edit


def vocab(fn: Callable[[list, list], None]) -> Callable[[dict, dict], None]:
    def edit(kv: dict, _shapes: dict) -> None:
        tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
        fn(tokens, types)
        if "tokenizer.ggml.scores" in kv:
            kv["tokenizer.ggml.scores"] = [0.0] * len(tokens)
    return edit


def drop_spm_bytes(tokens: list, types: list) -> None:
    keep = [i for i, t in enumerate(tokens) if not (t.startswith("<0x") and t != "<0x41>")]
    tokens[:], types[:] = [tokens[i] for i in keep], [types[i] for i in keep]


def resized(edit_tokens: Callable[[list, list], None]) -> Callable[[dict, dict], None]:
    """A vocab edit that also resizes the embedding and output to the new vocabulary (so only the vocab is bad)."""
    inner = vocab(edit_tokens)

    def edit(kv: dict, shapes: dict) -> None:
        inner(kv, shapes)
        n = len(kv["tokenizer.ggml.tokens"])
        shapes["token_embd.weight"] = shapes["output.weight"] = (E, n)
    return edit


def run_table(commands: list[list[str]], timeout: float = 120) -> list[Outcome]:
    """Each command through Typer's runner, all in one child process (see the module docstring)."""
    script = ("import json, sys; sys.path.insert(0, sys.argv[1]); from hostile import cli\n"
              "out = []\n"
              "for args in json.loads(sys.stdin.read()):\n"
              "    try:\n"
              "        r = cli(args)\n"
              "        out.append([r.code, r.out, r.err])\n"
              "    except BaseException as e:\n"
              "        out.append([-1, '', 'Traceback: ' + repr(e)])\n"
              "print(json.dumps(out))\n")
    env_path = str(ROOT)
    r = subprocess.run([sys.executable, "-c", script, str(ROOT / "tests")], input=json.dumps(commands),
                       capture_output=True, text=True, timeout=timeout,
                       env={**__import__("os").environ, "PYTHONPATH": env_path})
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    return [Outcome(*row) for row in json.loads(r.stdout.strip().splitlines()[-1])]


# -- the corpus ---------------------------------------------------------------------------------------------------
A = "chatglm"
M = "glm4moe"
CASES: dict[str, tuple[Callable, Callable, str]] = {
    # layer counts (GGML_ASSERT n_layer_all in 1..LLAMA_MAX_LAYERS, n_layer_nextn <= n_layer_all)
    "blocks-513": (chatglm_model, put(chatglm__block_count=513), "block_count must be a positive integer up to 512"),
    "blocks-1e9": (chatglm_model, put(chatglm__block_count=10**9), "block_count must be a positive integer up to 512"),
    "blocks-0": (chatglm_model, put(chatglm__block_count=0), "block_count must be a positive integer"),
    "blocks-string": (chatglm_model, put(chatglm__block_count="2"), "block_count must be a positive integer"),
    "nextn-equal": (chatglm_model, put(chatglm__nextn_predict_layers=L),
        "nextn_predict_layers must be an integer in 0..1"),
    "nextn-moe": (glm4moe_model, put(glm4moe__nextn_predict_layers=5),
        "nextn_predict_layers must be an integer in 0..1"),
    "blocks-missing": (chatglm_model, put(chatglm__block_count=None), "lacks chatglm.block_count"),
    # rope (GGML_ASSERT rope_scaling_type_train != UNSPECIFIED) and other floats
    "rope-type": (chatglm_model, put(chatglm__rope__scaling__type="banana"),
        "rope.scaling.type 'banana' is not one of"),
    "rope-dims": (chatglm_model, put(chatglm__rope__dimension_count=999), "rope.dimension_count 999 does not fit"),
    "rope-base-nan": (chatglm_model, put(chatglm__rope__freq_base=math.nan), "rope.freq_base must be a finite number"),
    "rope-factor-neg": (chatglm_model, put(chatglm__rope__scaling__factor=-2.0),
        "rope.scaling.factor must be a finite"),
    "eps-missing": (chatglm_model, put(chatglm__attention__layer_norm_rms_epsilon=None),
        "lacks chatglm.attention.layer_norm_rms_epsilon"),
    # heads and key/value lengths
    "heads-0": (chatglm_model, put(chatglm__attention__head_count=0), "head_count must be a positive integer"),
    "kv-heads-0": (chatglm_model, put(chatglm__attention__head_count_kv=0), "head_count_kv must be a positive integer"),
    "kv-heads-3": (chatglm_model, put(chatglm__attention__head_count_kv=3),
        "head_count 2 is not a multiple of head_count_kv 3"),
    "embd-indivisible": (chatglm_model, put(chatglm__embedding_length=15), "embedding_length 15 is not a multiple"),
    "key-length": (chatglm_model, put(chatglm__attention__key_length=7, chatglm__attention__value_length=7),
                   "key_length 7 x head_count 2 is not embedding_length 16"),
    "value-length": (glm4moe_model, put(glm4moe__attention__value_length=4),
        "value_length 4 differs from key_length 8"),
    "heads-array-length": (chatglm_model, put(chatglm__attention__head_count=[2, 2, 2]),
        "has 3 per-layer values for block_count 2"),
    "heads-array-differ": (chatglm_model, put(chatglm__attention__head_count=[2, 1]), "differs between layers"),
    "ff-array-zero": (chatglm_model, put(chatglm__feed_forward_length=[0, 0]), "must hold integers >= 1"),
    # experts (GGML_ASSERTs in load_hparams and glm4moe's load_arch_tensors; n_ff / n_expert_used)
    "experts-1025": (glm4moe_model, put(glm4moe__expert_count=1025), "expert_count must be an integer in 0..1024"),
    "experts-used-0": (glm4moe_model, put(glm4moe__expert_used_count=0),
        "needs expert_count and expert_used_count above 0"),
    "experts-used-9": (glm4moe_model, put(glm4moe__expert_used_count=9),
        "expert_used_count 9 must be in 1..expert_count (4)"),
    "experts-none": (glm4moe_model, put(glm4moe__expert_count=0), "needs expert_count and expert_used_count above 0"),
    "experts-groups": (glm4moe_model, put(glm4moe__expert_group_count=4),
        "expert_group_count 4 must be below expert_count 4"),
    "experts-groups-3": (glm4moe_model, put(glm4moe__expert_group_count=3, glm4moe__expert_group_used_count=1),
                         "expert groups (3, 1 used) must divide expert_count 4"),
    "experts-in-chatglm": (chatglm_model, put(chatglm__expert_count=4, chatglm__expert_used_count=2),
                           "has expert_count 4, but chatglm models have no experts"),
    "experts-used-no-experts": (chatglm_model, put(chatglm__expert_used_count=2),
        "has no experts but expert_used_count 2"),
    "experts-shared-missing": (glm4moe_model, put(glm4moe__expert_shared_count=None),
        "lacks glm4moe.expert_shared_count"),
    "experts-gating": (glm4moe_model, put(glm4moe__expert_gating_func=7),
        "expert_gating_func must be an integer in 0..4"),
    # tensors that disagree with the hyperparameters
    "shape-ffn-up": (chatglm_model, shape("blk.1.ffn_up.weight", (E, FF)),
        "tensor blk.1.ffn_up.weight has shape [16, 24], expected [16, 48]"),
    "shape-qkv": (chatglm_model, shape("blk.0.attn_qkv.weight", (E, 3 * E)),
        "tensor blk.0.attn_qkv.weight has shape [16, 48], expected [16, 32]"),
    "shape-output": (chatglm_model, shape("output.weight", (E, 7)), "tensor output.weight has shape [16, 7]"),
    "shape-experts": (glm4moe_model, shape("blk.1.ffn_gate_exps.weight", (E, FF_EXP, 3)),
        "blk.1.ffn_gate_exps.weight has shape [16, 8, 3], expected [16, 8, 4]"),
    "shape-shexp": (glm4moe_model, shape("blk.1.ffn_up_shexp.weight", (E, 9)),
        "blk.1.ffn_up_shexp.weight has shape [16, 9]"),
    "shape-moe-attn-out": (glm4moe_model, shape("blk.0.attn_output.weight", (E, 8)),
        "blk.0.attn_output.weight has shape [16, 8]"),
    "norm-f16": (chatglm_model, shape("blk.0.attn_norm.weight", np.zeros(E, np.float16)),
                 "tensor blk.0.attn_norm.weight is f16; llama.cpp adds and multiplies 1-D tensors (norms, biases)"),
    "bias-f16": (glm4moe_model, shape("blk.1.exp_probs_b.bias", np.zeros(N_EXPERT, np.float16)),
        "exp_probs_b.bias is f16"),
    "matrix-i32": (chatglm_model, shape("blk.0.ffn_down.weight", np.zeros((E, FF), np.int32)),
                   "tensor blk.0.ffn_down.weight has type I32, which ggml cannot use as a weight"),
    "glm4-post-norm": (glm4_model, shape("blk.1.post_ffw_norm.weight", None),
        "lacks tensor(s) blk.1.post_ffw_norm.weight"),
    "glm4-attn-out": (glm4_model, shape("blk.0.attn_output.weight", (E, E + 1)),
        "blk.0.attn_output.weight has shape [16, 17], expected [16, 16]"),
    "mtp-eh-proj": (glm4moe_model, both(with_mtp(True), shape("blk.2.nextn.eh_proj.weight", (E, E))),
        "tensor blk.2.nextn.eh_proj.weight has shape [16, 16], expected [32, 16]"),
    "mtp-router-missing": (glm4moe_model, both(with_mtp(True), shape("blk.2.ffn_gate_inp.weight", None)),
        "lacks tensor(s) blk.2.ffn_gate_inp.weight"),
    "missing-norm": (chatglm_model, shape("blk.1.attn_norm.weight", None), "lacks tensor(s) blk.1.attn_norm.weight"),
    "missing-router": (glm4moe_model, shape("blk.1.ffn_gate_inp.weight", None),
        "lacks tensor(s) blk.1.ffn_gate_inp.weight"),
    "extra-tensor": (chatglm_model, shape("blk.7.ffn_up.weight", (E, 2 * FF)),
        "has tensor blk.7.ffn_up.weight, which a chatglm model"),
    "embd-shape": (chatglm_model, shape("token_embd.weight", (E, 5)), "token_embd.weight has shape [16, 5]"),
    # vocabularies (duplicate texts abort; missing byte pieces and short BYTE texts throw std::out_of_range)
    "vocab-duplicate": (chatglm_model, resized(lambda t, y: (t.append("▁hi"), y.append(1))),
                        "vocabulary has token '▁hi' twice (ids 260 and 264)"),
    "vocab-empty-clash": (chatglm_model,
                          resized(lambda t, y: (t.__setitem__(263, ""), t.append("[EMPTY_263]"), y.append(1))),
                          "vocabulary has token '[EMPTY_263]' twice"),
    "vocab-bpe-duplicate": (glm4moe_model, resized(lambda t, y: (t.append("<sop>"), y.append(3))),
        "vocabulary has token '<sop>' twice"),
    "spm-no-bytes": (chatglm_model, resized(drop_spm_bytes), "SentencePiece vocabulary lacks byte piece(s) <0x00>"),
    "byte-type-short": (chatglm_model, vocab(lambda t, y: y.__setitem__(261, 6)),
        "token 261 'hi' is typed BYTE but is not of the form <0xXX>"),
    "bpe-no-merges": (glm4moe_model, put(tokenizer__ggml__merges=None), "no tokenizer.ggml.merges"),
    "vocab-model-none": (chatglm_model, put(tokenizer__ggml__model="none"),
        "tokenizer.ggml.model 'none' is not one of"),
    "vocab-model-missing": (chatglm_model, put(tokenizer__ggml__model=None), "tokenizer.ggml.model None is not one of"),
    "charsmap": (chatglm_model, put(tokenizer__ggml__precompiled_charsmap=[1, 2, 3]), "precompiled_charsmap"),
    "token-types-short": (chatglm_model, put(tokenizer__ggml__token_type=[1, 1]), "has 2 token types for 264 tokens"),
    "token-types-float": (chatglm_model, put(tokenizer__ggml__token_type=[1.0] * 264),
        "token_type must be a numeric array"),
    "scores-short": (chatglm_model, put(tokenizer__ggml__scores=[0.0] * 3), "has 3 token scores for 264 tokens"),
    "tokens-numbers": (chatglm_model, put(tokenizer__ggml__tokens=list(range(264))), "has no tokenizer"),
    "add-bos-no-id": (glm4moe_model, put(tokenizer__ggml__add_bos_token=True),
        "sets tokenizer.ggml.add_bos_token but names no tokenizer.ggml.bos_token_id"),
    "name-quirk": (glm4moe_model, put(general__name="GLM-Phi3-mix"),
        "general.name 'glm-phi3-mix' makes llama.cpp look up token(s) </s>, <unk>, <s>"),
    "eos-outside": (chatglm_model, put(tokenizer__ggml__eos_token_id=10**6),
        "eos_token_id = 1000000 is outside the vocabulary"),
    # our own engine's GGUF: a declared block count the file cannot hold
    "glm1-blocks-1e9": (chatglm1_model, put(chatglm1__block_count=10**9),
        "declares block_count 1000000000 but holds only 3 tensors"),
}
ISOLATED_ALONE = ("blocks-513", "experts-used-0", "vocab-duplicate", "spm-no-bytes")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    """The valid synthetic chatglm model (llama.cpp loads it: see test_valid_bases_load_in_llama_cpp)."""
    return crafted(tmp_path_factory.mktemp("hostile-gguf"), "tiny", chatglm_model, lambda kv, s: None)


def test_valid_bases_load_in_llama_cpp(tmp_path):
    """The synthetic bases pass validation and llama.cpp's own loader: the shapes above are the ones it creates."""
    from chatglm.runtime.loader import open_engine

    nothing = lambda kv, s: None  # noqa: E731
    for name, base, edit in (("chatglm", chatglm_model, nothing), ("glm4", glm4_model, nothing),
                             ("glm4moe", glm4moe_model, nothing), ("mtp", glm4moe_model, with_mtp(True)),
                             ("trunk-only", glm4moe_model, with_mtp(False))):
        path = crafted(tmp_path, name, base, edit)
        r = cli(["info", path])
        assert r.code == 0 and "not runnable" not in r.out, (name, r.text)
        with open_engine(path, n_ctx=256, n_threads=1) as engine:
            assert engine.info.n_vocab == len(BPE_TOKENS if "moe" in base.__name__ else SPM_TOKENS)


def test_corpus_refused_by_info_run_and_bench(tmp_path):
    """Every case through `info`, and through `run`/`bench` on every third (all three validate the same way)."""
    files = {name: crafted(tmp_path, name, base, edit) for name, (base, edit, _) in CASES.items()}
    commands, expect = [], []
    for i, (name, path) in enumerate(files.items()):
        commands.append(["info", str(path)])
        expect.append(name)
        if i % 3 == 0:
            commands.append(["run", str(path), "-p", "hi", "-n", "1"] if i % 2 else
                            ["bench", str(path), "-p", "4", "-n", "1", "-r", "1"])
            expect.append(name)
    sources = digest(files.values())
    outcomes = run_table(commands)
    for name, args, outcome in zip(expect, commands, outcomes):
        try:
            assert_refused(outcome, files[name], code=2, problem=CASES[name][2])
        except AssertionError as err:
            raise AssertionError(f"{name} ({args[0]}): {err}") from None
    assert digest(sources) == sources


@pytest.mark.parametrize("name", ISOLATED_ALONE)
def test_headline_cases_in_their_own_process(tmp_path, name):
    base, edit, problem = CASES[name]
    path = crafted(tmp_path, name, base, edit)
    sources = digest([path])
    outcome = cli(["run", path, "-p", "hi", "-n", "1"], isolated=True, timeout=120)
    assert_refused(outcome, path, code=2, problem=problem, sources=sources)


def test_validation_is_linear(tmp_path):
    """block_count at the layer limit with two blocks' tensors, and a table claiming a million tensors, are refused
    at once (the old check scanned every tensor for every block)."""
    path = crafted(tmp_path, "wide", chatglm_model, put(chatglm__block_count=512))
    start = time.perf_counter()
    assert_refused(cli(["info", path]), path, problem="lacks tensor(s) blk.2.attn_norm.weight")
    big = tmp_path / "million.gguf"
    with open(big, "wb") as fh:
        fh.write(b"GGUF" + struct.pack("<IQQ", 3, 10**6, 0))
        fh.truncate(40 * 10**6)  # sparse: big enough that the count fits the file
    assert_refused(cli(["info", big]), big, problem="1000000 tensors, more than any GLM model has")
    assert time.perf_counter() - start < 5


def test_huge_context_is_a_memory_error_not_a_double_free(tiny_gguf):
    """The CLI refuses --ctx past its range at the option; the library refuses a context that cannot fit from the
    memory estimate, before llama.cpp allocates (a child process: it used to be a double free)."""
    sources = digest([tiny_gguf])
    script = ("import sys, chatglm\n"
              "from chatglm.errors import InputError\n"
              "try:\n"
              "    chatglm.load(sys.argv[1], n_ctx=10**9, n_threads=1)\n"
              "except InputError as e:\n"
              "    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", script, str(tiny_gguf)], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert "refused:" in r.stdout and "a context of 1000000000 tokens needs about" in r.stdout, r.stdout
    assert digest([tiny_gguf]) == sources
    outcome = cli(["run", tiny_gguf, "-p", "hi", "-n", "1", "--ctx", str(10**9)])
    assert_refused(outcome, "--ctx", code=2, problem="must be between 1 and 16777216, got 1000000000")


@pytest.mark.parametrize("ctx,problem", [(0, "counts must be positive"), (-5, "counts must be positive"),
                                         (3000000000, "context size 3000000000 is past llama.cpp's limit")])
def test_context_sizes_out_of_range(tiny_gguf, ctx, problem):
    import chatglm
    from chatglm.errors import InputError

    with pytest.raises(InputError, match=problem):
        chatglm.load(tiny_gguf, n_ctx=ctx, n_threads=1)


def test_failed_context_frees_the_model_once(tiny_gguf):
    """llama.cpp refusing a context (a quantized V cache without flash attention) used to free the model twice:
    once in __init__, again in __del__ (SIGSEGV). The child must exit normally after the error."""
    script = ("import gc, sys\n"
              "from chatglm.gguf_file import read_header\n"
              "from chatglm.runtime.loader import describe\n"
              "from chatglm.runtime.llama_engine import LlamaEngine\n"
              "h = read_header(sys.argv[1])\n"
              "try:\n"
              "    LlamaEngine(h, describe(h), n_ctx=256, n_threads=1, kv_type='q8_0', flash_attn=False)\n"
              "except Exception as e:\n"
              "    print('refused:', e)\n"
              "gc.collect()\n"
              "print('alive')\n")
    r = subprocess.run([sys.executable, "-c", script, str(tiny_gguf)], capture_output=True, text=True, timeout=120,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, (r.returncode, r.stderr[-1000:])
    assert "refused: llama.cpp could not create a context" in r.stdout and r.stdout.strip().endswith("alive")


def _other_gguf(path: Path, arch: str, **kv: Any) -> Path:
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        writer.add_key_value(key.replace("__", "."), value, _vtype(value))
    writer.add_tensor("blk.0.attn_q.weight.lora_a", np.zeros((4, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,kv,shown,refusal", [
    ("llama", {}, "architecture   llama", "GGUF architecture 'llama' is not a GLM model this tool runs"),
    ("chatglm", {"general__type": "adapter", "adapter__type": "lora", "adapter__lora__alpha": 8.0},
     "architecture   chatglm (adapter)", "this is a lora adapter for 'chatglm' models, not a model"),
])
def test_info_reports_other_files_as_they_are(tmp_path, arch, kv, shown, refusal):
    path = _other_gguf(tmp_path / f"{arch}.gguf", arch, **kv)
    r = cli(["info", path])
    assert r.code == 0, r.text
    assert shown in r.out and "not runnable" in r.out and refusal in r.out and "chatglm2" not in r.out, r.out
    assert "parameters     64" in r.out
    data = json.loads(cli(["info", path, "--json"]).out)
    assert data["architecture"] == arch and data["runnable"] is False and data["chat_format"] is None
    for command in (["run", path, "-p", "hi", "-n", "1"], ["bench", path, "-p", "4", "-n", "1", "-r", "1"]):
        assert_refused(cli(command), path, code=2, problem=refusal, sources=digest([path]))


def test_info_counts_parameters(tiny_gguf):
    from chatglm.gguf_file import read_header
    from chatglm.runtime.memory import params_text

    header = read_header(tiny_gguf)
    n = sum(int(np.prod(t.shape)) for t in header.tensors.values())
    r = cli(["info", tiny_gguf])
    assert r.code == 0 and "?B" not in r.out and f"parameters     {params_text(n)} " in r.out, r.out
    assert [params_text(v) for v in (6_243_584_000, 3_800_000, 12_345, 999, 355_000_000_000)] == \
        ["6.2B", "3.8M", "12.3K", "999", "355B"]


def test_f32_kv_turns_flash_attention_off(tiny_gguf, caplog):
    import logging

    from chatglm.runtime.loader import open_engine

    r = cli(["info", tiny_gguf, "--kv-type", "f32"])
    assert "attention      f32 KV cache: flash attention off" in r.out, r.out
    with caplog.at_level(logging.INFO, logger="chatglm.runtime.loader"):
        with open_engine(tiny_gguf, n_ctx=256, n_threads=1, kv_type="f32") as engine:
            assert engine.info.n_ctx >= 256
    assert "f32 KV cache: flash attention off" in caplog.text
    assert_refused(cli(["run", tiny_gguf, "-p", "hi", "-n", "1", "--kv-type", "f32", "--flash-attn"]),
                   "f32 KV cache", problem="needs flash attention off")
    assert_refused(cli(["run", tiny_gguf, "-p", "hi", "-n", "1", "--kv-type", "q8_0", "--no-flash-attn"]),
                   "q8_0", problem="needs flash attention")


def test_unknown_kv_type_everywhere(tiny_gguf):
    import chatglm
    from chatglm.errors import InputError

    for command in (["info", tiny_gguf], ["run", tiny_gguf, "-p", "hi", "-n", "1", "-v"],
                    ["bench", tiny_gguf, "-p", "4", "-n", "1", "-r", "1"]):
        assert_refused(cli([*command, "--kv-type", "banana"]), "--kv-type", problem="'banana' is not one of 'f16'")
    for bad in ("banana", None, 3):
        with pytest.raises(InputError, match="unknown KV cache type"):
            chatglm.load(tiny_gguf, kv_type=bad)

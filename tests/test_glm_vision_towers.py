"""The one GLM vision-tower writer (``chatglm/families/glm4v/vision.py``) against a table of what each family's
projector is: its libmtmd type, its clip keys, the tensors of a block and outside the blocks, the merger's width;
and the refusals and layouts every family shares (the depth check, the preprocessor's sizes, pre-4.52 ``visual.*``
names) beside the one that differs (GLM-4.1V alone takes CLIP's normalization without preprocessor_config.json).

Tiny checkpoints from the devtools builders (transformers' classes, published layouts); plans and metadata only, no
file is written and no native library runs."""

from __future__ import annotations

import json
import shutil

import pytest

from chatglm.convert.checkpoint import Checkpoint
from chatglm.convert.family import detect
from chatglm.convert.mmproj import plan_projector
from chatglm.errors import InputError

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
BLOCK = {"ln1.weight", "ln2.weight", "attn_qkv.weight", "attn_out.weight", "ffn_gate.weight", "ffn_up.weight",
         "ffn_down.weight"}
STEM_HEAD = ["v.patch_embd.weight", "v.patch_embd.weight.1", "v.patch_embd.bias", "v.post_ln.weight",
             "mm.patch_merger.weight", "mm.patch_merger.bias", "mm.model.fc.weight", "mm.post_norm.weight",
             "mm.post_norm.bias", "mm.gate.weight", "mm.up.weight", "mm.down.weight"]
POSITIONS = ["v.norm_embd.weight", "v.position_embd.weight"]  # after v.patch_embd.bias
OCR_BLOCK = {"attn_qkv.bias", "attn_out.bias", "attn_q_norm.weight", "attn_k_norm.weight", "ffn_gate.bias",
             "ffn_up.bias", "ffn_down.bias"}
SHARED_KEYS = {"clip.has_vision_encoder": True, "clip.use_silu": True, "clip.vision.image_size": 112,
               "clip.vision.patch_size": 14, "clip.vision.embedding_length": 32, "clip.vision.projection_dim": 64,
               "clip.vision.attention.head_count": 2, "clip.vision.attention.layer_norm_epsilon": 1e-5,
               "clip.vision.spatial_merge_size": 2}
# family -> (projector type, its own clip keys, block 0's tensors beyond BLOCK, learned positions, merger width)
TOWERS = {
    "glm4.1v": ("glm4v", {"clip.vision.feed_forward_length": 64, "clip.vision.block_count": 2}, set(), True, 96),
    "glm4.5v": ("glm4v", {"clip.vision.feed_forward_length": 64, "clip.vision.block_count": 2}, set(), True, 48),
    "glm4.5v-bias": ("glm4v", {"clip.vision.feed_forward_length": 64, "clip.vision.block_count": 2},
                     {"attn_qkv.bias"}, True, 48),
    "glm-ocr": ("glm4v", {"clip.vision.feed_forward_length": 48, "clip.vision.block_count": 2}, OCR_BLOCK, False,
                64 * 3),
    "glm5.3-flash": ("glm5v", {"clip.vision.feed_forward_length": 48, "clip.vision.block_count": 1,
                               "clip.vision.swiglu_clamp": 2.0, "clip.vision.image_min_pixels": 16 * 28 * 28,
                               "clip.vision.image_max_pixels": 1024 * 28 * 28}, OCR_BLOCK, False, 48),
}
FAMILIES = ("glm4.1v", "glm4.5v", "glm-ocr", "glm5.3-flash")


class Keys:
    """A GGUF writer's metadata calls, recorded."""

    def __init__(self):
        self.kv = {}

    def add_bool(self, key, value):
        self.kv[key] = value

    add_uint32 = add_float32 = add_array = add_bool


def build(name: str, folder):
    from chatglm.devtools import glm4v, glm5_next, glm_vision

    if name == "glm4.1v":
        tok = glm4v.tiny_tokenizer()
        return glm4v.save_glm4v_checkpoint(glm4v.tiny_glm4v(tok, seed=0), tok, folder)
    tok = glm_vision.vision_tokenizer()
    if name == "glm4.5v-bias":
        return glm_vision.save_vision_checkpoint(glm_vision.tiny_glm45v(tok, attention_bias=True), folder, tok)
    builders = {"glm4.5v": glm_vision.build_glm45v_checkpoint, "glm-ocr": glm_vision.build_glm_ocr_checkpoint,
                "glm5.3-flash": glm5_next.build_vision_checkpoint}
    return builders[name](folder, tok)[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {name: build(name, root / name) for name in TOWERS}


def projector_of(folder):
    with Checkpoint(folder) as ckpt:
        projector = detect(ckpt).projector()
        return projector, plan_projector(projector)


def copy_edited(folder, dest, name: str, edit):
    shutil.copytree(folder, dest)
    path = dest / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return dest


@pytest.mark.parametrize("name", list(TOWERS))
def test_each_family_projector_is_its_table_row(folders, name):
    kind, keys, extra, positions, merger_ff = TOWERS[name]
    projector, plan = projector_of(folders[name])
    assert projector.projector_type == kind
    w = Keys()
    projector.write_metadata(w)
    mean = w.kv.pop("clip.vision.image_mean")
    assert list(w.kv.pop("clip.vision.image_std")) == pytest.approx([0.26862954, 0.26130258, 0.27577711])
    assert list(mean) == pytest.approx(CLIP_MEAN)
    assert w.kv == pytest.approx({**SHARED_KEYS, **keys})
    blocks = {t.name for t in plan if t.name.startswith("v.blk.")}
    assert {n[len("v.blk.0."):] for n in blocks if n.startswith("v.blk.0.")} == BLOCK | extra
    assert len(blocks) == len(BLOCK | extra) * keys["clip.vision.block_count"]
    outside = [t.name for t in plan if not t.name.startswith("v.blk.")]
    assert outside == STEM_HEAD[:3] + POSITIONS * positions + STEM_HEAD[3:]
    shapes = {t.name: t.shape for t in plan}
    assert shapes["mm.gate.weight"] == (merger_ff, 64) and shapes["mm.down.weight"] == (64, merger_ff)


@pytest.mark.parametrize("name", FAMILIES)
def test_without_preprocessor_config_only_glm41v_takes_clip_defaults(folders, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(folders[name], folder)
    (folder / "preprocessor_config.json").unlink()
    if name != "glm4.1v":
        with pytest.raises(InputError, match=r"preprocessor_config.json not found \(a vision checkpoint ships it\)"):
            projector_of(folder)
        return
    projector, _ = projector_of(folder)
    assert projector.mean == pytest.approx(CLIP_MEAN) and projector.std[0] == pytest.approx(0.26862954)


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("key", ["patch_size", "merge_size"])
def test_preprocessor_sizes_must_be_the_towers(folders, tmp_path, name, key):
    folder = copy_edited(folders[name], tmp_path / name, "preprocessor_config.json", lambda c: c.update({key: 7}))
    expected = {"patch_size": 14, "merge_size": 2}[key]
    with pytest.raises(InputError) as err:
        projector_of(folder)
    assert f"'{key}' is 7 but config.json's vision_config says {expected}" in str(err.value)
    assert str(err.value.path).endswith("preprocessor_config.json") and "\n" not in str(err.value)


@pytest.mark.parametrize("name", FAMILIES)
def test_a_depth_beyond_the_blocks_held_is_refused(folders, tmp_path, name):
    depth = TOWERS[name][1]["clip.vision.block_count"]
    folder = copy_edited(folders[name], tmp_path / name, "config.json",
                         lambda c: c["vision_config"].update(depth=depth + 1))
    with pytest.raises(InputError) as err:
        projector_of(folder)
    assert f"'vision_config.depth' is {depth + 1} but the checkpoint holds {depth} layers" in str(err.value)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_pre_4_52_tower_names_give_the_same_plan(folders, tmp_path, name):
    """transformers before 4.52 saved the tower as ``visual.*``: every family reads it there too."""
    from safetensors.numpy import load_file, save_file

    folder = tmp_path / name
    shutil.copytree(folders[name], folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = {}
    for shard in folders[name].glob("*.safetensors"):
        state.update({k.replace("model.visual.", "visual."): v for k, v in load_file(shard).items()})
    save_file(state, folder / "model.safetensors")
    _, plan = projector_of(folder)
    _, published = projector_of(folders[name])
    assert [(t.name, t.shape) for t in plan] == [(t.name, t.shape) for t in published]
    assert all(s.startswith("visual.") for t in plan for s in t.sources)


@pytest.mark.parametrize("name", FAMILIES)
def test_attention_bias_left_out_takes_the_familys_default(folders, tmp_path, name):
    """transformers' default: biases in GLM-OCR's and GLM-5.3-Flash's towers, none in GLM-4.1V's and GLM-4.5V's (the
    tiny checkpoints were saved with those defaults, so the plan is the published one)."""
    folder = copy_edited(folders[name], tmp_path / name, "config.json",
                         lambda c: c["vision_config"].pop("attention_bias"))
    _, plan = projector_of(folder)
    _, published = projector_of(folders[name])
    assert [t.name for t in plan] == [t.name for t in published]
    assert ("v.blk.0.attn_out.bias" in {t.name for t in plan}) == (name in ("glm-ocr", "glm5.3-flash"))


class Refused(Exception):
    pass


def header_of(kv: dict, shapes: dict):
    """A projector header holding these keys and tensors (numpy-order ``shapes``, stored in ggml order)."""
    from pathlib import Path

    from chatglm.gguf_file import GGUFHeader, TensorEntry

    tensors = {n: TensorEntry(n, tuple(s)[::-1], 0, 0, 0) for n, s in shapes.items()}
    return GGUFHeader(Path("mmproj-x.gguf"), 3, dict(kv), tensors, 0, 0)


@pytest.mark.parametrize("name", list(TOWERS))
def test_the_writers_output_passes_the_runtime_check_and_any_one_shape_off_fails(folders, name):
    """One table (``glm4v/tower.py``) for the writer and the runtime: the plan passes the check of its projector
    type's family; each tensor in turn one wider fails it, in one line naming that tensor."""
    from chatglm import families

    projector, plan = projector_of(folders[name])
    w = Keys()
    projector.write_metadata(w)
    owner = families.part(families.projector_owner(projector.projector_type), "chat")
    shapes = {t.name: t.shape for t in plan}
    owner.check_projector(header_of(w.kv, shapes), Refused)
    for victim, shape in shapes.items():
        wider = {**shapes, victim: (*shape[:-1], shape[-1] + 1)}
        with pytest.raises(Refused) as err:
            owner.check_projector(header_of(w.kv, wider), Refused)
        assert str(err.value) == f"tensor {victim} has shape {list(wider[victim])[::-1]}, expected {list(shape)[::-1]}"
    dropped = {n: s for n, s in shapes.items() if n != "v.blk.0.ffn_down.weight"}
    with pytest.raises(Refused, match=r"^lacks tensor v.blk.0.ffn_down.weight$"):
        owner.check_projector(header_of(w.kv, dropped), Refused)

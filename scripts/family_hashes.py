"""Convert every family's tiny test checkpoint and print the sha256 of each GGUF (a refactoring must not change one).

    PYTHONPATH=. python3 scripts/family_hashes.py [--types f32,q4_k_m] [--keep DIR]

Checkpoints come from ``chatglm.devtools`` (the builders the test fixtures use, same seeds), plus the bundled demo
model. Run it before and after a change: every line must be the same.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
import tempfile
from pathlib import Path

log = logging.getLogger("family_hashes")


def build_checkpoints(root: Path) -> dict[str, Path]:
    """fixture name -> checkpoint folder, built in ``root``."""
    from chatglm.demo import demo_dir
    from chatglm.devtools.checkpoints import (save_chatglm_checkpoint, sp_vocab_size, tiny_glm_model,
                                              train_sentencepiece)
    from chatglm.devtools.corpus import bilingual_corpus
    from chatglm.devtools.glm1 import tiny_glm1_checkpoint, train_ice_tokenizer
    from chatglm.devtools import glm4v, glm5_next
    from chatglm.devtools.glm4 import LAYOUTS, build_checkpoint, train_glm4_bpe
    from chatglm.devtools.glm_moe_dsa import build_dsa_checkpoint
    from chatglm.devtools.glm4_moe_lite import build_lite_checkpoint
    from chatglm.devtools.glm_vision import build_glm45v_checkpoint, build_glm_ocr_checkpoint, vision_tokenizer

    out: dict[str, Path] = {"demo": demo_dir()}
    sp = train_sentencepiece(root / "tokenizer.model", bilingual_corpus())
    n_vocab = sp_vocab_size(sp) + 16
    for seed, generation in enumerate(("chatglm3", "chatglm2")):  # conftest's glm3 (seed 0) and glm2 (seed 1)
        model = tiny_glm_model(seed=seed, vocab_size=n_vocab)
        out[generation] = save_chatglm_checkpoint(model, root / generation, sp, family=generation)
    model = tiny_glm_model(seed=6, vocab_size=n_vocab, max_position_embeddings=4096, rope_linear=4.0,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    out["chatglm2-32k"] = save_chatglm_checkpoint(model, root / "chatglm2-32k", sp, family="chatglm2")
    model = tiny_glm_model(seed=5, vocab_size=n_vocab, max_position_embeddings=8192, rope_theta=10000.0 * 50,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    out["chatglm3-32k"] = save_chatglm_checkpoint(model, root / "chatglm3-32k", sp, family="chatglm3")
    ice = train_ice_tokenizer(root / "ice_text.model")
    out["chatglm1"] = tiny_glm1_checkpoint(root / "chatglm1", ice, seed=0)[0]
    bpe = train_glm4_bpe()
    for seed, layout in enumerate(LAYOUTS):
        theta = 50000.0 if layout == "glm4" else 10000.0
        out[layout] = build_checkpoint(layout, root / layout, bpe, seed=seed, rope_theta=theta)[1]
    out["glm5"] = build_dsa_checkpoint(root / "glm5", bpe, seed=3)[1]
    out["glm4.7-flash"] = build_lite_checkpoint(root / "glm4.7-flash", bpe, seed=3, rope_theta=20000.0)[1]
    model = glm5_next.tiny_model(bpe.get_vocab_size() + 7)
    out["glm5-next"] = glm5_next.save_checkpoint(model, root / "glm5-next", bpe)
    tok = glm4v.tiny_tokenizer()
    out["glm4v"] = glm4v.save_glm4v_checkpoint(glm4v.tiny_glm4v(tok, seed=3), tok, root / "glm4v")
    vision_bpe = vision_tokenizer()
    out["glm4.5v"] = build_glm45v_checkpoint(root / "glm4.5v", vision_bpe, seed=1)[1]
    out["glm-ocr"] = build_glm_ocr_checkpoint(root / "glm-ocr", vision_bpe, seed=1)[1]
    out["glm5v"] = glm5_next.build_vision_checkpoint(root / "glm5v", vision_bpe, seed=1)[1]
    return out


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="f32,q4_k_m", help="comma-separated output types")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from chatglm.convert.pipeline import convert

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        for name, folder in build_checkpoints(root).items():
            for qtype in args.types.split(","):
                result = convert(folder, root / f"{name}-{qtype}.gguf", qtype, threads=1)
                sys.stdout.write(f"{sha256(result.path)}  {name:<13} {qtype:<7} {result.family}/{result.arch}\n")
                if result.mmproj is not None:
                    sys.stdout.write(f"{sha256(result.mmproj)}  {name:<13} {qtype:<7} mmproj (f16)\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

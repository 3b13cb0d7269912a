#!/usr/bin/env python
"""Image prompts through our libmtmd path against llama.cpp's own (llama-cpp-python's mtmd bindings), in one run.

A tiny GLM-4.1V checkpoint (transformers' classes, random weights; ``--vision-hidden/--vision-depth/--text-hidden``
scale it up) is converted, loaded once, and the same prompt with one image is evaluated from an empty cache by

- ours: ``MediaContext.prefill`` (the chat format's ids, libmtmd's chunk in place of the placeholder), and
- llama.cpp's: ``mtmd_tokenize`` of the prompt text with libmtmd's marker, then ``mtmd_helper_eval_chunks``,

on the same llama context at the same thread count; and the image alone is encoded by each (``embeddings`` against a
bare ``mtmd_encode_chunk``). The table gives medians and our time relative to llama.cpp's.

    python benchmarks/vision.py                       # tiny model, 2 threads, 112x112 and 336x336 images
    python benchmarks/vision.py --vision-hidden 512 --vision-depth 8 -r 5
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path


def median_times(a, b, reps: int) -> tuple[float, float]:
    """Median seconds of ``a`` and of ``b``, run alternately (a busy machine slows both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(reps):
        for fn, out in ((a, times[0]), (b, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-t", "--threads", type=int, default=2)
    parser.add_argument("-r", "--reps", type=int, default=5)
    parser.add_argument("--vision-hidden", type=int, default=32)
    parser.add_argument("--vision-depth", type=int, default=2)
    parser.add_argument("--text-hidden", type=int, default=64)
    parser.add_argument("--sizes", default="112x112,336x336")
    args = parser.parse_args(argv)

    import chatglm
    from chatglm.convert.pipeline import convert
    from chatglm.devtools.glm4v import png_bytes, save_glm4v_checkpoint, test_image, tiny_glm4v, tiny_tokenizer
    from chatglm.runtime.llama_native import mtmd_lib
    from chatglm.runtime.media import load_media
    from chatglm.runtime.messages import Message

    with tempfile.TemporaryDirectory() as tmp:
        tok = tiny_tokenizer()
        heads = max(1, args.vision_hidden // 64)
        model = tiny_glm4v(tok, text={"hidden_size": args.text_hidden, "intermediate_size": 2 * args.text_hidden},
                           vision={"hidden_size": args.vision_hidden, "depth": args.vision_depth, "num_heads": heads,
                                   "intermediate_size": 3 * args.vision_hidden})
        folder = save_glm4v_checkpoint(model, tok, Path(tmp) / "ckpt", shard_bytes=1 << 30)
        result = convert(folder, Path(tmp) / "glm4v.gguf", "f16")
        m = chatglm.load(result.path, n_threads=args.threads)
        mt, ctx, engine = mtmd_lib(), m.media._ctx, m.engine
        rows = []
        for size in args.sizes.split(","):
            w, h = (int(x) for x in size.split("x"))
            media = load_media(png_bytes(test_image(w, h)), "image")
            ids = m.prompt_ids([Message("user", "Describe the picture.", media=(media,))])
            # llama.cpp's path: the rendered template text, the image tokens replaced by libmtmd's marker
            marker = m.media._marker.decode()
            rendered = "".join(marker if t == m.media.placeholder_id else _piece(engine, t) for t in ids)
            rendered = rendered.replace(f"<|begin_of_image|>{marker}<|end_of_image|>", marker)

            def ours():
                engine.reset()
                m.media.prefill(ids, [media])

            def theirs():
                engine.reset()
                buf = (ctypes.c_uint8 * len(media.data)).from_buffer_copy(media.data)
                bitmap = mt.mtmd_helper_bitmap_init_from_buf(ctx, buf, len(media.data), False)
                chunks = mt.mtmd_input_chunks_init()
                data = rendered.encode()
                inp = mt.mtmd_input_text(data, len(data), False, True)
                mt.mtmd_tokenize(ctx, chunks, ctypes.byref(inp), (mt.mtmd_bitmap_p_ctypes * 1)(bitmap), 1)
                new_past = ctypes.c_int32(0)
                rc = mt.mtmd_helper_eval_chunks(ctx, engine.native_context, chunks, 0, 0, engine.n_batch, True,
                                                ctypes.byref(new_past))
                mt.mtmd_input_chunks_free(chunks)
                mt.mtmd_bitmap_free(bitmap)
                if rc:
                    raise RuntimeError(f"mtmd_helper_eval_chunks failed ({rc})")

            def encode_ours():
                m.media.embeddings(media)

            def encode_theirs():
                chunks, found = m.media._tokenize(media)  # (chunks, the indices of the image's chunks)
                for i in found:
                    mt.mtmd_encode_chunk(ctx, mt.mtmd_input_chunks_get(chunks, i))
                mt.mtmd_input_chunks_free(chunks)

            ours(), theirs()  # warm up
            rows.append((size, m.media.n_tokens(media)[0], *median_times(encode_ours, encode_theirs, args.reps),
                         *median_times(ours, theirs, args.reps)))
        m.close()
    print(f"glm4v vision hidden {args.vision_hidden} x {args.vision_depth} blocks, text hidden {args.text_hidden}, "
          f"{args.threads} threads, median of {args.reps}")
    print(f"{'image':>9} {'tokens':>6} {'encode ours':>12} {'llama.cpp':>10} {'prompt ours':>12} {'llama.cpp':>10} "
          f"{'ours/llama.cpp':>14}")
    for size, n, eo, et, po, pt in rows:
        print(f"{size:>9} {n:>6} {eo * 1e3:>10.2f}ms {et * 1e3:>8.2f}ms {po * 1e3:>10.2f}ms {pt * 1e3:>8.2f}ms "
              f"{po / pt:>14.3f}")
    return 0


def _piece(engine, token: int) -> str:
    """A token's text as the tokenizer would read it back (special tokens by their text)."""
    from chatglm.runtime.llama_native import lib

    return lib().llama_vocab_get_text(engine._vocab, token).decode("utf-8", errors="replace") \
        if engine.token_bytes(token) == b"" else engine.token_bytes(token).decode("utf-8", errors="replace")


if __name__ == "__main__":
    sys.exit(main())

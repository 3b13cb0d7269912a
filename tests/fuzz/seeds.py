"""Seed inputs for the fuzz targets: tiny checkpoint folders and files in the published layouts, built by code.

Everything is generated (no stored binaries) and small, so a fuzzer spends its time in the parsers rather than in
copying bytes: SentencePiece and BPE vocabularies of a few hundred tokens, two-layer models of width 32.

``build(root)`` writes every seed under ``root`` once (a ``.complete`` marker holding a hash of this file says it is
done, and by which recipe) and returns a :class:`Seeds`; later calls with the same folder reuse it, so atheris
children started by benchmarks/fuzz.py share one copy (``CHATGLM_FUZZ_SEEDS`` names it).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

SEEDS_ENV = "CHATGLM_FUZZ_SEEDS"

# English-only training text: few distinct characters keep the vocabularies (and the seeds) small.
TEXT = [
    "hello world, this is a tiny corpus for a tiny tokenizer.",
    "the quick brown fox jumps over the lazy dog 0123456789.",
    "what is the weather like today? it is sunny and warm!",
    "print('hello') # code, too: x = [1, 2, 3]; y = {\"a\": 4}",
] * 8
SMALL = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2,
         "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 128}
FOLDERS = ("glm3", "glm4", "glm4-hf", "glm45", "glm1")  # SPM, tiktoken, tokenizer.json, MoE, ChatGLM-6B


@dataclass(frozen=True)
class Seeds:
    root: Path

    def folder(self, name: str) -> Path:
        return self.root / name

    def file(self, name: str) -> bytes:
        return (self.root / name).read_bytes()


def stamp() -> str:
    """A hash of this file: seeds made by another version of the recipe are rebuilt."""
    return hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]


def default_root() -> Path:
    given = os.environ.get(SEEDS_ENV)
    if given:
        return Path(given)
    base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    return Path(base) / f"chatglm-fuzz-seeds-{stamp()}-{os.getuid()}"


def build(root: Path | None = None) -> Seeds:
    root = Path(root or default_root())
    marker = root / ".complete"
    if marker.is_file() and marker.read_text() == stamp():
        return Seeds(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    _checkpoints(root)
    _files(root)
    marker.write_text(stamp())
    log.info("fuzz seeds written to %s", root)
    return Seeds(root)


# ------------------------------------------------------------------------------------------------ checkpoints


def _checkpoints(root: Path) -> None:
    from chatglm.devtools import glm4
    from chatglm.devtools.checkpoints import save_chatglm_checkpoint, sp_vocab_size, tiny_glm_model, train_sentencepiece

    sp = train_sentencepiece(root / "sp.model", TEXT, vocab_size=320)
    model = tiny_glm_model(vocab_size=sp_vocab_size(sp) + 12, **SMALL)
    save_chatglm_checkpoint(model, root / "glm3", sp, family="chatglm3")
    _adapter(root / "glm3-lora", root / "glm3")
    tok = glm4.train_glm4_bpe(TEXT, vocab_size=300)
    glm4.build_checkpoint("glm4", root / "glm4", tok, **SMALL)
    glm4.build_checkpoint("glm4-hf", root / "glm4-hf", tok, **SMALL)
    glm4.build_checkpoint("glm45", root / "glm45", tok, **{**SMALL, "num_hidden_layers": 3})
    _glm1(root)


def _adapter(out: Path, base: Path) -> None:
    """A PEFT LoRA adapter for ``base`` (rank 2 on two kinds of matrix in every layer), with a regex target list."""
    import numpy as np
    from safetensors.numpy import save_file

    from chatglm.convert.checkpoint import Checkpoint

    rng = np.random.default_rng(0)
    tensors = {}
    with Checkpoint(base) as ckpt:
        for name in ckpt.names():
            if name.endswith(("query_key_value.weight", "dense_4h_to_h.weight")):
                n_out, n_in = ckpt.info(name).shape
                module = "base_model.model." + name.removesuffix(".weight")
                tensors[f"{module}.lora_A.weight"] = rng.normal(0, 0.2, (2, n_in)).astype(np.float32)
                tensors[f"{module}.lora_B.weight"] = rng.normal(0, 0.2, (n_out, 2)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "bias": "none",
           "target_modules": ".*(query_key_value|dense_4h_to_h)", "fan_in_fan_out": False,
           "base_model_name_or_path": "THUDM/chatglm3-6b", "use_rslora": False,
           "alpha_pattern": {"encoder.layers.1.mlp.dense_4h_to_h": 3}, "rank_pattern": {}}
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2))


def _glm1(root: Path) -> None:
    from chatglm.devtools.glm1 import tiny_glm1_checkpoint, train_ice_tokenizer

    ice = train_ice_tokenizer(root / "ice.model", TEXT, vocab_size=320)
    tiny_glm1_checkpoint(root / "glm1", ice, hidden_size=32, inner_hidden_size=64, num_layers=2)


# ------------------------------------------------------------------------------------------------ single files


def _files(root: Path) -> None:
    from chatglm.convert.pipeline import convert

    for name in ("glm3", "glm4-hf", "glm45", "glm1"):
        convert(root / name, root / f"{name}.gguf", "f16")
    (root / "torch.bin").write_bytes(torch_zip())
    (root / "data.pkl").write_bytes(pickle_of(torch_zip()))
    (root / "x.safetensors").write_bytes(safetensors_file())
    (root / "header.gguf").write_bytes(small_gguf())
    _imatrices(root, model_shapes(root / "glm3.gguf"))
    _chat(root)
    for i, body in enumerate(chat_bodies()):
        (root / f"request-{i}.json").write_bytes(body)


def torch_zip() -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save({"w": torch.arange(8, dtype=torch.float32), "h": torch.ones(2, 2, dtype=torch.float16)}, buf)
    return buf.getvalue()


def pickle_of(archive: bytes) -> bytes:
    with zipfile.ZipFile(io.BytesIO(archive)) as zf:
        return zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))


def safetensors_file() -> bytes:
    header = json.dumps({"a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]},
                         "b": {"dtype": "BF16", "shape": [1], "data_offsets": [12, 14]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(range(14))


def small_gguf() -> bytes:
    import gguf as g
    import numpy as np

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seed.gguf"
        w = g.GGUFWriter(path, "chatglm")
        w.add_block_count(1)
        w.add_token_list(["a", "b", "c"])
        w.add_array("x.ints", [1, 2, 3])
        w.add_tensor("t", np.ones((2, 32), dtype=np.float32))
        w.add_tensor("u", np.ones(32, dtype=np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path.read_bytes()


def model_shapes(gguf_path: Path) -> dict[str, tuple[int, ...]]:
    """numpy shapes of a GGUF's matrices (what an importance matrix is checked against)."""
    from chatglm.gguf_file import read_header

    return {n: tuple(reversed(t.shape)) for n, t in read_header(gguf_path).tensors.items() if len(t.shape) >= 2}


def _imatrices(root: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """The same importance matrix in llama.cpp's legacy ``.dat`` format and in its GGUF format."""
    import gguf as g
    import numpy as np

    from chatglm.convert.imatrix import n_values, write_legacy

    entries = {n: (2, np.linspace(0.5, 1.5, n_values(s), dtype=np.float32)) for n, s in shapes.items()}
    write_legacy(root / "imatrix.dat", entries, chunk_count=2, dataset="calib.txt")
    w = g.GGUFWriter(root / "imatrix.gguf", arch="imatrix")
    w.add_type("imatrix")
    w.add_array("imatrix.datasets", ["calib.txt"])
    w.add_uint32("imatrix.chunk_count", 2)
    w.add_uint32("imatrix.chunk_size", 512)
    for name, (ncall, values) in entries.items():
        w.add_tensor(f"{name}.in_sum2", (values * ncall).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.full((1, 1), ncall, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


TOOLS = [{"name": "get_weather", "description": "the weather in a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]
REPLIES = [  # what the formats generate: plain text, ChatGLM3 and GLM-4 tool calls, GLM-4.5 thinking and tool calls
    "\nHello! How can I help?",
    "get_weather\n```python\ntool_call(city='Paris')\n```",
    "get_weather\n{\"city\": \"Paris\"}",
    "<think>the user wants weather</think>\n<tool_call>get_weather\n<arg_key>city</arg_key>\n"
    "<arg_value>Paris</arg_value>\n</tool_call>",
]


def _chat(root: Path) -> None:
    """A saved conversation (the REPL's /save format) and a tools file."""
    messages = [{"role": "system", "content": "be brief", "tools": TOOLS}, {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "metadata": "get_weather",
                 "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
                {"role": "observation", "content": "{\"temperature\": 21}"},
                {"role": "assistant", "content": "It is 21 degrees.", "thinking": "easy"}]
    conversation = {"kind": "chatglm-conversation", "version": 1, "model": "tiny", "messages": messages}
    (root / "conversation.json").write_text(json.dumps(conversation), encoding="utf-8")
    (root / "tools.json").write_text(json.dumps({"tools": TOOLS}), encoding="utf-8")


def chat_bodies() -> list[bytes]:
    """Request bodies that exercise most of the server's schema."""
    import numpy as np

    from chatglm.devtools import media_files

    tools = [{"type": "function", "function": {"name": "weather", "description": "d",
                                               "parameters": {"type": "object", "properties": {}}}}]
    bodies = [
        {"model": "chatglm", "messages": [{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0.5,
         "top_p": 0.9, "stop": ["\n"], "seed": 1},
        {"messages": [{"role": "user", "content": "weather?"}], "tools": tools, "tool_choice": "auto",
         "stream": True, "stream_options": {"include_usage": True}},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "",
                      "tool_calls": [{"id": "c1", "type": "function",
                                      "function": {"name": "weather", "arguments": "{}"}}]},
                      {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]},
        {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
                media_files.png(np.zeros((2, 3, 3), np.uint8))).decode()}},
            {"type": "input_audio", "input_audio": {"data": base64.b64encode(media_files.wav(8)).decode(),
                                                    "format": "wav"}}]}]},
        {"prompt": "once upon a time", "max_tokens": 3, "stream": False},
    ]
    return [json.dumps(b).encode() for b in bodies]

"""The converter of GLM-4-9B (base, chat, chat-1m) in the THUDM layout: llama.cpp's ``chatglm`` architecture with a
tiktoken vocab.

The weights and config.json are ChatGLM3's (``ChatGLMModel``, ``padded_vocab_size``, fused ``query_key_value``), so the
tensor map and hyperparameters are :class:`~chatglm.families.chatglm2.convert.ChatGLM`'s. What differs is the
tokenizer: ``tokenizer.model`` holds tiktoken ranks instead of a SentencePiece model, and the special tokens
(``<|endoftext|> [MASK] [gMASK] [sMASK] <sop> <eop> <|system|> <|user|> <|assistant|> <|observation|> ...``) are
listed in ``tokenizer_config.json``. This family claims every second-generation GLM config whose tokenizer.model is
not SentencePiece, so a tokenizer.model of neither format gets an error that says so.
"""

from __future__ import annotations

import gguf

from chatglm.convert.family import refuse_vision_tower
from chatglm.convert.vocab_bpe import (
    build_tiktoken_vocab,
    glm_special_ids,
    is_tiktoken,
    require_specials,
    write_bpe_vocab,
)
from chatglm.convert.vocab_spm import is_sentencepiece
from chatglm.errors import InputError
from chatglm.families.chatglm2.convert import ChatGLM
from chatglm.families.glm4 import FAMILY
from chatglm.fsutil import check_regular

GLM4_REQUIRED_SPECIALS = ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                          "<|observation|>")


class GLM4(ChatGLM):
    """glm-4-9b, glm-4-9b-chat, glm-4-9b-chat-1m (THUDM/zai-org remote-code layout)."""

    name = FAMILY.variants[0]

    def __init__(self, ckpt):
        refuse_vision_tower(ckpt, "glm-4v-9b (ChatGLMModel with a vision tower) is not supported: its EVA2-CLIP "
                            "tower (post-norm blocks, then a 2x2 convolution and a GLU adapter) matches no libmtmd "
                            "projector (COGVLM has no convolution, GLM_EDGE takes pre-norm blocks)")
        super().__init__(ckpt)
        path = ckpt.dir / "tokenizer.model"
        check_regular(path, missing="tokenizer file not found (ChatGLM2/3 keep a SentencePiece model here, GLM-4 "
                      "tiktoken ranks)")
        if not is_tiktoken(path):
            raise InputError("tokenizer.model is neither a SentencePiece model nor tiktoken 'base64 rank' lines", path)
        self.chat_format = FAMILY.chat_formats[0]
        self.name = FAMILY.variants[0]

    def rope_ratio_divides_positions(self) -> bool:
        return False  # GLM-4's modeling code scales the rope base (glm-4-9b-chat: 500, -1m: 10000)

    @classmethod
    def matches(cls, ckpt) -> bool:
        tokenizer = ckpt.dir / "tokenizer.model"
        # A missing tokenizer.model is left to the ChatGLM2/3 family, whose error names the file.
        return tokenizer.exists() and not is_sentencepiece(tokenizer)

    def write_vocab(self, w: gguf.GGUFWriter) -> None:
        config_path = self.ckpt.dir / "tokenizer_config.json"
        vocab = build_tiktoken_vocab(self.ckpt.dir / "tokenizer.model", config_path, self.hp.n_vocab)
        require_specials(vocab, GLM4_REQUIRED_SPECIALS, config_path)
        write_bpe_vocab(w, vocab, glm_special_ids(vocab))


CONVERTER = GLM4

__all__ = ["CONVERTER", "GLM4", "is_tiktoken"]

"""Where images and audio stand in a prompt (issue #19): each medium where its content part is, token for token what
transformers' ``apply_chat_template`` renders for the same part list with each vision family's template.

Templates: the reference ones that write images (GLM-5.3-Flash's official revisions and a modified one, GLM-OCR's,
read through CHATGLM_REFERENCE) and those our devtools checkpoints carry (GLM-4.1V's, the GLM-4.5V/OCR/5.3-Flash
fixtures'). Tokenizer: the tiny GLM-4 BPE with the image tokens (``glm_vision.vision_tokenizer``), through
``tokenizers`` on both sides, so no model is loaded; the engine's side (libmtmd, the processor's expanded ids) is in
test_glm_vision.py and test_glm4v.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_chat_templates import TEMPLATES

from chatglm.devtools.glm4v import GLM4V_TEMPLATE
from chatglm.devtools.glm_vision import VISION_TEMPLATE, fixture_png, vision_tokenizer
from chatglm.errors import InputError
from chatglm.families.glm5_next.chat import GLM53FlashFormat
from chatglm.runtime import jinja_chat
from chatglm.runtime.media import load_media
from chatglm.runtime.messages import Message, content_parts, in_order

REFERENCE_TEMPLATES = ("GLM-5.3-Flash.jinja", "GLM-5.3-Flash.04c4e9e9.jinja", "GLM-5.3-Flash.weschera-modified.jinja",
                       "GLM-OCR.unverified-dart-test.jinja")
DEVTOOLS_TEMPLATES = {"glm-4.1v (devtools)": GLM4V_TEMPLATE, "glm-4.5v/ocr/5.3-flash (devtools)": VISION_TEMPLATE}
IMAGE = ("<|begin_of_image|>", "<|image|>", "<|end_of_image|>")

# content-part lists as transformers takes them ("image" parts: the picture itself rides along on our side)
ORDERS = {
    "text-image-text": ["Compare ", "image", " with 你好."],
    "image-text-image": ["image", "between the two, ", "image"],
    "images-then-text": ["image", "image", "What is written here?"],
}


def template_of(name: str) -> str:
    if name in DEVTOOLS_TEMPLATES:
        return DEVTOOLS_TEMPLATES[name]
    if not TEMPLATES.is_dir():
        pytest.skip(f"reference chat templates not found at {TEMPLATES} (set CHATGLM_REFERENCE)")
    return (TEMPLATES / name).read_text(encoding="utf-8")


class BPE:
    """Our Tokenizer protocol over ``tokenizers`` (text only: special-token text is not parsed)."""

    def __init__(self, tok):
        self.tok = tok

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def tok():
    return vision_tokenizer()


@pytest.fixture(scope="module")
def added(tok):
    return {t.content: i for i, t in tok.get_added_tokens_decoder().items()}


@pytest.fixture(scope="module")
def pngs():
    return [fixture_png(28, 28, seed=1), fixture_png(56, 28, seed=2)]


def hf_parts(order: list[str]) -> list[dict]:
    return [{"type": "image"} if p == "image" else {"type": "text", "text": p} for p in order]


def our_parts(order: list[str], pngs: list[bytes]) -> list[dict]:
    images = iter(pngs * 2)
    return [{"type": "image", "image": next(images)} if p == "image" else {"type": "text", "text": p} for p in order]


def conversation(order: list[str], pngs: list[bytes]) -> tuple[list[dict], list[Message]]:
    """(transformers' messages, ours) for: a system turn, a first user turn with one image before its text and the
    reply, then a user turn with the parts in ``order``."""
    first = [{"type": "image"}, {"type": "text", "text": "Describe it."}]
    hf = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": first},
          {"role": "assistant", "content": "A gradient."}, {"role": "user", "content": hf_parts(order)}]
    ours = [Message("system", "Be brief."), Message.from_dict({"role": "user", "content": our_parts(["image", "Describe it."], pngs)}),
            Message("assistant", "A gradient."), Message.from_dict({"role": "user", "content": our_parts(order, pngs)})]
    return hf, ours


def reference_ids(tok, template: str, messages: list[dict], **options) -> list[int]:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=tok)
    text = hf.apply_chat_template(messages, chat_template=template, add_generation_prompt=True, tokenize=False,
                                  **options)
    return tok.encode(text, add_special_tokens=False).ids


def test_content_parts_keep_each_medium_where_it_stands(pngs):
    text, media = content_parts(our_parts(ORDERS["image-text-image"], pngs))
    assert text == "between the two, " and [m.offset for m in media] == [0, len(text)]
    m = Message("user", text, media=media)
    assert [x if isinstance(x, str) else x.kind for x in in_order(m)] == ["image", "between the two, ", "image"]
    text, media = content_parts(our_parts(ORDERS["text-image-text"], pngs))
    assert [x if isinstance(x, str) else x.offset for x in in_order(Message("user", text, media=media))] == [
        "Compare ", 8, " with 你好."]


@pytest.mark.parametrize("offsets", [(5, 2), (99,), (-1,)])
def test_a_medium_outside_its_text_is_refused_in_one_line(pngs, offsets):
    image = load_media(pngs[0], "image", name="photo")
    m = Message("user", "hello", media=tuple(replace(image, offset=o) for o in offsets))
    with pytest.raises(InputError, match=r"^photo: its place in the message \(offset -?\d+\) is outside") as err:
        in_order(m)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("name", [*DEVTOOLS_TEMPLATES, *REFERENCE_TEMPLATES])
def test_images_stand_where_their_parts_are_token_for_token(tok, added, pngs, name, order):
    template = template_of(name)
    hf, ours = conversation(ORDERS[order], pngs)
    expected = reference_ids(tok, template, hf)
    got = jinja_chat.JinjaFormat(added, template, added).prompt_ids(ours, BPE(tok))
    assert got == expected
    image = added["<|image|>"]
    assert got.count(image) == 1 + ORDERS[order].count("image")  # one placeholder per image part, none lost
    first, last = got.index(image), len(got) - 1 - got[::-1].index(image)
    if order == "text-image-text":  # the last user turn's text is on both sides of its image
        assert tok.decode(got[first + 2:last], skip_special_tokens=False).count("Compare") == 1


GLM53_TEMPLATES = ("GLM-5.3-Flash.jinja", "GLM-5.3-Flash.04c4e9e9.jinja")


@pytest.mark.parametrize("order", list(ORDERS))
@pytest.mark.parametrize("name", GLM53_TEMPLATES)
def test_glm53flash_places_media_itself_token_for_token(tok, added, pngs, name, order):
    """The token-exact builder writes each image where its part is (``places_media``: no template fallback), with
    the template's options, equal to transformers' rendering of the official template."""
    template = template_of(name)
    fmt = GLM53FlashFormat(added)
    assert fmt.places_media and jinja_chat.media_format(fmt, added, template, added) is fmt
    assert jinja_chat.media_format(fmt, added, "", added) is fmt  # no template in the GGUF: the builder still does
    hf, ours = conversation(ORDERS[order], pngs)
    for options in ({}, {"reasoning_effort": "low"}):
        expected = reference_ids(tok, template, hf, **options)
        with fmt.using(options):
            got = fmt.prompt_ids(ours, BPE(tok))
        assert got == expected
        assert got.count(added["<|image|>"]) == 1 + ORDERS[order].count("image")


@pytest.mark.parametrize("name", GLM53_TEMPLATES)
def test_glm53flash_places_an_image_inside_a_tool_result(tok, added, pngs, name):
    from chatglm.runtime.messages import ToolCall

    template = template_of(name)
    call = {"id": "c1", "type": "function", "function": {"name": "snap", "arguments": {"zoom": 2}}}
    hf = [{"role": "user", "content": "Take a picture."}, {"role": "assistant", "content": "", "tool_calls": [call]},
          {"role": "tool", "tool_call_id": "c1", "content": hf_parts(["here: ", "image", " done"])}]
    ours = [Message("user", "Take a picture."), Message("assistant", "", tool_calls=[ToolCall("snap", {"zoom": 2}, "c1")]),
            Message.from_dict({"role": "tool", "tool_call_id": "c1",
                               "content": our_parts(["here: ", "image", " done"], pngs)})]
    assert GLM53FlashFormat(added).prompt_ids(ours, BPE(tok)) == reference_ids(tok, template, hf)


def test_glm53flash_refuses_media_it_cannot_place_in_one_line(tok, added, pngs):
    image = load_media(pngs[0], "image", name="photo.png")
    with pytest.raises(InputError, match=r"^photo.png: glm53flash places media in user, system and tool turns, not "
                                         r"in an assistant's reply$"):
        GLM53FlashFormat(added).prompt_ids([Message("user", "hi"), Message("assistant", "a", media=(image,)),
                                            Message("user", "and?")], BPE(tok))
    lacking = {k: v for k, v in added.items() if k != "<|end_of_image|>"}
    with pytest.raises(InputError, match=r"^photo.png: glm53flash places images only, and only with "):
        GLM53FlashFormat(lacking).prompt_ids([Message("user", "hi", media=(image,))], BPE(tok))

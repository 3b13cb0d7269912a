"""The built-in chat page in headless Chromium: it loads from the server alone, streams a reply, Stop cancels the
generation on the server, New conversation clears it, and it works against the llama.cpp model with an API key.

Skipped (with the reason) only when no Chromium binary exists; `.ci/run` installs Debian's ``chromium``.
"""

from __future__ import annotations

import base64
import re

import numpy as np
from fixtures_server import LLAMA_KEY, ScriptedModel, answer, chromium, http, llama_server, serve  # noqa: F401

from test_chat_reasoning import GLM_SPECIAL

from chatglm.devtools import media_files as mf
from chatglm.server.app import page_html

LONG = answer(" ".join(f"w{i}" for i in range(400)))


def js_str(text: str) -> str:
    return repr(text)  # a Python repr of plain text is a valid JavaScript string literal


def type_and_send(browser, text: str) -> None:
    browser.eval(f"document.getElementById('input').value = {js_str(text)};"
                 "document.getElementById('send').click(); true")


def test_the_page_needs_nothing_from_outside():
    html = page_html()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "import " not in html and "@import" not in html
    assert re.search(r"<script>", html) and "fetch(\"/v1/chat/completions\"" in html


def test_page_streams_a_reply_and_stop_cancels_it(chromium):  # noqa: F811
    model = ScriptedModel([LONG], token_delay=0.02)
    with serve([model]) as live:
        live.wait_ready()
        chromium.open(live.url + "/")
        chromium.wait_for("document.getElementById('status').textContent === 'ready'")
        assert chromium.eval("document.getElementById('model').textContent") == "tiny"
        chromium.eval("document.getElementById('system').value = 'Be brief.';"
                      "const t = document.getElementById('temperature'); t.value = '0.3';"
                      "t.dispatchEvent(new Event('input')); true")
        type_and_send(chromium, "你好")
        chromium.wait_for("document.body.dataset.state === 'streaming' && "
                          "(document.querySelector('.msg.assistant') || {}).textContent.split(' ').length >= 3")
        partial = chromium.eval("document.querySelector('.msg.assistant').textContent")
        assert partial.startswith("w0 w1") and chromium.eval("document.getElementById('stop').disabled") is False
        chromium.eval("document.getElementById('stop').click(); true")
        chromium.wait_for("document.body.dataset.state === 'idle'")
        assert chromium.eval("document.getElementById('status').textContent") == "stopped"
        shown = chromium.eval("document.querySelector('.msg.assistant').textContent")
        assert shown.endswith("[stopped]") and "w399" not in shown
        assert model.finished.wait(3) and model.last_stats.finish_reason == "cancelled"
        assert model.last_stats.generated_tokens < 400
        sent = model.received[0]
        assert [(m.role, m.content) for m in sent] == [("system", "Be brief."), ("user", "你好")]
        assert model.sampling[0]["temperature"] == 0.3
        resources = chromium.eval("performance.getEntriesByType('resource').map(e => e.name)")
        assert all(name.startswith(live.url) for name in resources), resources


def test_page_full_reply_history_and_reset_against_llama(chromium, llama_server):  # noqa: F811
    chromium.open(llama_server.url + "/")
    chromium.wait_for("document.getElementById('status').textContent === 'ready'")
    assert chromium.eval("document.getElementById('model').textContent") == "…"  # /v1/models needs the key
    chromium.eval(f"const key = document.getElementById('api-key'); key.value = {js_str(LLAMA_KEY)};"
                  "key.dispatchEvent(new Event('change')); document.getElementById('max-tokens').value = '8'; true")
    chromium.wait_for("document.getElementById('model').textContent === 'tiny'")
    for turn in ("你好", "再见"):
        type_and_send(chromium, turn)
        chromium.wait_for("document.body.dataset.state === 'idle' && "
                          "document.getElementById('status').textContent === 'ready'")
    assert chromium.eval("document.querySelectorAll('.msg.user').length") == 2
    assert chromium.eval("document.querySelectorAll('.msg.assistant').length") == 2
    assert chromium.eval("document.querySelectorAll('.msg.error').length") == 0
    chromium.eval("document.getElementById('reset').click(); true")
    assert chromium.eval("document.querySelectorAll('.msg').length") == 0
    assert chromium.eval("document.getElementById('empty') !== null")


def test_page_shows_an_error_from_the_server(chromium, llama_server):  # noqa: F811
    chromium.open(llama_server.url + "/")
    chromium.wait_for("document.getElementById('status').textContent === 'ready'")
    chromium.eval("document.getElementById('api-key').value = 'wrong'; true")
    type_and_send(chromium, "hi")
    chromium.wait_for("document.getElementById('status').textContent === 'error'")
    error = chromium.eval("document.querySelector('.msg.error').textContent")
    assert error.startswith("Error: invalid API key")
    assert http().get(llama_server.url + "/health").json()["busy"] == 0


# -- images and reasoning ---------------------------------------------------------------------------------------
class SeeingModel(ScriptedModel):
    media_kinds = frozenset({"image"})


def js_file(data: bytes, name: str, mime: str) -> str:
    """A JavaScript expression for a File holding ``data``."""
    b64 = base64.b64encode(data).decode()
    return f"new File([Uint8Array.from(atob('{b64}'), c => c.charCodeAt(0))], '{name}', {{type: '{mime}'}})"


def test_page_attaches_pastes_and_drops_images_and_shows_them(chromium):  # noqa: F811
    png, gif, jpeg = mf.png(np.full((6, 10, 3), 200, np.uint8)), mf.gif(4, 3), mf.jpeg(16, 8)
    model = SeeingModel([answer("Three pictures.")])
    with serve([model]) as live:
        live.wait_ready()
        chromium.open(live.url + "/")
        chromium.wait_for("document.getElementById('status').textContent === 'ready'")
        chromium.eval("const a = new DataTransfer(); a.items.add(" + js_file(png, "a.png", "image/png") + ");"
                      "const input = document.getElementById('attach'); input.files = a.files;"
                      "input.dispatchEvent(new Event('change')); true")
        chromium.wait_for("document.querySelectorAll('#attachments img').length === 1")
        chromium.eval("const p = new DataTransfer(); p.items.add(" + js_file(gif, "b.gif", "image/gif") + ");"
                      "document.getElementById('input').dispatchEvent(new ClipboardEvent('paste', "
                      "{clipboardData: p, bubbles: true, cancelable: true})); true")
        chromium.wait_for("document.querySelectorAll('#attachments img').length === 2")
        chromium.eval("const d = new DataTransfer(); d.items.add(" + js_file(jpeg, "c.jpg", "image/jpeg") + ");"
                      "document.getElementById('log').dispatchEvent(new DragEvent('drop', "
                      "{dataTransfer: d, bubbles: true, cancelable: true})); true")
        chromium.wait_for("document.querySelectorAll('#attachments img').length === 3")
        type_and_send(chromium, "What are these?")
        chromium.wait_for("document.body.dataset.state === 'idle' && "
                          "document.getElementById('status').textContent === 'ready'")
        shown = chromium.eval("[...document.querySelectorAll('.msg.user img')].map(i => i.src.slice(0, 22))")
        assert shown == ["data:image/png;base64,", "data:image/gif;base64,", "data:image/jpeg;base64"]
        assert chromium.eval("document.querySelectorAll('#attachments img').length") == 0
        assert chromium.eval("document.querySelector('.msg.assistant').textContent") == "Three pictures."
    message = model.received[0][-1]
    assert message.content == "What are these?"
    assert [(m.format, m.width, m.height, m.data) for m in message.media] == [
        ("png", 10, 6, png), ("gif", 4, 3, gif), ("jpeg", 16, 8, jpeg)]


def test_page_refuses_a_non_image_and_shows_the_servers_400(chromium):  # noqa: F811
    with serve([ScriptedModel()]) as live:  # text only
        live.wait_ready()
        chromium.open(live.url + "/")
        chromium.wait_for("document.getElementById('status').textContent === 'ready'")
        chromium.eval("const t = new DataTransfer(); t.items.add(new File(['hi'], 'notes.txt', {type: 'text/plain'}));"
                      "t.items.add(" + js_file(mf.png(np.zeros((2, 2), np.uint8)), "x.png", "image/png") + ");"
                      "document.getElementById('log').dispatchEvent(new DragEvent('drop', "
                      "{dataTransfer: t, bubbles: true, cancelable: true})); true")
        chromium.wait_for("document.querySelectorAll('#attachments img').length === 1")
        assert chromium.eval("document.querySelector('.msg.error').textContent") == "Error: notes.txt is not an image"
        type_and_send(chromium, "")
        chromium.wait_for("document.getElementById('status').textContent === 'error'")
        errors = chromium.eval("[...document.querySelectorAll('.msg.error')].map(e => e.textContent)")
        assert "takes text only; it cannot read image" in errors[-1], errors


def test_page_shows_reasoning_dimmed_and_apart_from_the_answer(chromium):  # noqa: F811
    model = ScriptedModel(["Let me add: 2 plus 3 is 5.</think>The answer is 5."], chat_format="glm47",
                          special=GLM_SPECIAL)
    with serve([model]) as live:
        live.wait_ready()
        chromium.open(live.url + "/")
        chromium.wait_for("document.getElementById('status').textContent === 'ready'")
        type_and_send(chromium, "2+3?")
        chromium.wait_for("document.body.dataset.state === 'idle' && "
                          "document.getElementById('status').textContent === 'ready'")
        thinking = chromium.eval("document.querySelector('.msg.assistant details.thinking div').textContent")
        assert thinking == "Let me add: 2 plus 3 is 5."
        assert chromium.eval("document.querySelector('.msg.assistant details.thinking').open") is False
        assert chromium.eval("document.querySelector('.msg.assistant').lastChild.textContent") == "The answer is 5."
        opacity = chromium.eval("getComputedStyle(document.querySelector('details.thinking')).opacity")
        assert float(opacity) < 1


def open_page(browser, live) -> None:
    live.wait_ready()
    browser.open(live.url + "/")
    browser.wait_for("document.getElementById('status').textContent === 'ready'")


def test_page_scales_a_huge_picture_down_before_sending(chromium):  # noqa: F811
    model = SeeingModel([answer("A wide one.")])
    with serve([model]) as live:
        open_page(chromium, live)
        chromium.eval("const c = document.createElement('canvas'); c.width = 6000; c.height = 300;"
                      "c.getContext('2d').fillRect(0, 0, 3000, 300);"
                      "c.toBlob((blob) => { const t = new DataTransfer();"
                      "  t.items.add(new File([blob], 'wide.png', {type: 'image/png'}));"
                      "  const input = document.getElementById('attach'); input.files = t.files;"
                      "  input.dispatchEvent(new Event('change')); }, 'image/png'); true")
        chromium.wait_for("document.querySelectorAll('#attachments img').length === 1")
        type_and_send(chromium, "")
        chromium.wait_for("document.body.dataset.state === 'idle' && "
                          "document.getElementById('status').textContent === 'ready'")
        notice = chromium.eval("document.querySelector('.msg.user .note').textContent")
    (image,) = model.received[0][-1].media
    assert (image.format, image.width, image.height) == ("jpeg", 2048, 102)
    assert re.fullmatch(r"wide\.png: scaled from 6000×300 \(\d+ KiB\) to 2048×102 \(\d+ KiB\) \(more than 4096 "
                        r"pixels a side\)", notice), notice


def attach_noise_png(browser, width: int, height: int, name: str) -> dict:
    """Attach a PNG of random pixels drawn in the page (so it hardly compresses); its size and SHA-256 as the
    browser has it."""
    browser.eval(
        f"const c = document.createElement('canvas'); c.width = {width}; c.height = {height};"
        f"const g = c.getContext('2d'); const d = g.createImageData({width}, {height});"
        "for (let i = 0; i < d.data.length; i++) d.data[i] = i % 4 === 3 ? 255 : Math.random() * 256;"
        "g.putImageData(d, 0, 0); window.picture = null;"
        "c.toBlob(async (blob) => { const bytes = new Uint8Array(await blob.arrayBuffer());"
        "  const hash = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));"
        "  window.picture = {size: bytes.length, sha256: [...hash].map(b => b.toString(16).padStart(2, '0')).join('')};"
        f"  const t = new DataTransfer(); t.items.add(new File([blob], {js_str(name)}, {{type: 'image/png'}}));"
        "  const input = document.getElementById('attach'); input.files = t.files;"
        "  input.dispatchEvent(new Event('change')); }, 'image/png'); true")
    browser.wait_for("window.picture !== null && document.querySelectorAll('#attachments img').length === 1")
    return browser.eval("window.picture")


def send_and_wait(browser) -> None:
    type_and_send(browser, "What is it?")
    browser.wait_for("document.body.dataset.state === 'idle' && "
                     "document.getElementById('status').textContent === 'ready'")


def test_page_sends_a_4_mb_png_as_it_is_within_the_body_limit(chromium):  # noqa: F811
    """Over the page's old 3 MB cut but within ``serve --max-body`` (32 MiB by default): sent byte for byte."""
    import hashlib

    model = SeeingModel([answer("Noise.")])
    with serve([model]) as live:
        open_page(chromium, live)
        assert chromium.eval("document.querySelector('meta[name=\"max-body-bytes\"]').content") == str(32 << 20)
        sent = attach_noise_png(chromium, 1200, 1200, "noise.png")
        send_and_wait(chromium)
        assert chromium.eval("document.querySelectorAll('.msg .note').length") == 0
    (image,) = model.received[0][-1].media
    assert sent["size"] > 4_000_000 and len(image.data) == sent["size"]
    assert (image.format, image.width, image.height) == ("png", 1200, 1200)
    assert hashlib.sha256(image.data).hexdigest() == sent["sha256"]


def test_page_scales_a_picture_the_request_cannot_carry_and_says_so(chromium):  # noqa: F811
    model = SeeingModel([answer("Smaller noise.")])
    with serve([model], max_body_bytes=2 << 20) as live:
        open_page(chromium, live)
        sent = attach_noise_png(chromium, 1200, 1200, "noise.png")
        send_and_wait(chromium)
        notice = chromium.eval("document.querySelector('.msg.user .note').textContent")
        assert chromium.eval("document.querySelectorAll('.msg.error').length") == 0
    (image,) = model.received[0][-1].media
    assert image.format == "jpeg" and image.width == image.height < 1200 and len(image.data) < 2 << 20
    old = f"{sent['size'] / 1048576:.1f}".rstrip("0").rstrip(".")
    assert re.fullmatch(rf"noise\.png: scaled from 1200×1200 \({re.escape(old)} MiB\) to {image.width}×{image.width} "
                        r"\((\d+ KiB|[\d.]+ MiB)\) to fit the server's 2 MiB request limit", notice), notice

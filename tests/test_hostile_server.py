"""Hostile requests against a live server (issue #16, server bullets): each is a 4xx in OpenAI's error shape, and the
very next ordinary request is served.

Bodies are raw bytes sent with hand-set headers (``raw_request``), so nothing is normalised by a client library:
deep nesting, 5,000-digit numbers, lone surrogates, bodies that are not UTF-8, wrong content types, foreign Host
headers (DNS rebinding), and exceptions inside handlers. The scripted model keeps it fast; ``parse_request`` (the
same checks without a socket) is tested directly too. ``chatglm serve`` itself: the model loads before anything
listens, a load error is one line and exit 2, and ``--allow-host`` extends the loopback Host names.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading

import pytest
from fixtures_server import LiveServer, ScriptedModel, raw_http10, raw_request, serve
from hostile import assert_refused, cli, digest

from chatglm.cli.serve import allowed_hosts, bind
from chatglm.errors import InputError
from chatglm.server import ServerConfig, create_app
from chatglm.server.body import parse_request
from chatglm.server.errors import APIError
from chatglm.server.guard import LOOPBACK_HOSTS, host_name

CHAT = "/v1/chat/completions"
JSON = {"Content-Type": "application/json"}
LIMIT = 256 << 10  # a small body limit keeps the oversized case fast
EXTRA_HOST = "myhost.test"
OK_BODY = b'{"messages": [{"role": "user", "content": "hi"}]}'


def user(text: str = "x") -> list[dict]:
    return [{"role": "user", "content": text}]


def chat_body(**fields) -> bytes:
    return json.dumps({"messages": user(), **fields}).encode()


@pytest.fixture(scope="module")
def live():
    with serve([ScriptedModel()], max_body_bytes=LIMIT, allowed_hosts=LOOPBACK_HOSTS + (EXTRA_HOST,)) as server:
        server.wait_ready()
        yield server


def assert_error(reply, status: int, words: str, code=None) -> dict:
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error" and error["code"] == code, error
    assert words in error["message"], (words, error["message"])
    assert "Traceback" not in error["message"]
    return error


def assert_serving(live: LiveServer) -> None:
    r = raw_request(live.port, "POST", CHAT, OK_BODY, JSON)
    assert r.status == 200 and r.json()["choices"][0]["message"]["content"], r.body[:300]


# ------------------------------------------------------------------------------------------------ bad bodies
DEEP = 100_000
BODIES = [
    ("deeply nested array", b'{"messages": ' + b"[" * DEEP + b"]" * DEEP + b"}", f"nests {DEEP + 1} levels deep"),
    ("deeply nested object", b'{"a": ' * 70 + b"1" + b"}" * 70, "nests 70 levels deep; at most 64"),
    ("nesting inside a tool schema", chat_body(tools=[{"type": "function", "function": {
        "name": "f", "parameters": json.loads("[" * 80 + "]" * 80)}}]), "levels deep; at most 64"),
    ("5,000-digit number", chat_body()[:-1] + b', "max_tokens": ' + b"9" * 5000 + b"}", "5000 characters long"),
    ("5,000-digit float", chat_body()[:-1] + b', "temperature": 0.' + b"1" * 5000 + b"}", "characters long"),
    ("1e400", chat_body()[:-1] + b', "temperature": 1e400}', "the number 1e400 is out of range"),
    ("NaN literal", chat_body()[:-1] + b', "temperature": NaN}', "holds NaN, which is not a JSON number"),
    ("-Infinity literal", chat_body()[:-1] + b', "top_p": -Infinity}', "holds -Infinity"),
    ("role as a list", chat_body(messages=[{"role": ["user"], "content": "x"}]),
     "messages[0].role must be a string"),
    ("role as an object", chat_body(messages=[{"role": {"a": 1}, "content": "x"}]), "role must be a string"),
    ("unknown role", chat_body(messages=[{"role": "wizard", "content": "x"}]), "unknown role 'wizard'"),
    ("lone surrogate in content", b'{"messages": [{"role": "user", "content": "a\\ud800b"}]}',
     "messages[0].content: the text holds a lone surrogate (\\ud800)"),
    ("lone low surrogate in a key", b'{"messages": [{"role": "user", "content": "x", "\\udc00": 1}]}',
     "lone surrogate (\\udc00)"),
    ("lone surrogate in a stop string", chat_body()[:-1] + b', "stop": ["\\ud83d"]}', "stop[0]: the text holds"),
    ("not UTF-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "not UTF-8 text: byte 0xff"),
    ("UTF-16", OK_BODY.decode().encode("utf-16"), "not UTF-8 text"),
    ("UTF-8 with a BOM", b"\xef\xbb\xbf" + OK_BODY, "not valid JSON"),
    ("empty body", b"", "the request body is empty"),
    ("whitespace body", b" \r\n\t ", "the request body is empty"),
    ("truncated JSON", b'{"messages": [', "not valid JSON"),
    ("a JSON array", b"[1, 2]", "must be a JSON object, not list"),
    ("a JSON string", b'"hi"', "must be a JSON object, not str"),
    ("messages not a list", chat_body(messages="hi"), "messages: Input should be a valid list"),
    ("messages empty", chat_body(messages=[]), "at least 1 item"),
    ("a message that is not an object", chat_body(messages=["hi"]), "valid dictionary"),
    ("20,000 messages", chat_body(messages=[{}] * 20_000), "at most 10000 items"),
    ("content part of unknown type", chat_body(messages=[{"role": "user", "content": [
        {"type": "file", "file": {"file_id": "x"}}]}]), "unsupported content part 'file'"),
    ("an image data: URL that is not base64", chat_body(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]), "the data: URL must be base64"),
    ("content part of a list type", chat_body(messages=[{"role": "user", "content": [{"type": []}]}]),
     "unsupported content part 'dict'"),
    ("content as a number", chat_body(messages=[{"role": "user", "content": 5}]), "must be a string or a list"),
    ("max_tokens 10^30", chat_body(max_tokens=10 ** 30), "max_tokens: Input should be less than or equal to"),
    ("max_completion_tokens 2^40", chat_body(max_completion_tokens=2 ** 40), "max_completion_tokens"),
    ("max_tokens 0", chat_body(max_tokens=0), "greater than or equal to 1"),
    ("temperature 'hot'", chat_body(temperature="hot"), "temperature: Input should be a valid number"),
    ("temperature 'NaN' as a string", chat_body(temperature="NaN"), "temperature: Input should be a finite number"),
    ("top_k 2^40", chat_body(top_k=2 ** 40), "top_k: Input should be less than or equal to 2147483647"),
    ("negative seed", chat_body(seed=-1), "seed: Input should be greater than or equal to 0"),
    ("seed 2^70", chat_body(seed=2 ** 70), "seed: Input should be less than or equal to"),
    ("repeat_penalty 1e300", chat_body(repeat_penalty=1e300), "repeat_penalty"),
    ("stop as an object", chat_body(stop={"a": 1}), "stop"),
    ("stop of 5 strings", chat_body(stop=list("abcde")), "at most 4 non-empty stop strings"),
    ("a 1,000-character stop", chat_body(stop=["s" * 1000]), "at most 512 characters"),
    ("n = 2", chat_body(n=2), "n: Input should be less than or equal to 1"),
    ("tools as an object", chat_body(tools={"name": "f"}), "tools: Input should be a valid list"),
    ("a tool without function", chat_body(tools=[{"type": "function"}]), "tools.0.function: Field required"),
    ("a tool name that is a list", chat_body(tools=[{"type": "function", "function": {"name": ["f"]}}]),
     "tools.0.function.name"),
    ("a tool of another type", chat_body(tools=[{"type": "retrieval", "function": {"name": "f"}}]), "tools.0.type"),
    ("300 tools", chat_body(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(300)]),
     "at most 256 items"),
    ("tool_choice naming a missing tool", chat_body(tools=[{"type": "function", "function": {"name": "f"}}],
                                                    tool_choice={"type": "function", "function": {"name": "g"}}),
     "not among the tools"),
    ("tool-call arguments as a list", chat_body(messages=[
        {"role": "user", "content": "x"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": [1]}}]},
        {"role": "tool", "content": "1"}]), "arguments must be a JSON string or an object"),
    ("tool calls not a list", chat_body(messages=[{"role": "assistant", "content": "", "tool_calls": {"a": 1}}]),
     "tool_calls must be a list"),
]  # fmt: skip


@pytest.mark.parametrize("body, words", [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_a_bad_body_is_a_400_and_the_server_goes_on(live, body, words):
    assert_error(raw_request(live.port, "POST", CHAT, body, JSON), 400, words)
    assert_serving(live)


COMPLETIONS = [
    ("prompt as token ids", {"prompt": [1, 2, 3]}, "prompt"),
    ("two prompts", {"prompt": ["a", "b"]}, "one prompt per request"),
    ("prompt missing", {}, "prompt: Field required"),
    ("prompt with a lone surrogate", None, "lone surrogate"),
]  # fmt: skip


@pytest.mark.parametrize("fields, words", [c[1:] for c in COMPLETIONS], ids=[c[0] for c in COMPLETIONS])
def test_a_bad_completion_body_is_a_400(live, fields, words):
    body = json.dumps(fields).encode() if fields is not None else b'{"prompt": "\\udfff"}'
    assert_error(raw_request(live.port, "POST", "/v1/completions", body, JSON), 400, words)
    assert raw_request(live.port, "POST", "/v1/completions", b'{"prompt": "hi"}', JSON).status == 200


def test_a_body_over_the_limit_is_a_413_declared_or_chunked(live):
    big = chat_body(messages=user("x" * LIMIT))
    assert_error(raw_request(live.port, "POST", CHAT, big, JSON), 413, f"limit of {LIMIT} bytes",
                 code="request_too_large")
    assert_serving(live)
    chunked = hex(len(big))[2:].encode() + b"\r\n" + big + b"\r\n0\r\n\r\n"
    r = raw_request(live.port, "POST", CHAT, chunked, {**JSON, "Transfer-Encoding": "chunked"})
    assert_error(r, 413, "larger than the server's limit", code="request_too_large")
    assert_serving(live)


def test_nested_tool_arguments_in_a_string_are_kept_as_text_not_parsed_deeply(live):
    deep = "[" * 50_000 + "]" * 50_000
    messages = [{"role": "user", "content": "x"},
                {"role": "assistant", "tool_calls": [{"type": "function",
                                                      "function": {"name": "f", "arguments": deep}}]},
                {"role": "tool", "content": "1"}]
    assert raw_request(live.port, "POST", CHAT, chat_body(messages=messages), JSON).status == 200


# ------------------------------------------------------------------------------------------------ content types
AS_JSON, AS_UTF8 = "send the body as application/json", "send the body as UTF-8"
BAD_TYPES = [
    ("text/plain", "text/plain", "Content-Type is 'text/plain'; " + AS_JSON),
    ("text/plain with charset", "text/plain;charset=UTF-8", AS_JSON),
    ("a form", "application/x-www-form-urlencoded", AS_JSON),
    ("multipart", "multipart/form-data; boundary=x", AS_JSON),
    ("a near miss", "application/jsonx", AS_JSON),
    ("json with latin-1", "application/json; charset=latin-1", "charset is 'latin-1'; " + AS_UTF8),
    ("missing", None, "Content-Type is missing; " + AS_JSON),
]  # fmt: skip


@pytest.mark.parametrize("content_type, words", [t[1:] for t in BAD_TYPES], ids=[t[0] for t in BAD_TYPES])
@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
def test_a_post_that_is_not_json_is_a_415(live, content_type, words, path):
    headers = {} if content_type is None else {"Content-Type": content_type}
    model = live.state.pool.first()
    served = len(model.sampling)
    r = raw_request(live.port, "POST", path, OK_BODY if path == CHAT else b'{"prompt": "hi"}', headers)
    assert_error(r, 415, words, code="unsupported_media_type")
    assert len(model.sampling) == served  # refused before anything reached the model
    assert_serving(live)


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "Application/JSON",
                                          'application/json;charset="UTF-8"'])
def test_json_with_parameters_is_accepted(live, content_type):
    assert raw_request(live.port, "POST", CHAT, OK_BODY, {"Content-Type": content_type}).status == 200


# ------------------------------------------------------------------------------------------------ Host header
@pytest.mark.parametrize("host", ["evil.test", "evil.test:8000", "127.0.0.1.evil.test", "localhost.evil.test",
                                  "[::2]", "[::1]x", "localhost:http", "", "0.0.0.0", "127.0.0.2"])
@pytest.mark.parametrize("method, path", [("GET", "/"), ("GET", "/health"), ("GET", "/v1/models"), ("POST", CHAT)])
def test_a_foreign_host_is_a_403_on_every_path(live, host, method, path):
    r = raw_request(live.port, method, path, OK_BODY if method == "POST" else b"", JSON, host=host)
    error = assert_error(r, 403, "is not allowed: this server answers only", code="host_not_allowed")
    assert "--allow-host" in error["message"]
    assert_serving(live)


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "LOCALHOST:1", "127.0.0.1", "127.0.0.1:80",
                                  "[::1]", "[::1]:8000", "localhost.", EXTRA_HOST, "MyHost.Test:9"])
def test_loopback_names_and_allowed_names_are_served(live, host):
    r = raw_request(live.port, "POST", CHAT, OK_BODY, JSON, host=host)
    assert r.status == 200, r.body
    page = raw_request(live.port, "GET", "/", host=host)
    assert page.status == 200 and b"<title>chatglm</title>" in page.body


def test_no_host_header_at_all_is_refused(live):
    answer = raw_http10(live.port, b"GET /v1/models HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403") and json.loads(body)["error"]["code"] == "host_not_allowed"
    assert_serving(live)


def test_without_a_host_list_every_host_is_served():
    with serve([ScriptedModel()], allowed_hosts=None) as other:
        assert raw_request(other.port, "POST", CHAT, OK_BODY, JSON, host="anything.test").status == 200


@pytest.mark.parametrize("header, name", [("localhost:8000", "localhost"), ("[::1]:80", "[::1]"), ("A.B.", "a.b"),
                                          ("[::1", None), ("x:y", None), (":80", None), ("", None)])
def test_host_name_of_a_header(header, name):
    assert host_name(header) == name


def test_the_host_check_applies_only_on_keyless_loopback():
    assert allowed_hosts("127.0.0.1", None, []) == LOOPBACK_HOSTS
    assert allowed_hosts("localhost", None, ["a.test", "B.test:80"]) == LOOPBACK_HOSTS + ("a.test", "b.test")
    assert allowed_hosts("::1", None, []) == LOOPBACK_HOSTS
    assert allowed_hosts("127.0.0.1", "key", []) is None
    assert allowed_hosts("0.0.0.0", None, []) is None
    for bad in ("a b", "", "evil.test/x", "[zz]"):
        with pytest.raises(InputError, match="--allow-host"):
            allowed_hosts("127.0.0.1", None, [bad])


# ------------------------------------------------------------------------------------------------ handler bugs
class MidStreamFailure(ScriptedModel):
    fail = True

    def stream_chat(self, messages, **kwargs):
        for i, piece in enumerate(super().stream_chat(messages, **kwargs)):
            if i == 1 and MidStreamFailure.fail:
                MidStreamFailure.fail = False
                raise KeyError("secret detail")
            yield piece


def test_a_failure_in_a_stream_ends_it_with_an_error_event_and_the_server_goes_on():
    with serve([MidStreamFailure()]) as other:
        r = raw_request(other.port, "POST", CHAT, chat_body(stream=True), JSON)
        assert r.status == 200
        events = [line[6:] for line in r.body.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["code"] == "internal_error" and "secret" not in error["message"]
        assert_serving(other)


def test_an_exception_in_any_handler_is_a_generic_json_500(caplog):
    app = create_app([ScriptedModel()], ServerConfig(model_id="tiny"))

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret detail")

    with LiveServer(app) as other:
        r = raw_request(other.port, "GET", "/boom")
        assert r.status == 500 and r.json() == {"error": {
            "message": "internal server error; the server's log has the details", "type": "server_error",
            "param": None, "code": "internal_error"}}
        assert_serving(other)
    assert any("GET /boom failed: RuntimeError: secret detail" in rec.getMessage() for rec in caplog.records)


def test_many_bad_requests_at_once_leave_the_server_serving(live):
    bodies = [b[1] for b in BODIES[:12]] * 2
    results: list[int] = []
    threads = [threading.Thread(target=lambda b=b: results.append(
        raw_request(live.port, "POST", CHAT, b, JSON).status)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(set(results)) == [400]
    assert_serving(live)


# ------------------------------------------------------------------------------------------------ the pure parser
def test_parse_request_checks_everything_without_a_socket():
    parsed = parse_request(OK_BODY, "application/json", CHAT)
    assert [(m.role, m.content) for m in parsed.messages] == [("user", "hi")]
    assert parse_request(b'{"prompt": "p"}', "application/json", "/v1/completions").request.prompt == "p"
    for body, content_type, status in [(b"[" * 10_000, "application/json", 400), (OK_BODY, "text/plain", 415),
                                       (b"{}" + b" " * 100, "application/json", 400)]:
        with pytest.raises(APIError) as info:
            parse_request(body, content_type, CHAT)
        assert info.value.status == status
    with pytest.raises(APIError) as info:
        parse_request(OK_BODY, "application/json", CHAT, limit=10)
    assert info.value.status == 413
    with pytest.raises(ValueError, match="no request parser"):
        parse_request(OK_BODY, "application/json", "/v1/embeddings")


# ------------------------------------------------------------------------------------------------ chatglm serve
def not_glm_gguf(path):
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")  # a valid GGUF of an architecture we do not run
    writer.add_context_length(128)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_load_error_is_one_line_exit_2_and_nothing_was_announced(tmp_path):
    path = not_glm_gguf(tmp_path / "llama.gguf")
    sources = digest([path])
    outcome = cli(["serve", path, "--port", "0"])
    assert_refused(outcome, path, code=2, problem="not a GLM model", sources=sources)
    assert "serving" not in outcome.text


def test_the_port_is_bound_but_nobody_answers_until_the_model_is_loaded():
    import socket

    sock = bind("127.0.0.1", 0)  # what serve holds while it loads: a taken port fails early, a client is refused
    try:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(sock.getsockname(), timeout=5).close()
    finally:
        sock.close()


@pytest.mark.parametrize("args, problem", [(["--allow-host", "a b"], "--allow-host 'a b': not a host name"),
                                           (["--allow-host", ""], "not a host name")])
def test_a_bad_allow_host_is_one_line_exit_2(tmp_path, args, problem):
    outcome = cli(["serve", not_glm_gguf(tmp_path / "m.gguf"), "--port", "0", *args])
    assert_refused(outcome, "--allow-host", code=2, problem=problem)
    assert "serving" not in outcome.text


def test_serve_is_ready_when_it_announces_and_checks_the_host(glm3_gguf):
    from test_server_cli import RUN_SERVE, StderrReader

    proc = subprocess.Popen([sys.executable, "-c", RUN_SERVE, str(glm3_gguf), "--port", "0", "--n-ctx", "128",
                             "--threads", "1", "--allow-host", "box.lan"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stderr = StderrReader(proc)
        port = int(re.search(r":(\d+)$", stderr.wait_url(60)).group(1))
        health = raw_request(port, "GET", "/health", host="box.lan:80")  # the first request after the announcement
        assert health.status == 200 and health.json()["status"] == "ok"
        assert_error(raw_request(port, "GET", "/health", host="rebound.evil"), 403, "not allowed",
                     code="host_not_allowed")
        assert_error(raw_request(port, "POST", CHAT, OK_BODY, {"Content-Type": "text/plain"}), 415,
                     "application/json", code="unsupported_media_type")
        r = raw_request(port, "POST", CHAT, chat_body(max_tokens=2), JSON, host="localhost")
        assert r.status == 200, r.body
    finally:
        proc.terminate()
        proc.wait(timeout=15)

"""The ASGI application: OpenAI-compatible endpoints and the chat page over a pool of loaded models.

``create_app(load_models, config)`` returns a FastAPI app. ``load_models`` is either the model instances (one per
``--parallel`` slot), already loaded, or a function that runs on a background thread at startup and returns them;
until it returns, ``/health`` and the generation endpoints answer 503. Every POST body passes
:func:`chatglm.server.body.parse_request`; with ``allowed_hosts`` set, requests for other Host names get a 403.
Each generation runs on a worker thread; the event loop only relays text, so a slow model never blocks ``/health``
or the queue.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, AsyncIterator, Callable, Optional, Sequence

from fastapi import APIRouter, Depends, FastAPI, Request
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from chatglm.errors import ChatGLMError, InputError
from chatglm.server import ollama
from chatglm.server.body import MAX_BODY_BYTES, ParsedRequest, check_content_type, parse_request, too_large
from chatglm.server.errors import APIError, internal, invalid
from chatglm.server.guard import CatchAll, HostGuard
from chatglm.server.mapping import (
    Outcome,
    chat_chunk,
    chat_completion,
    new_id,
    text_completion,
    tool_call_deltas,
    usage_chunk,
)
from chatglm.server.modelset import ModelSet, keep_alive_seconds
from chatglm.server.pool import CLOSED, ModelPool
from chatglm.server.strictjson import loads
from chatglm.server.worker import Generation, chat_job, completion_job

log = logging.getLogger(__name__)
PROJECT = __name__.partition(".")[0]  # the package's name: the app's title and the owner of the models it lists

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
            "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
PARSE_INLINE_BYTES = 64 << 10
DRAIN_LIMIT = 64 << 20  # an oversized body is read (and dropped) up to this much, so the client sees the 413


@dataclass(frozen=True)
class ServerConfig:
    model_id: str = PROJECT
    api_key: Optional[str] = None
    cors_origin: Optional[str] = None
    max_queue: int = 64  # requests waiting for an instance, besides those running
    max_body_bytes: int = MAX_BODY_BYTES
    on_load_failed: Optional[Callable[[BaseException], None]] = None
    allowed_hosts: Optional[tuple[str, ...]] = None  # Host names answered (any port); None: no Host check
    pull: Optional[Callable[[str], Any]] = None  # /api/pull: the store's pull (given by the CLI), or none
    # Serving the store: name -> (its canonical name, the loaded model); the store's (name, path) list; the most
    # models resident at once. None: the models given to create_app are served.
    open_model: Optional[Callable[[str], tuple[str, Any]]] = None
    list_store: Optional[Callable[[], list]] = None
    max_models: int = 1


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def page_html(max_body_bytes: int = MAX_BODY_BYTES) -> str:
    """The chat page, told the body limit (its ``max-body-bytes`` meta tag): it sends pictures as they are when the
    request fits, and scales down only those that would not."""
    page = resources.files("chatglm.server").joinpath("static/index.html").read_text(encoding="utf-8")
    return page.replace("__MAX_BODY_BYTES__", str(int(max_body_bytes)), 1)


@dataclass(frozen=True)
class Framing:
    """How a stream is written: OpenAI's server-sent events, or Ollama's JSON lines."""

    media_type: str
    encode: Callable[[dict], str]
    error: Callable[[APIError], dict]
    end: str = ""


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


SSE = Framing("text/event-stream", sse, APIError.body, "data: [DONE]\n\n")


async def read_body(request: Request, limit: int) -> bytes:
    """The request's raw body after its Content-Type is checked (415); 413 past ``limit`` bytes."""
    check_content_type(request.headers.get("content-type", ""))
    declared = request.headers.get("content-length", "")
    too_big = declared.isdigit() and int(declared) > limit
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
        if too_big and size > DRAIN_LIMIT:
            break
        if not too_big:
            chunks.append(chunk)
    if too_big:
        raise too_large(limit)
    return b"".join(chunks)


async def read_request(request: Request, route: str, limit: int) -> ParsedRequest:
    """The validated request of a POST to ``route`` (every check of :func:`chatglm.server.body.parse_request`)."""
    body = await read_body(request, limit)
    args = (body, request.headers.get("content-type", ""), route, limit)
    if len(body) > PARSE_INLINE_BYTES:  # a big body is parsed on a thread, so /health and streams go on meanwhile
        return await asyncio.to_thread(parse_request, *args)
    return parse_request(*args)


async def until_disconnect(request: Request, awaitable) -> Any:
    """Await ``awaitable``; if the client disconnects first, cancel it and raise :class:`ClientGone`."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    raise ClientGone()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class Server:
    """The state behind one app: config, pool, executor, the generations in flight."""

    def __init__(self, load_models: Callable[[], Sequence[Any]] | Sequence[Any], config: ServerConfig,
                 parallel: int):
        self.config, self.load_models = config, load_models
        self.pool: ModelPool = ModelPool(config.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=max(1, parallel), thread_name_prefix="chatglm-gen")
        self.active: set[Generation] = set()
        self.started = time.time()
        self.modelset = (ModelSet(config.open_model, config.max_models, config.max_queue)
                         if config.open_model is not None else None)

    async def pool_for(self, name: Optional[str], keep_alive: Any = None) -> tuple[str, ModelPool]:
        """The pool a request's model runs on: the store's model of that name (serving the store), else the one
        pool (any name accepted, answered with the served model's id)."""
        if self.modelset is None:
            return self.config.model_id, self.pool
        if not name:
            raise invalid("model is required: name a model of the store (GET /api/tags lists them)", "model")
        return await self.modelset.pool(name, keep_alive_seconds(keep_alive))

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> Optional[threading.Thread]:
        """Ready at once with models loaded beforehand; otherwise start loading them on a thread."""
        if self.modelset is not None or not callable(self.load_models):
            self.pool.set_ready([] if self.modelset is not None else list(self.load_models))
            return None
        return self.start_loading(loop)

    def start_loading(self, loop: asyncio.AbstractEventLoop) -> threading.Thread:
        def work() -> None:
            try:
                models = list(self.load_models())
            except Exception as exc:  # reported on /health and to the CLI; the server stays up to say so
                log.error("loading the model failed: %s", exc)
                loop.call_soon_threadsafe(self._load_failed, exc)
                return
            try:
                loop.call_soon_threadsafe(self._loaded, models)
            except RuntimeError:  # the event loop is gone: shut down while we were loading
                close_all(models)

        thread = threading.Thread(target=work, name="chatglm-load", daemon=True)
        thread.start()
        return thread

    def _loaded(self, models: list[Any]) -> None:
        if self.pool.state == CLOSED:
            close_all(models)
        else:
            self.pool.set_ready(models)

    def _load_failed(self, exc: BaseException) -> None:
        self.pool.set_failed(str(exc))
        if self.config.on_load_failed is not None:
            self.config.on_load_failed(exc)

    def shutdown(self) -> None:
        self.pool.close()
        for gen in list(self.active):
            gen.close()
        self.executor.shutdown(wait=True)
        close_all(self.pool.models)
        if self.modelset is not None:
            self.modelset.close()

    # -- requests -----------------------------------------------------------------------------------------------
    async def authorize(self, request: Request) -> None:
        key = self.config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid API key: send 'Authorization: Bearer <key>' with the server's --api-key",
                           code="invalid_api_key")

    async def respond(self, request: Request, gen: Generation, stream: bool,
                      whole: Callable[[Outcome], dict], chunks: Callable[[Generation], AsyncIterator[dict]],
                      framing: "Framing" = None):
        framing = framing or SSE
        self.active.add(gen)
        streaming = False
        try:
            await until_disconnect(request, gen.start())
            if stream:
                streaming = True
                return StreamingResponse(self._stream(gen, chunks, framing), media_type=framing.media_type,
                                         headers=SSE_HEADERS, background=BackgroundTask(self._end, gen))
            return JSONResponse(whole(await until_disconnect(request, gen.outcome())))
        except ClientGone:
            log.info("client disconnected; generation cancelled")
            return Response(status_code=499)
        finally:
            if not streaming:
                self._end(gen)

    async def _stream(self, gen: Generation, chunks: Callable[[Generation], AsyncIterator[dict]],
                      framing: "Framing") -> AsyncIterator[str]:
        try:
            async for obj in chunks(gen):
                yield framing.encode(obj)
        except APIError as exc:
            yield framing.encode(framing.error(exc))
        except Exception as exc:  # a bug mid-stream: the client gets an error event and a clean end
            log.error("streaming failed: %s: %s", type(exc).__name__, exc)
            yield framing.encode(framing.error(internal()))
        finally:
            self._end(gen)  # on a disconnect Starlette cancels us: the model stops before its next token
        if framing.end:
            yield framing.end

    def _end(self, gen: Generation) -> None:
        gen.close()
        self.active.discard(gen)


def close_all(models: Sequence[Any]) -> None:
    for m in models:
        close = getattr(m, "close", None)
        if close is not None:
            close()


def create_app(load_models: Callable[[], Sequence[Any]] | Sequence[Any], config: ServerConfig = ServerConfig(),
               parallel: int = 1) -> FastAPI:
    """The app serving the models ``load_models()`` returns (called once, on a thread, at startup), or the models
    given (already loaded: the app is ready from its first request)."""
    server = Server(load_models, config, parallel)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        loader = server.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            server.shutdown()
            if loader is not None:
                loader.join(timeout=0.1)

    app = FastAPI(title=PROJECT, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _install_error_handlers(app)
    if config.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=[config.cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    if config.allowed_hosts is not None:
        app.add_middleware(HostGuard, allowed=config.allowed_hosts)
    app.add_middleware(CatchAll)  # added last: the outermost of ours, so it also covers the two above
    page = page_html(config.max_body_bytes)

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> JSONResponse:
        status = server.pool.status()
        return JSONResponse(status, status_code=200 if status["status"] == "ok" else 503)

    app.include_router(_v1_router(server), prefix="/v1")
    app.include_router(_ollama_router(server), prefix="/api")
    return app


NDJSON = Framing("application/x-ndjson", lambda obj: json.dumps(obj, ensure_ascii=False) + "\n", ollama.error_body)


def _ollama_router(server: Server) -> APIRouter:
    """Ollama's API (``/api/...``) over the same pool: chat and generate (NDJSON streams), tags, show, ps, version."""
    router = APIRouter(dependencies=[Depends(server.authorize)])
    model_id = server.config.model_id
    limit = server.config.max_body_bytes

    def check(name: Optional[str]) -> str:
        if name not in (model_id, f"{model_id}:latest"):
            raise ollama.not_found(name or "")
        return name

    def card(name: str, info: Any) -> dict:
        st = info.path.stat()
        digest = hashlib.sha256(f"{info.path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
        return ollama.model_card(name, info, _file_type(info.path), st.st_mtime, digest)

    def stored() -> dict[str, Any]:
        """Serving the store: every stored model's name and header description."""
        from chatglm.gguf_file import read_header
        from chatglm.runtime.loader import describe

        return {name: describe(read_header(path)) for name, path in server.config.list_store()}

    def served() -> tuple[Any, dict]:
        m = server.pool.first()
        if m is None:
            raise server.pool.unavailable()
        return m.info, card(model_id, m.info)

    def resident() -> list[tuple[str, Any]]:
        if server.modelset is not None:
            return [(r.name, r.model.info) for r in server.modelset.resident.values()]
        return [(model_id, server.pool.first().info)] if server.pool.first() is not None else []

    async def parsed_and_pool(request: Request, route: str):
        body = await read_body(request, limit)
        parsed = parse_request(body, request.headers.get("content-type", ""), route, limit)
        if server.modelset is None:
            return parsed, check(parsed.request.model), server.pool
        raw = loads(body)
        name, pool = await server.pool_for(parsed.request.model, raw.get("keep_alive"))
        return parsed, name, pool

    @router.get("/version")
    async def version() -> dict:
        from chatglm import __version__

        return {"version": __version__}

    @router.get("/tags")
    async def tags() -> dict:
        if server.modelset is not None:
            return {"models": [card(name, info) for name, info in (await asyncio.to_thread(stored)).items()]}
        return {"models": [served()[1]] if server.pool.first() is not None else []}

    @router.get("/ps")
    async def ps() -> dict:
        return {"models": [{**card(name, info), "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": info.n_ctx} for name, info in resident()]}

    @router.post("/show")
    async def show(request: Request) -> dict:
        body = loads(await read_body(request, limit))
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if server.modelset is not None:
            infos = await asyncio.to_thread(stored)
            key = next((k for k in infos if name in (k, f"{k}:latest")), None)
            if key is None:
                raise ollama.not_found(name if isinstance(name, str) else "")
            info, card_ = infos[key], card(key, infos[key])
        else:
            check(name if isinstance(name, str) else None)
            info, card_ = served()
        return {"modelfile": "", "parameters": "", "template": info.chat_template, "details": card_["details"],
                "model_info": {"general.architecture": info.arch, "general.parameter_count": info.n_params,
                               f"{info.arch}.context_length": info.n_ctx_train},
                "capabilities": ["completion"], "modified_at": card_["modified_at"]}

    @router.post("/pull")
    async def pull(request: Request):
        body = loads(await read_body(request, limit))
        name = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise invalid("model is required", "model")
        if server.config.pull is None:
            raise APIError(501, "this server does not pull models", code="not_implemented")
        try:
            entry = await asyncio.to_thread(server.config.pull, name)
        except ChatGLMError as exc:
            raise APIError(400 if isinstance(exc, InputError) else 500, str(exc), code="pull_failed") from None
        done = [{"status": f"pulled {entry.ref}"}, {"status": "success"}]
        if isinstance(body, dict) and body.get("stream") is False:
            return done[-1]
        return StreamingResponse(iter([NDJSON.encode(x) for x in done]), media_type=NDJSON.media_type)

    @router.post("/chat")
    async def chat(request: Request):
        parsed, name, pool = await parsed_and_pool(request, "/api/chat")
        req, started = parsed.request, time.monotonic()
        gen = Generation(pool, server.executor, chat_job(parsed.messages, req.sampling_kwargs(), req.stops(),
                                                                req.template_kwargs()))
        return await server.respond(request, gen, req.stream, lambda out: ollama.chat_reply(name, out, started),
                                    lambda g: _ollama_chat_lines(g, name, started), NDJSON)

    @router.post("/generate")
    async def generate(request: Request):
        parsed, name, pool = await parsed_and_pool(request, "/api/generate")
        req, started = parsed.request, time.monotonic()
        job = (chat_job(parsed.messages, req.sampling_kwargs(), req.stops(), req.template_kwargs())
               if parsed.messages is not None else completion_job(req.prompt_text(), req.sampling_kwargs(),
                                                                  req.stops()))
        gen = Generation(pool, server.executor, job)
        return await server.respond(request, gen, req.stream, lambda out: ollama.generate_reply(name, out, started),
                                    lambda g: _ollama_generate_lines(g, name, started), NDJSON)

    return router


def _file_type(path) -> Optional[str]:
    import gguf

    from chatglm.gguf_file import read_header

    value = read_header(path).get("general.file_type")
    names = {f.value: f.name.removeprefix("MOSTLY_") for f in gguf.LlamaFileType}
    return names.get(value) if isinstance(value, int) else None


async def _ollama_chat_lines(gen: Generation, name: str, started: float) -> AsyncIterator[dict]:
    out = Outcome()
    async for kind, value in gen.events():
        if kind in ("delta", "reasoning"):
            yield ollama.chat_line(name, value, thinking=kind == "reasoning")
        else:
            out = value
    yield ollama.chat_reply(name, replace(out, content="", reasoning=""), started)


async def _ollama_generate_lines(gen: Generation, name: str, started: float) -> AsyncIterator[dict]:
    out = Outcome()
    async for kind, value in gen.events():
        if kind == "delta":
            yield ollama.generate_line(name, value)
        elif kind != "reasoning":
            out = value
    yield ollama.generate_reply(name, out, started, text="")


def _v1_router(server: Server) -> APIRouter:
    router = APIRouter(dependencies=[Depends(server.authorize)])
    model_id = server.config.model_id

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": int(server.started), "owned_by": PROJECT}

    @router.get("/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @router.get("/models/{name:path}")
    async def model(name: str) -> dict:
        if name != model_id:
            raise APIError(404, f"the model {name[:100]!r} does not exist; this server serves {model_id!r}",
                           code="model_not_found", param="model")
        return model_card()

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        parsed = await read_request(request, "/v1/chat/completions", server.config.max_body_bytes)
        req = parsed.request
        served_id, pool = await server.pool_for(req.model)
        gen = Generation(pool, server.executor, chat_job(parsed.messages, req.sampling_kwargs(), req.stops(),
                                                                req.template_kwargs()))
        rid = new_id("chatcmpl")
        return await server.respond(request, gen, req.stream, lambda out: chat_completion(rid, served_id, out),
                                    lambda g: chat_chunks(g, rid, served_id, req.include_usage()))

    @router.post("/completions")
    async def completions(request: Request):
        req = (await read_request(request, "/v1/completions", server.config.max_body_bytes)).request
        served_id, pool = await server.pool_for(req.model)
        gen = Generation(pool, server.executor, completion_job(req.prompt_text(), req.sampling_kwargs(),
                                                                      req.stops()))
        rid = new_id("cmpl")
        return await server.respond(
            request, gen, req.stream,
            lambda out: text_completion(rid, served_id, out.content, out.finish_reason, out.usage()),
            lambda g: completion_chunks(g, rid, served_id, req.include_usage()))

    return router


async def chat_chunks(gen: Generation, rid: str, model_id: str, include_usage: bool) -> AsyncIterator[dict]:
    created = int(time.time())
    yield chat_chunk(rid, model_id, {"role": "assistant", "content": ""}, created=created)
    out = Outcome()
    async for kind, value in gen.events():
        if kind == "delta":
            yield chat_chunk(rid, model_id, {"content": value}, created=created)
        elif kind == "reasoning":
            yield chat_chunk(rid, model_id, {"reasoning_content": value}, created=created)
        else:
            out = value
    if out.tool_calls:
        yield chat_chunk(rid, model_id, {"tool_calls": tool_call_deltas(out.tool_calls)}, created=created)
    yield chat_chunk(rid, model_id, {}, out.finish_reason, created=created)
    if include_usage:
        yield usage_chunk(rid, model_id, out, created=created)


async def completion_chunks(gen: Generation, rid: str, model_id: str, include_usage: bool) -> AsyncIterator[dict]:
    created = int(time.time())
    out = Outcome()
    async for kind, value in gen.events():
        if kind == "delta":
            yield text_completion(rid, model_id, value, None, created=created)
        else:
            out = value
    yield text_completion(rid, model_id, "", out.finish_reason, out.usage() if include_usage else None,
                          created=created)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        if request.url.path.startswith("/api/"):  # Ollama's routes answer in Ollama's shape
            return JSONResponse(ollama.error_body(exc), status_code=exc.status, headers=exc.headers)
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return await api_error(request, APIError(exc.status_code, str(exc.detail), code=None))

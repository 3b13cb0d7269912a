"""The Ollama API's shapes: its request bodies in the OpenAI ones the server already checks, and its replies.

``/api/chat`` and ``/api/generate`` bodies become ``/v1/chat/completions`` and ``/v1/completions`` bodies (``options``
to the sampling fields, ``num_predict`` to ``max_tokens``, base64 ``images`` to image parts), so every check the
OpenAI routes make applies; Ollama's options that do not steer sampling (``num_ctx``, ``num_thread``, ...) are the
server's to set and are ignored, as Ollama ignores unknown ones. Replies are Ollama's NDJSON lines (``stream`` is true
unless the body says false) and its error shape, ``{"error": "..."}``.
"""

from __future__ import annotations

import time
from typing import Any, Optional

from chatglm.server.errors import APIError, invalid
from chatglm.server.mapping import Outcome

OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "repeat_penalty": "repeat_penalty",
           "repeat_last_n": "repeat_last_n", "seed": "seed", "num_predict": "max_tokens", "stop": "stop"}
_COMMON = ("model", "stream", "options", "keep_alive", "format", "think", "tools", "raw", "template", "context",
           "images", "suffix", "truncate", "shift", "logprobs", "top_logprobs")


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise invalid("model is required", "model")
    return body


def _sampling(body: dict) -> dict:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise invalid("options must be an object", "options")
    out = {OPTIONS[k]: v for k, v in options.items() if k in OPTIONS}
    if out.get("max_tokens") in (-1, -2):  # Ollama: -1 infinite, -2 fill the context
        del out["max_tokens"]
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise invalid("stream must be true or false", "stream")
    return {**out, "stream": stream, "model": body["model"]}


def _message(raw: Any, i: int) -> Any:
    if not isinstance(raw, dict):
        return raw  # the OpenAI parser says what is wrong with it
    images = raw.get("images")
    if not images:
        return {k: v for k, v in raw.items() if k != "images"}
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise invalid("images must be a list of base64 strings", f"messages[{i}].images")
    # Ollama puts a message's images before its text
    parts = [{"type": "image_url", "image_url": {"url": f"data:image/png;base64,{x}"}} for x in images]
    parts.append({"type": "text", "text": raw.get("content") or ""})
    return {**{k: v for k, v in raw.items() if k != "images"}, "content": parts}


def chat_body(body: Any) -> dict:
    """An ``/api/chat`` body as a ``/v1/chat/completions`` one."""
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("messages must be a list", "messages")
    out = {**_sampling(body), "messages": [_message(m, i) for i, m in enumerate(messages)]}
    if body.get("tools"):
        out["tools"] = body["tools"]
    if isinstance(body.get("think"), bool):
        out["chat_template_kwargs"] = {"enable_thinking": body["think"]}
    return out


def generate_body(body: Any) -> tuple[dict, bool]:
    """An ``/api/generate`` body: as ``/v1/chat/completions`` (a user turn, after ``system``) unless ``raw``, then as
    ``/v1/completions``; the flag says which."""
    body = _object(body)
    prompt = body.get("prompt", "")
    if not isinstance(prompt, str):
        raise invalid("prompt must be a string", "prompt")
    if body.get("raw"):
        return {**_sampling(body), "prompt": prompt}, False
    system = body.get("system")
    messages = ([{"role": "system", "content": system}] if isinstance(system, str) and system else [])
    messages.append(_message({"role": "user", "content": prompt, "images": body.get("images")}, 0))
    return {**_sampling(body), "messages": messages}, True


def error_body(exc: APIError) -> dict:
    return {"error": exc.message}


def not_found(name: str) -> APIError:
    return APIError(404, f"model '{name[:200]}' not found", code="model_not_found", param="model")


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())


def _final(out: Outcome, started: float) -> dict:
    total = int((time.monotonic() - started) * 1e9)
    return {"done": True, "done_reason": "length" if out.finish_reason == "length" else "stop",
            "total_duration": total, "load_duration": 0, "prompt_eval_count": out.prompt_tokens,
            "prompt_eval_duration": 0, "eval_count": out.completion_tokens, "eval_duration": total}


def chat_reply(model: str, out: Outcome, started: float) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": out.content}
    if out.reasoning:
        message["thinking"] = out.reasoning
    if out.tool_calls:
        message["tool_calls"] = [{"function": {"name": c.name, "arguments": c.arguments}} for c in out.tool_calls]
    return {"model": model, "created_at": now(), "message": message, **_final(out, started)}


def chat_line(model: str, text: str, thinking: bool = False) -> dict:
    return {"model": model, "created_at": now(),
            "message": {"role": "assistant", "content": "", "thinking": text} if thinking else
            {"role": "assistant", "content": text}, "done": False}


def generate_reply(model: str, out: Outcome, started: float, text: Optional[str] = None) -> dict:
    reply = {"model": model, "created_at": now(), "response": out.content if text is None else text,
             **_final(out, started)}
    if out.reasoning and text is None:
        reply["thinking"] = out.reasoning
    return reply


def generate_line(model: str, text: str) -> dict:
    return {"model": model, "created_at": now(), "response": text, "done": False}


def details(info: Any, file_type: Optional[str]) -> dict:
    """Ollama's ``details`` of a model from its ModelInfo."""
    from chatglm.runtime.memory import params_text

    return {"parent_model": "", "format": "gguf", "family": info.family, "families": [info.family],
            "parameter_size": params_text(info.n_params), "quantization_level": (file_type or "").upper()}


def model_card(name: str, info: Any, file_type: Optional[str], modified: float, digest: str) -> dict:
    return {"name": name, "model": name, "modified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(modified)),
            "size": info.size_bytes, "digest": digest, "details": details(info, file_type)}

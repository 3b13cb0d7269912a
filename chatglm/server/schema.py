"""The request bodies the server accepts, as pydantic models of OpenAI's chat and completion APIs.

Fields OpenAI defines that do not change what a local model does (``user``, ``metadata``, ``store``,
``presence_penalty``, ``frequency_penalty``, ``logit_bias``, ``parallel_tool_calls``, ...) are accepted and ignored;
fields that would change the answer in a way we cannot honour (``n`` > 1, ``logprobs``, a JSON ``response_format``,
``echo``, ``suffix``, ``best_of`` > 1) are refused with a 400 rather than silently dropped. ``top_k``,
``repeat_penalty`` and ``repeat_last_n`` are accepted as extensions, as llama.cpp's server does. The sampling fields
are :class:`~chatglm.runtime.sampling.SamplingParams`'s (a test checks that every one of them is here).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from chatglm.runtime.sampling import MAX_TOP_K, knobs
from chatglm.server.errors import APIError, invalid

MAX_STOPS = 4
MAX_STOP_CHARS = 512  # a stop string is held back while it might match: its length bounds the work per token
MAX_MESSAGES = 10_000
MAX_TOOLS = 256
MAX_TOKENS = (1 << 31) - 1  # llama.cpp counts tokens in int32; any context is far smaller
MAX_SEED = (1 << 64) - 1  # the native sampler uses the low 32 bits, numpy's generator any unsigned value
MAX_PENALTY = 1e6


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class FunctionDef(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None


class ToolDef(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: NamedFunction


class StreamOptions(_Lenient):
    include_usage: bool = False


class Sampling(_Lenient):
    """The sampling fields shared by both endpoints."""

    model: Optional[str] = None
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    top_k: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_K)
    repeat_penalty: Optional[float] = Field(default=None, gt=0, le=MAX_PENALTY)
    repeat_last_n: Optional[int] = Field(default=None, ge=0, le=MAX_TOKENS)
    max_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS)
    seed: Optional[int] = Field(default=None, ge=0, le=MAX_SEED)
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[int] = Field(default=None, ge=1, le=1)

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value):
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > MAX_STOPS or any(not s for s in stops)):
            raise ValueError(f"give at most {MAX_STOPS} non-empty stop strings")
        if stops is not None and any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop string may be at most {MAX_STOP_CHARS} characters long")
        return value

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Model.chat`` / ``stream_chat`` / ``generate`` (only the fields given)."""
        return {k: getattr(self, k) for k in knobs() if getattr(self, k) is not None}


class ChatRequest(Sampling):
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=MAX_TOKENS)
    tools: Optional[list[ToolDef]] = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = None
    logprobs: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    # Template options, as vLLM's and llama.cpp's servers take them (enable_thinking, clear_thinking, ...).
    chat_template_kwargs: Optional[dict[str, Any]] = Field(default=None, max_length=32)
    reasoning_effort: Optional[Literal["low", "medium", "high", "max"]] = None

    def sampling_kwargs(self) -> dict[str, Any]:
        out = super().sampling_kwargs()
        if self.max_tokens is None and self.max_completion_tokens is not None:
            out["max_tokens"] = self.max_completion_tokens
        return out

    def template_kwargs(self) -> dict[str, Any]:
        """The template options of this request (OpenAI's ``medium`` effort is GLM-5.3-Flash's default, max)."""
        out = dict(self.chat_template_kwargs or {})
        if self.reasoning_effort is not None:
            out["reasoning_effort"] = "max" if self.reasoning_effort == "medium" else self.reasoning_effort
        return out


class CompletionRequest(Sampling):
    prompt: Union[str, list[str]]
    echo: Optional[bool] = None
    suffix: Optional[str] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = Field(default=None, ge=1, le=1)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise invalid("give one prompt per request (a string, or a list holding one string)", "prompt")
        return self.prompt[0]


def parse_chat(body: Any) -> ChatRequest:
    req = _validate(ChatRequest, body)
    if req.logprobs:
        raise invalid("logprobs are not supported by this server", "logprobs")
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        raise invalid(f"response_format {fmt!r} is not supported; only 'text'", "response_format")
    if req.tool_choice == "required":
        raise invalid("tool_choice 'required' is not supported: a GLM model cannot be forced to call a tool; "
                      "use 'auto' (or name one function to offer only that one)", "tool_choice")
    return req


def parse_completion(body: Any) -> CompletionRequest:
    req = _validate(CompletionRequest, body)
    for name in ("echo", "suffix", "logprobs"):
        if getattr(req, name):
            raise invalid(f"{name} is not supported by this server", name)
    return req


def _validate(model: type[BaseModel], body: Any):
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise APIError(400, f"{where}: {first.get('msg', 'invalid value')}", param=where) from None

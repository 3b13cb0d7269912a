"""The general chat path: the GGUF's own Jinja chat template, rendered in a sandbox the way transformers renders it.

A model whose template we have no token-exact builder for (see ``families.recognise_template``) still gets the
prompt its checkpoint defines: ``tokenizer.chat_template`` is rendered with jinja2's ``ImmutableSandboxedEnvironment``
and transformers' settings (``trim_blocks``, ``lstrip_blocks``, ``loopcontrols``, its ``tojson`` filter,
``raise_exception``, ``strftime_now``, the ``{% generation %}`` tag as a no-op), then tokenized as
``apply_chat_template`` tokenizes: the text is split at the vocabulary's added tokens (control and user-defined),
each one becomes its id and each stretch between them is encoded as text.

A template is user input. Besides the sandbox (no ``''.__class__``, no attribute of a function, no mutation), the
render is bounded: the template's size, the rendered text's size, the length of any string or list a step makes,
the number of steps (attribute lookups, calls, ``range`` items), and wall-clock time. Each refusal is one
:class:`InputError` line.
"""

from __future__ import annotations

import json
import re
import threading
import time
from datetime import datetime
from functools import lru_cache
from typing import Any, Optional, Sequence

from chatglm.errors import InputError
from chatglm.limits import MAX_CHAT_TEMPLATE
from chatglm.runtime.messages import Message, in_order, tools_only
from chatglm.runtime.prompts import ChatFormat, Tokenizer, get_format
from chatglm.runtime.prompts_glm import GLM4_STOPS, XmlReplies
from chatglm.schema import keys

JINJA_FORMAT = keys.JINJA_CHAT_FORMAT  # the format name of this path (``chat_format="jinja"`` forces it)
MAX_TEMPLATE = MAX_CHAT_TEMPLATE
MAX_OUTPUT = 1 << 23  # characters of rendered text, and of any one string or list a step builds
MAX_STEPS = 2_000_000  # attribute lookups + calls + range() items in one render
MAX_SECONDS = 5.0  # wall clock of one render


def _environment():
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """transformers' ``{% generation %}...{% endgeneration %}`` (it marks assistant text): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(("*", "**", "%", "+"))

        budget = threading.local()  # per render, per thread: [steps, deadline]

        def start(self) -> None:
            self.budget.state = [0, time.monotonic() + MAX_SECONDS]

        def tick(self, value: Any = None) -> Any:
            state = self.budget.state
            state[0] += 1
            if state[0] > MAX_STEPS:
                raise _Bound(f"more than {MAX_STEPS:,} steps")
            if not state[0] % 1024 and time.monotonic() > state[1]:
                raise _Bound(f"longer than {MAX_SECONDS:g} s")
            if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_OUTPUT:
                raise _Bound(f"a value longer than {MAX_OUTPUT:,}")
            return value

        def getattr(self, obj, attribute):
            return self.tick(super().getattr(obj, attribute))

        def getitem(self, obj, argument):
            return self.tick(super().getitem(obj, argument))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
            __self.tick()
            return __self.tick(super().call(__context, __obj, *args, **kwargs))

        def call_binop(self, context, operator, left, right):
            _check_binop(operator, left, right)
            return self.tick(super().call_binop(context, operator, left, right))

    def bounded_range(*args):
        for item in range(*args):
            env.tick()
            yield item

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, range=bounded_range)
    return env


class _Bound(Exception):
    """A render went past one of the bounds."""


def _size(value: Any) -> int:
    return len(value) if isinstance(value, (str, list, tuple)) else 0


_WIDTH = re.compile(r"%[-#0 +]*(\d+)|%[-#0 +]*\*")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse, before computing it, an operation whose result would be huge (``'x' * 10**9``, ``9 ** 9 ** 9``)."""
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if _size(seq) and isinstance(n, int) and _size(seq) * max(n, 0) > MAX_OUTPUT:
                raise _Bound(f"a value longer than {MAX_OUTPUT:,}")
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right * abs(left).bit_length() > 4096:
            raise _Bound("a number too large")
    elif operator == "%" and isinstance(left, str):
        widths = [m.group(1) for m in _WIDTH.finditer(left)]
        if any(w is None or len(w) > 6 for w in widths):
            raise _Bound("a format width too large")
    elif operator == "+" and _size(left) + _size(right) > MAX_OUTPUT:
        raise _Bound(f"a value longer than {MAX_OUTPUT:,}")


def compile_template(template: str):
    """The compiled template, or one InputError line for a template too large or not Jinja."""
    if not isinstance(template, str):
        raise InputError("the chat template is not text")
    if len(template.encode("utf-8", "surrogatepass")) > MAX_TEMPLATE:
        raise InputError(f"the chat template is larger than {MAX_TEMPLATE:,} bytes")
    return _compiled(template)


@lru_cache(maxsize=16)
def _compiled(template: str):
    import jinja2

    try:
        return _env().from_string(template)
    except (jinja2.TemplateError, RecursionError, MemoryError, ValueError) as exc:
        raise InputError(f"the chat template is not valid Jinja: {one_line(exc)}") from None


@lru_cache(maxsize=1)
def _env():
    return _environment()


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def render(template: str, messages: Sequence[dict], tools: Optional[list] = None, add_generation_prompt: bool = True,
           **kwargs: Any) -> str:
    """The template rendered as ``apply_chat_template(..., tokenize=False)`` renders it, within the bounds."""
    import jinja2

    compiled = compile_template(template)
    env = compiled.environment
    env.start()
    out: list[str] = []
    size = 0
    try:
        for chunk in compiled.generate(messages=list(messages), tools=tools, documents=None,
                                       add_generation_prompt=add_generation_prompt, **kwargs):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise _Bound(f"output longer than {MAX_OUTPUT:,} characters")
            env.tick()
            out.append(chunk)
    except _Bound as exc:
        raise InputError(f"the chat template went past a bound: {exc}") from None
    except jinja2.exceptions.SecurityError as exc:
        raise InputError(f"the chat template did something unsafe: {one_line(exc)}") from None
    except jinja2.TemplateError as exc:
        raise InputError(f"the chat template refused the conversation: {one_line(exc)}") from None
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise InputError(f"the chat template went past a bound: {type(exc).__name__}") from None
    except Exception as exc:  # a template's own type errors (calling .items() on a string...): still its problem
        raise InputError(f"the chat template failed: {type(exc).__name__}: {one_line(exc)}") from None
    return "".join(out)


# -- messages as transformers takes them ---------------------------------------------------------------------------


def _arguments(value: Any) -> Any:
    """A tool call's arguments as templates iterate them: a mapping (a JSON object string is parsed)."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except (ValueError, RecursionError):
            return value
        return parsed if isinstance(parsed, dict) else value
    return value


def hf_messages(messages: Sequence[Message]) -> tuple[list[dict], Optional[list]]:
    """(messages, tools) in the OpenAI/transformers shape: ``tool`` role, ``reasoning_content``, ``tool_calls`` as
    ``{"id", "type": "function", "function": {"name", "arguments"}}``; a system message that only carries tools gives
    the tools, not a message. An assistant turn that only calls tools has content ``""``, not ``None``: the GLM-4.x
    templates and GLM-5.3-Flash's 04c4e9e9 write a None content as the text "None"."""
    out: list[dict] = []
    tools: list = []
    for m in messages:
        if m.tools:
            tools += list(m.tools)
            if tools_only(m):
                continue
        d: dict[str, Any] = {"role": "tool" if m.role == "observation" else m.role, "content": m.content}
        if m.media:  # transformers' content parts, each medium where it stands in the text
            d["content"] = [{"type": "text", "text": x} if isinstance(x, str) else {"type": x.kind}
                            for x in in_order(m)]
        if m.role == "assistant":
            if m.thinking:
                d["reasoning_content"] = m.thinking
            if m.tool_calls:
                d["tool_calls"] = [{**({"id": c.id} if c.id else {}), "type": "function",
                                    "function": {"name": c.name, "arguments": _arguments(c.arguments)}}
                                   for c in m.tool_calls]
        if m.tool_call_id:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out, (tools or None)


def template_kwargs(options: dict) -> dict:
    """The template options that are set (``None`` means: as the template defaults)."""
    return {k: v for k, v in options.items() if v is not None}


def added_token_ids(text: str, added: dict[str, int], tok: Tokenizer) -> list[int]:
    """``text`` tokenized as transformers does: added tokens (longest first) as ids, the stretches between as text."""
    if not added:
        return tok.tokenize(text) if text else []
    pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
    ids: list[int] = []
    pos = 0
    for match in pattern.finditer(text):
        if match.start() > pos:
            ids += tok.tokenize(text[pos:match.start()])
        ids.append(added[match.group()])
        pos = match.end()
    if pos < len(text):
        ids += tok.tokenize(text[pos:])
    return ids


class JinjaFormat(XmlReplies, ChatFormat):
    """The GGUF's template, sandboxed; replies parsed as GLM's (``<think>``, XML tool calls) where the markers are
    in the vocabulary, else taken as text."""

    name = JINJA_FORMAT
    stop_tokens = GLM4_STOPS
    openai_tools = True
    places_media = True

    def __init__(self, special: dict[str, int], template: str, added: Optional[dict[str, int]] = None):
        super().__init__(special)
        compile_template(template)  # refused now, not at the first prompt
        self.template = template
        self.added = dict(added or special)  # a file without token types: the known special tokens

    def prompt_ids(self, messages: Sequence[Message], tok: Tokenizer) -> list[int]:
        if not messages:
            raise InputError("empty conversation: give at least one user message")
        hf, tools = hf_messages(messages)
        text = render(self.template, hf, tools, True, **template_kwargs(self.options))
        self.thinks = text.rstrip().endswith("<think>")  # the reply starts inside the thinking
        return added_token_ids(text, self.added, tok)


def chat_format(name: str, special: dict[str, int], template: str = "",
                added: Optional[dict[str, int]] = None) -> ChatFormat:
    """The format ``name`` (:func:`~chatglm.runtime.prompts.get_format`), or for ``jinja`` the GGUF's own
    ``template``, sandboxed, with the vocabulary's ``added`` tokens kept whole."""
    if name != JINJA_FORMAT:
        return get_format(name, special)
    if not template:
        raise InputError("the jinja chat format needs the model's chat template, and this GGUF carries none")
    return JinjaFormat(special, template, added)


def media_format(fmt: ChatFormat, special: dict[str, int], template: str = "",
                 added: Optional[dict[str, int]] = None) -> Optional[ChatFormat]:
    """The format that renders conversations holding images or audio: ``fmt`` when it places media (the Jinja path,
    GLM-5.3-Flash's ``glm53flash``); else, for a builder that reproduces the checkpoint's template for text alone
    (``renders_template``), that template itself, sandboxed (it writes each image part where it stands, as
    ``apply_chat_template`` does); else None."""
    if fmt.places_media:
        return fmt
    if template and fmt.renders_template:  # a format may name its own way of rendering it (GLM-Edge-V)
        return getattr(fmt, "media_template", JinjaFormat)(special, template, added)
    return None

"""Regular expressions from adapter_config.json (PEFT's ``target_modules``, ``rank_pattern``, ``alpha_pattern``),
checked before Python's backtracking ``re`` runs them.

Why a check and not a timeout or another engine: Python's ``re`` cannot be interrupted from another thread, a timer
signal works only in the main thread, and a linear-time engine (RE2) is not a dependency; PEFT itself matches these
patterns with ``re``, so we keep its exact semantics and refuse only the shapes that make backtracking blow up:

- a repeated group whose body holds a quantifier or an alternation (``(a+)+``, ``(a|aa)*``, ``(\\w+\\.)*``):
  exponential time on a near-miss;
- more than :data:`MAX_UNBOUNDED` unbounded quantifiers in all (``.*.*.*.*x``): polynomial time of that degree;
- backreferences and conditionals (not regular at all).

Module names longer than :data:`MAX_NAME` characters are refused before any match, so the cost of one match is at
most about MAX_NAME ** MAX_UNBOUNDED steps (milliseconds).
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from chatglm.errors import InputError

MAX_PATTERN = 1000  # characters
MAX_UNBOUNDED = 3  # ``*``, ``+`` and ``{m,}`` quantifiers in one pattern
MAX_NAME = 200  # characters in a module name; the longest GLM module name has about 60
BIG_REPEAT = 16  # ``{m,n}`` with n above this counts as unbounded

_QUANTIFIER = re.compile(r"[*+?]|\{(\d*)(,?)(\d*)\}")


@dataclass
class _Group:
    quantified: bool = False  # holds a quantifier (or a group that does)
    alternation: bool = False  # holds a | (or a group that does)


def _quantifier_at(pattern: str, i: int) -> tuple[int, Optional[int]]:
    """(length, most repeats; None = unbounded) of the quantifier at ``i``; (0, 1) when there is none."""
    m = _QUANTIFIER.match(pattern, i)
    if not m:
        return 0, 1
    text = m.group(0)
    if text[0] == "{" and not (m.group(1) or m.group(3)):
        return 0, 1  # "{}" or "{,}" is a literal brace
    length = len(text) + (1 if pattern[m.end():m.end() + 1] in ("?", "+") else 0)  # lazy / possessive
    if text in ("*", "+"):
        return length, None
    if text == "?":
        return length, 1
    if m.group(2) and not m.group(3):
        return length, None
    most = int(m.group(3) or m.group(1))
    return length, None if most > BIG_REPEAT else most


def _class_end(pattern: str, i: int) -> int:
    """Index just past the character class that starts at ``i`` (``[``)."""
    j = i + 1
    if pattern[j:j + 1] == "^":
        j += 1
    if pattern[j:j + 1] == "]":
        j += 1
    while j < len(pattern) and pattern[j] != "]":
        j += 2 if pattern[j] == "\\" else 1
    return j + 1


def _group_start(pattern: str, i: int) -> int:
    """Length of a group opener at ``i``: ``(``, ``(?:``, ``(?P<name>``, lookarounds; refuses non-regular ones."""
    if pattern.startswith("(?P=", i) or pattern.startswith("(?(", i):
        raise ValueError("backreferences and conditionals are not allowed")
    if pattern.startswith("(?P<", i):
        end = pattern.find(">", i)
        return end + 1 - i if end > 0 else 1
    for opener in ("(?<=", "(?<!", "(?:", "(?=", "(?!", "(?>"):
        if pattern.startswith(opener, i):
            return len(opener)
    return 1


def _problem(pattern: str) -> Optional[str]:
    if len(pattern) > MAX_PATTERN:
        return f"is {len(pattern)} characters long (at most {MAX_PATTERN})"
    stack, unbounded, i = [_Group()], 0, 0
    while i < len(pattern):
        c, inner = pattern[i], None
        if c == "\\":
            if pattern[i + 1:i + 2].isdigit() and pattern[i + 1] != "0":
                return "uses a backreference"
            i += 2
        elif c == "[":
            i = _class_end(pattern, i)
        elif c == "(":
            i += _group_start(pattern, i)
            stack.append(_Group())
            continue
        elif c == ")":
            if len(stack) == 1:
                return None  # unbalanced: re.compile reports it
            inner = stack.pop()
            i += 1
        elif c == "|":
            stack[-1].alternation = True
            i += 1
            continue
        else:
            i += 1
        length, most = _quantifier_at(pattern, i)
        if length:
            if inner is not None and (most is None or most > 1) and (inner.quantified or inner.alternation):
                return "repeats a group that holds a quantifier or an alternation (catastrophic backtracking)"
            unbounded += most is None
            stack[-1].quantified = True
            i += length
        if inner is not None:
            stack[-1].quantified |= inner.quantified
            stack[-1].alternation |= inner.alternation
    if unbounded > MAX_UNBOUNDED:
        return f"has {unbounded} unbounded quantifiers (at most {MAX_UNBOUNDED})"
    return None


def compile_pattern(pattern: str, key: str, path: Path, template: str = "{p}") -> re.Pattern:
    """``template`` with ``pattern`` in place of ``{p}``, compiled once ``pattern`` is known to match in bounded
    time (the template adds at most one unbounded quantifier); InputError naming ``key`` otherwise."""
    try:
        problem = _problem(pattern)
    except ValueError as exc:
        problem = str(exc)
    if problem:
        raise InputError(f"{key}: pattern {pattern[:60]!r} {problem}; list the module names instead", path)
    try:
        with warnings.catch_warnings():  # "possible nested set" FutureWarnings are not the user's concern here
            warnings.simplefilter("ignore")
            re.compile(pattern)
            return re.compile(template.replace("{p}", pattern))
    except (re.error, RecursionError, OverflowError) as exc:
        raise InputError(f"{key}: invalid pattern {pattern[:60]!r} ({exc})", path) from None


def check_name(name: str, path: Path) -> None:
    """A module name short enough to match any checked pattern against quickly."""
    if len(name) > MAX_NAME:
        raise InputError(f"module name of {len(name)} characters ({name[:40]!r}...) is longer than any model's",
                         path)

"""A pre-scan of a state dict's pickle that runs before any unpickler sees it, without recursion.

It walks the opcodes (``pickletools.genops``, a loop, not a parser that recurses) and mirrors the unpickler's stack
with small nodes that record only what could hurt: how deep containers nest (a tuple nested a million deep overflows
the C stack when it is hashed, compared or freed), what dictionary keys are (only strings: crafted ints, tuples or
sets collide on purpose and make inserting quadratic), how many items a container gets, memo indices (CPython sizes
its memo table by the largest one), and which globals are named (only the state dict's stand-ins). Objects may be
filled only while nothing holds them yet, which is how ``pickle`` writes them; that keeps every recorded depth exact
and rules out cycles. Anything a plain state dict never needs is refused by opcode name.
"""

from __future__ import annotations

import pickletools
import warnings
from typing import Any, Callable, Collection, Iterator, Optional

MAX_DEPTH = 64  # a torch state dict nests about 8 levels (dict, tensor, its arguments, the storage's id, ...)
MAX_ITEMS = 1 << 22  # items of one container: millions of tensors is already far beyond any checkpoint
FILLABLE = {("collections", "OrderedDict")}  # the only global whose instances may be filled (SETITEMS, BUILD)


class PickleRefused(ValueError):
    """The pickle does something a state dict never does; the message says what."""


class RefusedGlobal(Exception):
    """data.pkl names a global that a state dict never needs."""


class _Node:
    """What the scan knows about one object on the unpickler's stack."""

    __slots__ = ("kind", "value", "depth", "held", "items")

    def __init__(self, kind: str, value: Any = None, depth: int = 0):
        self.kind = kind  # "str", "int", "tuple", "list", "dict", "global", "obj", ... (see _LEAVES)
        self.value = value  # a string's text, a global's (module, name), an object's callable
        self.depth = depth  # nesting levels of containers in it
        self.held = False  # already inside another object: no longer fillable
        self.items = 0


_MARK = _Node("mark")
_LEAVES = {
    **dict.fromkeys(("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"), "int"),
    **dict.fromkeys(("STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
                     "BINUNICODE8"), "str"),
    **dict.fromkeys(("BINBYTES", "SHORT_BINBYTES", "BINBYTES8"), "bytes"),
    **dict.fromkeys(("FLOAT", "BINFLOAT"), "float"),
    **dict.fromkeys(("NEWTRUE", "NEWFALSE"), "bool"),
    "NONE": "none",
}
_EMPTY = {"EMPTY_DICT": "dict", "EMPTY_LIST": "list", "EMPTY_TUPLE": "tuple"}
_IGNORED = {"PROTO", "FRAME"}
_MEMO_PUT = {"PUT", "BINPUT", "LONG_BINPUT"}
_MEMO_GET = {"GET", "BINGET", "LONG_BINGET"}


class _Scan:
    def __init__(self, data: bytes, allowed: Collection[tuple[str, str]]):
        self.allowed = allowed
        self.memo_limit = len(data) + 16  # a real pickle has fewer memo entries than bytes
        self.stack: list[_Node] = []
        self.marks: list[list[_Node]] = []
        self.memo: dict[int, _Node] = {}
        self.ops: dict[str, Callable[[Any], Optional[_Node]]] = {
            "MARK": self._mark, "POP": self._pop_op, "POP_MARK": lambda _: self._pop_mark() and None,
            "DUP": lambda _: self._push(self._top()), "TUPLE": lambda _: self._tuple(self._pop_mark()),
            "TUPLE1": lambda _: self._tuple(self._pop_n(1)), "TUPLE2": lambda _: self._tuple(self._pop_n(2)),
            "TUPLE3": lambda _: self._tuple(self._pop_n(3)), "LIST": self._list, "DICT": self._dict,
            "APPEND": lambda _: self._fill("list", self._pop_n(1), pairs=False),
            "APPENDS": lambda _: self._fill("list", self._pop_mark(), pairs=False),
            "SETITEM": lambda _: self._fill("dict", self._pop_n(2), pairs=True),
            "SETITEMS": lambda _: self._fill("dict", self._pop_mark(), pairs=True),
            "GLOBAL": self._global, "STACK_GLOBAL": self._stack_global, "REDUCE": self._reduce,
            "NEWOBJ": self._newobj, "BUILD": self._build, "BINPERSID": self._persid, "MEMOIZE": self._memoize,
        }  # fmt: skip

    # ----- the stack
    def _push(self, node: _Node) -> None:
        self.stack.append(node)

    def _top(self) -> _Node:
        if not self.stack:
            raise PickleRefused("is malformed: an opcode needs an object and the stack is empty")
        return self.stack[-1]

    def _pop_n(self, n: int) -> list[_Node]:
        if len(self.stack) < n:
            raise PickleRefused("is malformed: an opcode needs more objects than the stack holds")
        items = self.stack[len(self.stack) - n :]
        del self.stack[len(self.stack) - n :]
        return items

    def _mark(self, _: Any) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def _pop_mark(self) -> list[_Node]:
        if not self.marks:
            raise PickleRefused("is malformed: an opcode needs a MARK that is not there")
        items, self.stack = self.stack, self.marks.pop()
        return items

    def _pop_op(self, _: Any) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self._pop_mark()

    # ----- objects
    def _hold(self, parent: _Node, children: list[_Node]) -> _Node:
        for child in children:
            if child is parent:
                raise PickleRefused("is malformed: an object contains itself")
            child.held = True
            parent.depth = max(parent.depth, child.depth + 1)
        parent.items += len(children)
        if parent.depth > MAX_DEPTH:
            raise PickleRefused(f"nests objects more than {MAX_DEPTH} levels deep (a state dict nests about 8)")
        if parent.items > MAX_ITEMS:
            raise PickleRefused(f"puts more than {MAX_ITEMS} items in one container")
        return parent

    def _tuple(self, items: list[_Node]) -> None:
        self._push(self._hold(_Node("tuple", depth=1), items))

    def _list(self, _: Any) -> None:
        self._push(self._hold(_Node("list", depth=1), self._pop_mark()))

    def _dict(self, _: Any) -> None:
        items = self._pop_mark()
        self._check_keys(items)
        self._push(self._hold(_Node("dict", depth=1), items))

    @staticmethod
    def _check_keys(items: list[_Node]) -> None:
        if len(items) % 2:
            raise PickleRefused("is malformed: a dictionary gets a key without a value")
        for key in items[::2]:
            if key.kind != "str":
                raise PickleRefused(f"has a dictionary key that is a {key.kind}, not a string (state dicts are "
                                    "keyed by tensor names)")

    def _fill(self, kind: str, items: list[_Node], *, pairs: bool) -> None:
        target = self._top()
        fillable = target.kind == kind or (kind == "dict" and target.kind == "obj" and target.value in FILLABLE)
        if not fillable:
            raise PickleRefused(f"adds items to a {target.kind}, which a state dict never does")
        if target.held:
            raise PickleRefused("changes an object after it was put inside another one, which pickle never does")
        if pairs:
            self._check_keys(items)
        self._hold(target, items)

    def _check_global(self, module: str, name: str) -> _Node:
        if (module, name) not in self.allowed:
            raise RefusedGlobal(f"{module}.{name}")
        return _Node("global", (module, name))

    def _global(self, arg: str) -> None:
        module, _, name = arg.partition(" ")
        self._push(self._check_global(module, name))

    def _stack_global(self, _: Any) -> None:
        module, name = self._pop_n(2)
        if module.kind != "str" or name.kind != "str":
            raise PickleRefused("is malformed: STACK_GLOBAL needs two strings")
        self._push(self._check_global(module.value, name.value))

    def _call(self, func: _Node, args: _Node) -> _Node:
        if func.kind != "global":
            raise PickleRefused(f"calls a {func.kind}, not one of the state dict's known functions")
        if args.kind != "tuple":
            raise PickleRefused(f"calls {'.'.join(func.value)} with a {args.kind} of arguments, not a tuple")
        return self._hold(_Node("obj", func.value, depth=1), [args])

    def _reduce(self, _: Any) -> None:
        (args,) = self._pop_n(1)
        self.stack[-1] = self._call(self._top(), args)

    def _newobj(self, _: Any) -> None:
        cls, args = self._pop_n(2)
        self._push(self._call(cls, args))

    def _build(self, _: Any) -> None:
        (state,) = self._pop_n(1)
        target = self._top()
        if target.kind != "obj" or target.value not in FILLABLE:
            raise PickleRefused(f"sets the state of a {target.kind}"
                                f"{' ' + '.'.join(target.value) if target.kind in ('obj', 'global') else ''}, "
                                "which a state dict never does")
        if target.held:
            raise PickleRefused("changes an object after it was put inside another one, which pickle never does")
        self._hold(target, [state])

    def _persid(self, _: Any) -> None:
        (pid,) = self._pop_n(1)
        self._push(self._hold(_Node("obj", ("persistent", "id"), depth=1), [pid]))

    # ----- the memo
    def _memo_index(self, arg: Any) -> int:
        index = int(arg)
        if index > self.memo_limit:
            raise PickleRefused(f"has memo index {index}, larger than the pickle itself")
        return index

    def _memoize(self, _: Any) -> None:
        self.memo[self._memo_index(len(self.memo))] = self._top()

    def step(self, name: str, arg: Any) -> None:
        if name in _LEAVES:
            self._push(_Node(_LEAVES[name], arg if _LEAVES[name] == "str" else None))
        elif name in _EMPTY:
            self._push(_Node(_EMPTY[name], depth=1))
        elif name in _MEMO_PUT:
            self.memo[self._memo_index(arg)] = self._top()
        elif name in _MEMO_GET:
            index = self._memo_index(arg)
            if index not in self.memo:
                raise PickleRefused(f"is malformed: memo entry {index} is read before it is written")
            self._push(self.memo[index])
        elif name in self.ops:
            self.ops[name](arg)
        elif name not in _IGNORED:
            raise PickleRefused(f"uses the pickle opcode {name}, which a state dict never needs")


def _opcodes(data: bytes) -> Iterator[tuple[str, Any]]:
    for op, arg, _ in pickletools.genops(data):
        yield op.name, arg
        if op.name == "STOP":
            return


def scan_pickle(data: bytes, allowed: Collection[tuple[str, str]]) -> None:
    """Refuse ``data`` unless it is a pickle an unpickler can load with bounded depth, keys and memory.

    Raises :class:`RefusedGlobal` for a global outside ``allowed``, :class:`PickleRefused` for anything else a
    state dict never does, and ``ValueError`` for bytes that are not a pickle at all.
    """
    scan = _Scan(data, allowed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # pickletools decoding a STRING with a bad escape
        for name, arg in _opcodes(data):
            if name == "STOP":
                if len(scan.stack) != 1 or scan.marks:
                    raise PickleRefused("is malformed: the stack does not hold exactly one object at its end")
                return
            scan.step(name, arg)
    raise PickleRefused("is malformed: it has no STOP opcode")

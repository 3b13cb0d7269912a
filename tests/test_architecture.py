"""The house rules of docs/architecture.md, checked on the source with ``ast`` (nothing is imported to find imports).

- Direction: cli/server -> runtime -> (families' faces, gguf_file, errors, ggml ...) <- convert. The runtime (and every
  family's chat.py) reaches no converter code, directly or through other modules; the converter (and every family's
  convert.py) reaches no runtime code; nothing imports chatglm.cli or chatglm.server but the CLI (which serves); a
  family's face imports only the descriptor module.
- No import cycle between modules (module-level imports).
- No family name (each descriptor's name, arch, variants and chat formats) as a string literal outside its family's
  folder and the registries.
- The registry and the folders agree.

Known departures owned by issue #17 part 2 are listed in KNOWN_*: each must still exist (so the list shrinks as they
are fixed), and nothing else may be added.
"""

from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

from chatglm import families

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "chatglm"

# (importer, imported): edges against the direction, to be removed by issue #17 part 2 (the GGUF-schema module,
# the demo's first-use conversion moved out of the runtime).
KNOWN_AGAINST_DIRECTION: set = set()
# Cycles through function-level imports (as sorted module lists), to be broken by issue #17 part 2.
KNOWN_CYCLES: set = set()
# String literals equal to a family name that mean something else: (module, literal) -> why.
FOREIGN_NAMES = {
    ("chatglm.convert.vocab_bpe", "glm4"): "llama.cpp's pre-tokenizer name (tokenizer.ggml.pre), not our family",
    ("chatglm.families.glm_moe_dsa", "glm47"): "GLM-5.x GGUFs without a template or format name get GLM-4.7's",
    ("chatglm.families.glm4_moe_lite", "glm47"): "GLM-4.7-Flash GGUFs without a template or format name get "
                                                 "GLM-4.7's",
    ("chatglm.schema.llama_names", "glm5-next"): "llama.cpp's architecture name, which gguf-py 0.19 lacks",
    # GLM-ASR's language model is llama.cpp's ``llama`` architecture; "llama" there is SentencePiece's vocab model
    **{(m, "llama"): "tokenizer.ggml.model 'llama' (SentencePiece), not GLM-ASR's architecture"
       for m in ("chatglm.convert.vocab_spm", "chatglm.families.chatglm1.convert", "chatglm.limits",
                 "chatglm.runtime.llama_engine", "chatglm.runtime.validate")},
}
# Modules allowed to name families: the registries, and the development tools that write checkpoints in the
# publishers' own layouts (their config.json and tokenizer files name the models as published).
NAMING_ALLOWED = ("chatglm.families", "chatglm.families.descriptor", "chatglm.devtools")


# --------------------------------------------------------------------------------------------------- the source


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def sources() -> dict[str, tuple[Path, ast.Module]]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        out[module_name(path)] = (path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
    return out


def is_package(module: str) -> bool:
    return sources()[module][0].name == "__init__.py"


def resolve(importer: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The chatglm modules an import statement loads (``from pkg import mod`` names the submodule)."""
    mods = sources()
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    base = node.module or ""
    if node.level:
        anchor = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
        anchor = anchor[:len(anchor) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
    found = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
    if base in mods and len(found) < len(node.names):
        found.append(base)
    return found


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk_module_level(body: list[ast.stmt]):
    """Statements that run when the module is imported (not inside functions or classes, nor TYPE_CHECKING)."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _is_type_checking(node):
            yield from _walk_module_level(node.body)
            yield from _walk_module_level(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                yield from _walk_module_level(block)
        elif isinstance(node, ast.With):
            yield from _walk_module_level(node.body)


def _walk_all(tree: ast.AST):
    """Every import statement that can run: module level and inside functions, but not under TYPE_CHECKING."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not (isinstance(node, ast.If) and _is_type_checking(node)):
            yield from _walk_all(node)


@lru_cache(maxsize=None)
def imports(module_level_only: bool) -> dict[str, frozenset[str]]:
    """module -> the chatglm modules it imports (anywhere in it, lazily too, or only at module level)."""
    graph = {}
    for name, (_, tree) in sources().items():
        nodes = _walk_module_level(tree.body) if module_level_only else _walk_all(tree)
        graph[name] = frozenset(t for n in nodes for t in resolve(name, n) if t != name)
    return graph


def within(module: str, *prefixes: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def family_part(module: str) -> tuple[str, str] | None:
    """(family, part) for chatglm.families.<family>[.<part>]; part "" for the face."""
    parts = module.split(".")
    if len(parts) in (3, 4) and parts[:2] == ["chatglm", "families"] and parts[2] in families.REGISTRY:
        return parts[2], parts[3] if len(parts) == 4 else ""
    return None


def is_converter(module: str) -> bool:
    return within(module, "chatglm.convert") or (family_part(module) or ("", ""))[1] == "convert"


def is_runtime(module: str) -> bool:
    return within(module, "chatglm.runtime") or (family_part(module) or ("", ""))[1] == "chat"


def reachable(start: str) -> dict[str, str]:
    """Every module ``start`` loads, directly or not, with lazy imports, skipping the known edges: module -> via."""
    graph = imports(False)
    seen, todo = {start: start}, [start]
    while todo:
        here = todo.pop()
        for target in graph[here]:
            if target not in seen and (here, target) not in KNOWN_AGAINST_DIRECTION:
                seen[target] = here
                todo.append(target)
    return seen


def path_to(seen: dict[str, str], target: str) -> str:
    chain = [target]
    while seen[chain[-1]] != chain[-1]:
        chain.append(seen[chain[-1]])
    return " -> ".join(reversed(chain))


# --------------------------------------------------------------------------------------------------- direction


def test_the_source_is_found():
    assert {"chatglm.runtime.loader", "chatglm.convert.pipeline", "chatglm.families.chatglm1.convert"} <= set(sources())


@pytest.mark.parametrize("side,forbidden,what", [
    (is_runtime, is_converter, "the runtime (and chat.py) reaches converter code"),
    (is_converter, is_runtime, "the converter (and convert.py) reaches runtime code"),
])
def test_runtime_and_converter_never_reach_each_other(side, forbidden, what):
    problems = []
    for module in sorted(m for m in sources() if side(m)):
        seen = reachable(module)
        problems += [path_to(seen, t) for t in sorted(seen) if forbidden(t) and not forbidden(seen[t])]  # crossings
    assert not problems, f"{what}:\n" + "\n".join(sorted(set(problems)))


def test_nothing_imports_the_cli_or_the_server():
    problems = []
    for module, targets in imports(False).items():
        for target in targets:
            if within(target, "chatglm.cli") and not within(module, "chatglm.cli"):
                problems.append(f"{module} -> {target}")
            if within(target, "chatglm.server") and not within(module, "chatglm.cli", "chatglm.server"):
                problems.append(f"{module} -> {target}")
    assert not problems, "only the CLI may import chatglm.cli and chatglm.server:\n" + "\n".join(sorted(problems))


def test_family_faces_and_the_registry_import_only_the_descriptor():
    faces = ["chatglm.families", "chatglm.families.descriptor"] + [f"chatglm.families.{n}" for n in families.REGISTRY]
    problems = [f"{m} -> {t}" for m in faces for t in sorted(imports(False)[m]) if t != "chatglm.families.descriptor"]
    assert not problems, "a family's face (and the registry) must stay importable by both sides:\n" + "\n".join(problems)


def test_shared_modules_import_neither_side():
    shared = [m for m in sources() if within(m, "chatglm.errors", "chatglm.gguf_file", "chatglm.fsutil", "chatglm.store",
                                                 "chatglm.limits", "chatglm.ggml")]
    problems = [f"{m} -> {t}" for m in shared for t in sorted(imports(False)[m])
                if within(t, "chatglm.convert", "chatglm.runtime", "chatglm.cli", "chatglm.server")
                or (family_part(t) or ("", ""))[1]]
    assert shared and not problems, "the modules below both sides import neither:\n" + "\n".join(problems)


def test_nothing_but_tools_imports_the_devtools():
    problems = [f"{m} -> {t}" for m, targets in imports(False).items() for t in targets
                if within(t, "chatglm.devtools") and not within(m, "chatglm.devtools")]
    assert not problems, "\n".join(problems)


def test_known_departures_still_exist():
    """Each listed exemption is still needed: when one is fixed, remove it from the list."""
    graph = imports(False)
    stale = [edge for edge in KNOWN_AGAINST_DIRECTION if edge[1] not in graph.get(edge[0], ())]
    assert not stale, f"remove from KNOWN_AGAINST_DIRECTION: {stale}"


# --------------------------------------------------------------------------------------------------- cycles


def cycles(module_level_only: bool) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one module in the import graph (Tarjan)."""
    graph = imports(module_level_only)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(module_level_only=True) == set()


def test_no_cycles_through_lazy_imports_either():
    """Function-level imports hide a cycle from Python, not from a reader: none but the listed ones."""
    found = cycles(module_level_only=False)
    assert found - KNOWN_CYCLES == set(), f"import cycles: {sorted(found - KNOWN_CYCLES)}"
    assert KNOWN_CYCLES - found == set(), f"broken, remove from KNOWN_CYCLES: {sorted(KNOWN_CYCLES - found)}"


# --------------------------------------------------------------------------------------------------- family names


def owned_names(family: families.Descriptor) -> set[str]:
    """What a family folder may spell out: its own names and its config.json detection values."""
    return set(family.names) | {family.detect.model_type, *family.detect.architectures}


def test_family_names_appear_only_in_their_folders_and_the_registries():
    by_name = {f.name: f for f in families.families()}
    names = {n for f in families.families() for n in f.names}
    problems = []
    for module, (path, tree) in sources().items():
        if within(module, *NAMING_ALLOWED[2:]) or module in NAMING_ALLOWED[:2]:
            continue
        part = family_part(module)
        allowed = owned_names(by_name[part[0]]) if part else set()
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names
                    and node.value not in allowed and (module, node.value) not in FOREIGN_NAMES):
                problems.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert not problems, ("family names belong in chatglm/families/<name>/ (use the descriptor):\n"
                          + "\n".join(problems))


def test_foreign_names_are_still_there():
    stale = [key for key in FOREIGN_NAMES
             if not any(isinstance(n, ast.Constant) and n.value == key[1] for n in ast.walk(sources()[key[0]][1]))]
    assert not stale, f"remove from FOREIGN_NAMES: {stale}"


# --------------------------------------------------------------------------------------------------- the registry


@pytest.mark.parametrize("name", families.REGISTRY)
def test_each_registered_family_is_a_complete_folder(name):
    folder = PACKAGE / "families" / name
    assert {p.name for p in folder.glob("*.py")} >= {"__init__.py", "convert.py", "chat.py"}
    family = families.part(name, None).FAMILY
    assert family.name == name
    converter = families.part(name, "convert").CONVERTER
    from chatglm.convert.family import Family as Converter

    assert issubclass(converter, Converter) and converter.arch == family.arch and converter.name in family.variants
    formats = families.part(name, "chat").FORMATS
    assert tuple(f.name for f in formats) == family.chat_formats
    for fmt in formats:
        assert set(fmt.required_tokens) <= families.special_tokens(), fmt.name
        assert set(fmt.stop_tokens) <= families.special_tokens(), fmt.name


def test_every_folder_is_registered():
    folders = {p.parent.name for p in (PACKAGE / "families").glob("*/__init__.py")}
    assert folders == set(families.REGISTRY)


def test_names_are_unambiguous():
    formats = families.chat_formats()
    assert len(formats) == len(set(formats)), "a chat format is defined by two families"
    variants = [v for f in families.families() for v in f.variants]
    assert len(variants) == len(set(variants)), "two families write the same glm.family"
    for arch in families.archs():  # the families sharing an arch agree on how it runs
        families.arch_value(arch, "engine")
        families.arch_value(arch, "causal_prefix")
    for fam in families.families():
        for _, fmt in fam.format_guesses:
            assert families.owner_of_format(fmt) is not None, (fam.name, fmt)


def test_every_architecture_has_an_engine_that_knows_it():
    from chatglm.families.descriptor import ENGINE_LLAMA
    from chatglm.runtime.loader import ENGINES, VALIDATORS
    from chatglm.runtime.validate_tensors import LLAMA_ARCHS

    assert set(ENGINES) == set(VALIDATORS) == set(families.archs())
    assert {f.arch for f in families.families() if f.engine == ENGINE_LLAMA} <= set(LLAMA_ARCHS)

"""Assemble a generated module from the kernel families' real Python files: only what the plan uses.

The library (`LIBRARY`: `patterncc/runtime/` and `patterncc/families/`) is read as source. Each top-level
statement is a definition with the names it binds and the names it reads. Starting from the names the rendered
template reads (its roots), the closure of definitions is copied, in library order, with the comments above
them; imports are dropped (the generated file imports torch and triton itself, and every library name lives in
its one namespace). Definitions that need Triton are placed under `if triton is not None:`, so the CPU path
imports without it.

Naming. Library names are unique across the library (a test checks it), and only `HOOKS` may be replaced by
the template: the one place a pattern enters a family's kernels. The tile-classification runtime keeps its own
namespace with a prefix: its `add` becomes `tiles_add`, and `tiles.add` in library code reads `tiles_add`.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass
from functools import cache

from .resources import _PACKAGE_DIR


@dataclass(frozen=True)
class LibrarySource:
    path: str  # relative to the package, e.g. "families/lsh/ops.py"
    prefix: str = ""  # prepended to the module's top-level names (the tiles runtime: "tiles_")
    needs_triton: bool = False  # its definitions go under `if triton is not None:`


LIBRARY = (
    LibrarySource("runtime/tiles.py", prefix="tiles_"),
    LibrarySource("runtime/random_blocks.py"),
    LibrarySource("families/shared/launch.py"),
    LibrarySource("families/shared/heads.py"),
    LibrarySource("families/shared/kernels.py", needs_triton=True),
    LibrarySource("families/blocksparse/kernels.py", needs_triton=True),
    LibrarySource("families/blocksparse/layout.py"),
    LibrarySource("families/blocksparse/cpu.py"),
    LibrarySource("families/blocksparse/ops.py"),
    LibrarySource("families/lsh/kernels.py", needs_triton=True),
    LibrarySource("families/lsh/cpu.py"),
    LibrarySource("families/lsh/ops.py"),
    LibrarySource("families/linear/kernels.py", needs_triton=True),
    LibrarySource("families/linear/cpu.py"),
    LibrarySource("families/linear/ops.py"),
)
# Library names a template defines instead (the pattern's predicate inside the block-sparse kernels).
HOOKS = frozenset({"pattern_allowed"})
# Modules library code reads through an attribute (`tiles.add`), and the prefix their names get.
_NAMESPACED = {source.path.rsplit("/", 1)[1][:-3]: source.prefix for source in LIBRARY if source.prefix}


@dataclass(frozen=True)
class Definition:
    source: LibrarySource
    order: int  # position in the library: sources in LIBRARY order, statements in file order
    binds: frozenset[str]
    reads: frozenset[str]
    text: str  # with the comments directly above it; names already renamed
    gap: int  # blank lines above it in its file (kept when the statement before it is copied too)


def _is_import(node: ast.stmt) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    # `try: import triton ... except ImportError: triton = None`: the generated header does this itself.
    return isinstance(node, ast.Try) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body)


def _bound_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
    return {n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)}


def _rename(text: str, own: dict[str, str]) -> str:
    """Rename a module's own top-level names (`own`) and `tiles.x` attribute reads, token by token, so comments,
    strings and layout survive."""
    tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    edits: list[tuple[tuple[int, int], tuple[int, int], str]] = []
    significant = [t for t in tokens if t.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT,
                                                       tokenize.INDENT, tokenize.DEDENT)]
    for index, tok in enumerate(significant):
        if tok.type != tokenize.NAME:
            continue
        after_dot = index > 0 and significant[index - 1].string == "."
        if tok.string in _NAMESPACED and not after_dot and index + 2 < len(significant) \
                and significant[index + 1].string == "." and significant[index + 2].type == tokenize.NAME:
            attribute = significant[index + 2]
            edits.append((tok.start, attribute.end, _NAMESPACED[tok.string] + attribute.string))
        elif tok.string in own and not after_dot:
            edits.append((tok.start, tok.end, own[tok.string]))
    lines = text.splitlines(keepends=True)
    for (row, col), (end_row, end_col), new in sorted(edits, reverse=True):
        assert row == end_row, "a renamed name spans lines"
        line = lines[row - 1]
        lines[row - 1] = line[:col] + new + line[end_col:]
    return "".join(lines)


_HEADER_IMPORTS = {"torch", "triton"}  # the generated header imports these itself (triton optionally)


@cache
def library_imports() -> dict[str, str]:
    """Standard-library names the library imports -> the import statement a generated module needs for them."""
    imports: dict[str, str] = {}
    for source in LIBRARY:
        for node in ast.parse((_PACKAGE_DIR / source.path).read_text()).body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] not in _HEADER_IMPORTS and alias.asname is None:
                        imports[alias.name] = f"import {alias.name}"
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] not in (
                    _HEADER_IMPORTS | {"__future__"}):
                for alias in node.names:
                    imports[alias.asname or alias.name] = f"from {node.module} import {alias.name}"
    return imports


def _reads(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


@cache
def library_definitions() -> tuple[Definition, ...]:
    definitions: list[Definition] = []
    for source in LIBRARY:
        text = (_PACKAGE_DIR / source.path).read_text()
        tree = ast.parse(text)
        body = tree.body[1:] if ast.get_docstring(tree) is not None else tree.body
        own = {}
        if source.prefix:
            own = {name: source.prefix + name for node in body if not _is_import(node) for name in _bound_names(node)}
        lines = text.splitlines()
        previous_end = 0
        for node in body:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            end = node.end_lineno
            if _is_import(node):
                previous_end = end
                continue
            while start - 2 >= previous_end and lines[start - 2].lstrip().startswith("#"):
                start -= 1  # the comment block directly above belongs to the statement
            gap = 0
            while start - 2 - gap >= previous_end and not lines[start - 2 - gap].strip():
                gap += 1
            previous_end = end
            statement = "\n".join(lines[start - 1:end]) + "\n"
            renamed = _rename(statement, own)
            node_renamed = ast.parse(renamed)
            definitions.append(Definition(source, len(definitions), frozenset(_bound_names(node_renamed.body[0])),
                                          frozenset(_reads(node_renamed)), renamed, gap))
    return tuple(definitions)


@dataclass(frozen=True)
class Assembled:
    imports: tuple[str, ...]  # standard-library imports the copied definitions need, sorted
    text: str  # the definitions


def assemble(roots: set[str], hooks: frozenset[str] = HOOKS) -> Assembled:
    """The library definitions that `roots` need (transitively), as source text for a generated module."""
    by_name: dict[str, Definition] = {}
    for definition in library_definitions():
        for name in definition.binds:
            if name in hooks:
                continue
            if name in by_name:
                raise AssertionError(f"library name `{name}` is defined in {by_name[name].source.path} and "
                                     f"{definition.source.path}")
            by_name[name] = definition
    selected: dict[int, Definition] = {}
    pending = [name for name in roots if name in by_name]
    while pending:
        definition = by_name[pending.pop()]
        if definition.order in selected:
            continue
        selected[definition.order] = definition
        pending.extend(name for name in definition.reads if name in by_name)
    definitions = [selected[order] for order in sorted(selected)]
    stdlib = library_imports()
    needed = {stdlib[name] for d in definitions for name in d.reads if name in stdlib}
    needed |= {stdlib[name] for name in roots if name in stdlib}
    imports = sorted(needed, key=lambda line: (line.startswith("from"), line))
    return Assembled(tuple(imports), _layout_text(definitions))


def _layout_text(definitions: list[Definition]) -> str:
    out: list[str] = []
    previous: Definition | None = None
    block: list[str] = []  # statements of the current source

    def flush(source: LibrarySource | None):
        if not block:
            return
        text = "".join(block).rstrip("\n") + "\n"
        if source is not None and source.needs_triton:
            indented = "".join(("    " + line if line.strip() else line) for line in text.splitlines(keepends=True))
            text = "if triton is not None:\n" + indented
        out.append(f"# From patterncc/{source.path}\n\n" + text)
        block.clear()

    for definition in definitions:
        if previous is None or previous.source != definition.source:
            if previous is not None:
                flush(previous.source)
        elif block:
            adjacent = definition.order == previous.order + 1
            block.append("\n" * (min(definition.gap, 2) if adjacent else 2))
        block.append(definition.text)
        previous = definition
    if previous is not None:
        flush(previous.source)
    return "\n\n".join(out)

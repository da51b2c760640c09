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
    LibrarySource("families/shared/documents.py"),
    LibrarySource("families/shared/dropout.py"),
    LibrarySource("families/shared/decode.py"),
    LibrarySource("families/shared/traced.py"),
    LibrarySource("families/shared/kernels.py", needs_triton=True),
    LibrarySource("families/blocksparse/kernels.py", needs_triton=True),
    LibrarySource("families/blocksparse/layout.py"),
    LibrarySource("families/blocksparse/cpu.py"),
    LibrarySource("families/blocksparse/ops.py"),
    LibrarySource("families/blocksparse/decode_kernels.py", needs_triton=True),
    LibrarySource("families/blocksparse/decode.py"),
    LibrarySource("families/lsh/kernels.py", needs_triton=True),
    LibrarySource("families/lsh/cpu.py"),
    LibrarySource("families/lsh/ops.py"),
    LibrarySource("families/lsh/decode.py"),
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
    names: frozenset[str]  # the top-level names they define


def assemble(roots: set[str], hooks: frozenset[str] = HOOKS, constants: dict[str, tuple] | None = None,
             values: dict[str, tuple] | None = None) -> Assembled:
    """The library definitions that `roots` need (transitively), as source text for a generated module.

    constants: for a kernel constexpr or a library flag, the values this module gives it (e.g. FEATURE:
    ("elu1",), PERMUTED_ORDERS: (False,)): `if` branches no value can take are dropped (in kernels Triton would
    drop them at compile time too, so the compiled code is the same). values: module-level tuples narrowed to what
    the module supports (e.g. LINEAR_FEATURE_MAPS), so no call can reach a dropped branch."""
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
        # Specialized first: what only a dropped branch reads is not copied.
        definition = _specialized(definition, constants or {}, values or {})
        selected[definition.order] = definition
        pending.extend(name for name in definition.reads if name in by_name)
    definitions = [selected[order] for order in sorted(selected)]
    stdlib = library_imports()
    needed = {stdlib[name] for d in definitions for name in d.reads if name in stdlib}
    needed |= {stdlib[name] for name in roots if name in stdlib}
    imports = sorted(needed, key=lambda line: (line.startswith("from"), line))
    return Assembled(tuple(imports), _layout_text(definitions), frozenset().union(*(d.binds for d in definitions)))


def _specialized(definition: Definition, constants: dict[str, tuple], values: dict[str, tuple]) -> Definition:
    # Only the constants and values the definition reads or binds matter: memoized on those (every module of a
    # session, and every test, specializes the same library definitions for a few settings).
    return _specialized_cached(definition, tuple(sorted((k, v) for k, v in constants.items() if k in definition.reads)),
                               tuple(sorted((k, v) for k, v in values.items() if k in definition.binds)))


@cache
def _specialized_cached(definition: Definition, constants_items: tuple, values_items: tuple) -> Definition:
    constants, values = dict(constants_items), dict(values_items)
    narrowed = definition.binds & set(values)
    if narrowed:
        (name,) = narrowed
        text = f"{name} = {values[name]!r}  # what this module's kernels were generated for\n"
        return Definition(definition.source, definition.order, definition.binds, definition.reads, text,
                          definition.gap)
    if not constants or not definition.reads & set(constants):
        return definition
    text = definition.text
    while True:
        tree = ast.parse(text)
        decided = next(((node, verdict) for node in ast.walk(tree) if isinstance(node, ast.If)
                        for verdict in [_decide(node.test, constants)] if verdict is not None), None)
        if decided is None:
            break
        new_text = _drop_branch(text, *decided)
        try:
            ast.parse(new_text)
        except SyntaxError:  # e.g. a block left empty: keep the branch
            break
        text = new_text
    reads = frozenset(_reads(ast.parse(text)))
    return Definition(definition.source, definition.order, definition.binds, reads, text, definition.gap)


def _decide(test: ast.expr, constants: dict[str, tuple]) -> bool | None:
    """The value of an `if` test over one constant, when every value the constant takes gives the same; an `and`
    is false when one of its operands is."""
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        return False if any(_decide(operand, constants) is False for operand in test.values) else None
    if isinstance(test, ast.Name) and test.id in constants:
        outcomes = {bool(v) for v in constants[test.id]}
    elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not) and isinstance(test.operand, ast.Name) \
            and test.operand.id in constants:
        outcomes = {not v for v in constants[test.operand.id]}
    elif isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.left, ast.Name) \
            and test.left.id in constants and isinstance(test.comparators[0], ast.Constant) \
            and isinstance(test.ops[0], (ast.Eq, ast.NotEq)):
        target = test.comparators[0].value
        outcomes = {(v == target) == isinstance(test.ops[0], ast.Eq) for v in constants[test.left.id]}
    else:
        return None
    return outcomes.pop() if len(outcomes) == 1 else None


def _drop_branch(text: str, node: ast.If, verdict: bool) -> str:
    """`text` with the `if` (or `elif`) `node` replaced by the branch that `verdict` selects."""
    lines = text.splitlines(keepends=True)
    header = node.lineno
    is_elif = lines[header - 1].lstrip().startswith("elif")
    indent = len(lines[header - 1]) - len(lines[header - 1].lstrip())
    delta = len(lines[node.body[0].lineno - 1]) - len(lines[node.body[0].lineno - 1].lstrip()) - indent
    end = node.end_lineno
    else_line, else_kind = None, None
    if node.orelse:
        first = node.orelse[0]
        if isinstance(first, ast.If) and lines[first.lineno - 1].lstrip().startswith("elif"):
            else_line, else_kind = first.lineno, "elif"
        else:
            else_line = next(n for n in range(node.body[-1].end_lineno + 1, first.lineno)
                             if lines[n - 1].lstrip().startswith("else"))
            else_kind = "else"
    body_end = (else_line - 1) if else_line else end

    def dedent(chunk):
        return [line[delta:] if line[:delta].strip() == "" else line for line in chunk]

    before, after = lines[:header - 1], lines[end:]
    if verdict:
        body = lines[header:body_end]
        if is_elif:
            return "".join(before + [" " * indent + "else:\n"] + body + after)
        return "".join(before + dedent(body) + after)
    if else_kind is None:
        return "".join(before + after)
    if else_kind == "elif":
        rest = lines[else_line - 1:end]
        if not is_elif:
            rest[0] = rest[0].replace("elif", "if", 1)
        return "".join(before + rest + after)
    if is_elif:
        return "".join(before + lines[else_line - 1:end] + after)
    return "".join(before + dedent(lines[else_line:end]) + after)


def _layout_text(definitions: list[Definition]) -> str:
    out: list[str] = []
    previous: Definition | None = None
    block: list[str] = []  # statements of the current source

    def flush(source: LibrarySource):
        if not block:
            return
        text = "".join(block).rstrip("\n") + "\n"
        if source.needs_triton:
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

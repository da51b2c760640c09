"""The verifier after rendering: a generated module is checked as Python before anyone imports it.

Checks, on the source alone (nothing is executed):
- it parses;
- no top-level name is defined twice (a function, class or assignment at module level, including inside
  top-level `if`/`try` blocks), so no definition silently replaces another;
- every name a function or the module body reads is defined at module level, imported, or a builtin;
- every top-level name is used somewhere in the module or listed in its `__all__`, so a file holds only what its
  plan uses;
- every name in `__all__` is defined.
"""

from __future__ import annotations

import ast
import builtins
import symtable

from .errors import PatternUsageError

_MODULE_ATTRIBUTES = {"__name__", "__file__", "__doc__", "__spec__", "__loader__", "__package__", "__builtins__",
                      "__all__"}


class GeneratedCodeError(PatternUsageError):
    """A generated module failed verification: a bug in patterncc, never in the user's pattern."""


def _top_level_definitions(tree: ast.Module) -> list[tuple[str, int]]:
    """(name, line) for each name bound at module level, in order (imports included)."""
    found: list[tuple[str, int]] = []

    def targets(node) -> list[ast.expr]:
        if isinstance(node, ast.Assign):
            return list(node.targets)
        if isinstance(node, (ast.AnnAssign, ast.AugAssign)):
            return [node.target]
        return []

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                found.append((node.name, node.lineno))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                for alias in node.names:
                    found.append(((alias.asname or alias.name).split(".")[0], node.lineno))
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                # An `except ImportError` branch rebinds what its `try` imports (triton = None): not a redefinition.
                visit(node.body)
            for target in targets(node):
                for name in ast.walk(target):
                    if isinstance(name, ast.Name) and not isinstance(node, ast.AugAssign):
                        found.append((name.id, node.lineno))

    visit(tree.body)
    return found


def _global_reads(table: symtable.SymbolTable) -> set[str]:
    """Names read as globals anywhere in the module (module body, functions, classes, comprehensions)."""
    reads: set[str] = set()
    stack = [table]
    while stack:
        scope = stack.pop()
        for symbol in scope.get_symbols():
            if not symbol.is_referenced():
                continue
            if scope.get_type() == "module" or symbol.is_global() or (
                    scope.get_type() == "class" and not symbol.is_assigned()):
                reads.add(symbol.get_name())
        stack.extend(scope.get_children())
    return reads


def _imported_names(body: list[ast.stmt]) -> set[str]:
    """Names bound by module-level imports, inside top-level `if`/`try` blocks included (generated modules import
    nothing elsewhere; walking only these statements, not the whole tree, keeps verification fast)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update(alias.asname or alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.If):
            names |= _imported_names(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            names |= _imported_names(node.body + node.orelse + node.finalbody
                                     + [stmt for handler in node.handlers for stmt in handler.body])
    return names


def _all_names(tree: ast.Module) -> list[str] | None:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [ast.literal_eval(elt) for elt in node.value.elts]
    return None


def verify_module(source: str, *, filename: str = "<generated>") -> None:
    """Raise GeneratedCodeError naming every problem found in a generated module's source."""
    try:
        tree = ast.parse(source, filename)
    except SyntaxError as err:
        raise GeneratedCodeError(f"{filename}: generated code does not parse: {err}") from None
    problems: list[str] = []
    definitions = _top_level_definitions(tree)
    first_line: dict[str, int] = {}
    for name, line in definitions:
        if name in first_line and line != first_line[name]:
            problems.append(f"`{name}` is defined twice (lines {first_line[name]} and {line})")
        first_line.setdefault(name, line)
    defined = set(first_line) | set(dir(builtins)) | _MODULE_ATTRIBUTES
    reads = _global_reads(symtable.symtable(source, filename, "exec"))
    for name in sorted(reads - defined):
        problems.append(f"`{name}` is used but never defined")
    public = _all_names(tree)
    if public is not None:
        for name in public:
            if name not in first_line:
                problems.append(f"`{name}` is in __all__ but never defined")
        imported = _imported_names(tree.body)
        for name in sorted(set(first_line) - reads - set(public) - imported - _MODULE_ATTRIBUTES):
            problems.append(f"`{name}` (line {first_line[name]}) is defined but never used")
    if problems:
        raise GeneratedCodeError(f"{filename}: the generated module failed verification:\n  "
                                 + "\n  ".join(problems))

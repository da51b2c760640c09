"""Copy a `patterncc.runtime` module's source into a generated file, so generated files need only torch/triton.

Top-level names get a prefix (`add` -> `tiles_add`) to keep the generated module's namespace readable; the
rename works on tokens, so comments, docstrings and layout survive. Imports and the module docstring are
dropped: the generated file imports torch and math itself.
"""

from __future__ import annotations

import ast
import io
import tokenize

from .resources import _PACKAGE_DIR


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for elt in target.elts if isinstance(target, ast.Tuple) else [target]:
                    if isinstance(elt, ast.Name):
                        names.add(elt.id)
    return names


def embed_module(name: str, prefix: str = "") -> str:
    source = (_PACKAGE_DIR / "runtime" / f"{name}.py").read_text()
    tree = ast.parse(source)
    body_start = tree.body[1].lineno if ast.get_docstring(tree) else 1
    names = _top_level_names(tree) if prefix else set()
    lines = source.splitlines(keepends=True)
    edits: dict[int, list[tuple[int, int, str]]] = {}
    previous = None
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.string in names and not (previous and previous.string == "."):
            edits.setdefault(tok.start[0], []).append((tok.start[1], tok.end[1], prefix + tok.string))
        if tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT):
            previous = tok
    out = []
    for number, line in enumerate(lines, start=1):
        if number < body_start:
            continue
        for start, end, text in sorted(edits.get(number, []), reverse=True):
            line = line[:start] + text + line[end:]
        if line.startswith(("import ", "from ")):
            continue
        out.append(line)
    return "".join(out).strip("\n") + "\n"

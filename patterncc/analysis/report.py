"""The text of `patterncc check`: which patterns a command line selects, and an analysis as rich tables (the JSON
form is `Analysis.to_json`, schema: docs/check-json.md)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .. import api, ir
from ..errors import PatternUsageError
from ..semantics import override_params
from .analyze import Analysis, HeadAnalysis
from .cost import format_order, formula_value

JSON_SCHEMA_VERSION = 2  # 2: `set_heads`, and `warnings` on the module's work


def select_patterns(path, name: str | None, params: dict[str, int]) -> list[ir.Pattern]:
    """The patterns to check, with -D overrides. In a file of several patterns each override goes to the patterns
    that declare it; one that none declares is an error."""
    if name is not None:
        return [api.parse(path, name, **params)]
    patterns = list(api.parse_all(path).values())
    if len(patterns) == 1:
        return [override_params(patterns[0], params)]
    declared = {p.name for pattern in patterns for p in pattern.params}
    unknown = [key for key in params if key not in declared]
    if unknown:
        raise PatternUsageError(f"no pattern in this file has a parameter `{unknown[0]}`; parameters: "
                                f"{', '.join(sorted(declared)) or 'none'}", filename=patterns[0].filename)
    out = []
    for pattern in patterns:
        own = {p.name for p in pattern.params}
        out.append(override_params(pattern, {k: v for k, v in params.items() if k in own}))
    return out


# Text report ------------------------------------------------------------------------------------------------------


def print_analysis(console: Console, analysis: Analysis) -> None:
    pattern, bound = analysis.pattern, analysis.bound
    params = ", ".join(f"{p.name} = {bound.env[p.name]}" for p in pattern.params if p.name in bound.env)
    console.print(f"[bold]{pattern.name}[/bold] ({pattern.filename})  n = {bound.n}, "
                  f"{'causal' if pattern.causal else 'bidirectional'}, block {bound.block}, "
                  f"combine {pattern.combine}" + (f", {params}" if params else ""))
    console.print(_heads_table(analysis))
    if pattern.causal:
        console.print(_cache_table(analysis))
    console.print(_coverage_table(analysis))
    permutations = _permutation_table(analysis)
    if permutations.row_count:
        console.print(permutations)
    if analysis.module_heads:
        console.print(_module_table(analysis))
    if pattern.combine != "multihead" or analysis.layer:
        console.print(f"layer {analysis.layer} attention heads run: {', '.join(analysis.layer_heads)}")
    for note in analysis.notes:
        console.print(f"note: {note}")
    # Warnings (empty rows, wasted kernel work) go through `warnings.warn`: the CLI prints them on stderr.


def _heads_table(analysis: Analysis) -> Table:
    allowed = "n(n+1)/2" if analysis.pattern.causal else "n^2"
    table = Table(title=f"Heads (keys per query row; density of the {allowed} allowed pairs)", title_justify="left")
    right = ("heads", "keys/row min/mean/max", "nonzeros", "density", "tiles E/P/F", "block density")
    for column in ("head", "family", *right, "cost/row", "order"):
        table.add_column(column, justify="right" if column in right else "left")
    entries = list(analysis.heads) + ([analysis.union] if analysis.union else [])
    for entry in entries:
        table.add_row(*_head_row(entry, analysis), end_section=entry is analysis.heads[-1])
    return table


def _head_row(entry: HeadAnalysis, analysis: Analysis) -> list[str]:
    cost = entry.cost
    formula = str(cost.formula) + (" (expected)" if cost.expected else "")
    if entry.rows is None:
        rows = nonzeros = density = "data-dependent"
    else:
        rows = f"{entry.rows.min} / {entry.rows.mean:.1f} / {entry.rows.max}"
        nonzeros, density = f"{entry.rows.nonzeros:,}", f"{entry.rows.density:.4f}"
    layout = entry.layout
    tiles = "-" if layout is None else f"{layout.empty}/{layout.partial}/{layout.full}"
    block_density = "-" if layout is None else f"{layout.density:.4f}"
    return [entry.name, entry.family, str(entry.count), rows, nonzeros, density, tiles, block_density, formula,
            format_order(cost.order)]


def _cache_table(analysis: Analysis) -> Table:
    """Keys a KV cache keeps per head while generating (new_cache / prefill / decode)."""
    table = Table(title="KV cache for generation: keys kept per head, the most at once (whole tiles at run time)",
                  title_justify="left")
    for column in ("head", "family", "keys kept", f"at n = {analysis.bound.n}"):
        table.add_column(column, justify="right" if column.startswith("at n") else "left")
    for entry in analysis.heads:
        value = formula_value(entry.cache, analysis.bound.env, analysis.bound.n)
        table.add_row(entry.name, entry.family, str(entry.cache), f"{value:,.0f}")
    return table


def _coverage_table(analysis: Analysis) -> Table:
    table = Table(title="Coverage (steps until every allowed pair is connected; residuals as self loops)",
                  title_justify="left")
    for column in ("steps of", "sequence", "status", "p", "covered after step 1, 2, ...", "witness (i, j)"):
        table.add_column(column)
    labels = {"merged": "merged union", "declared_order": "declared order"}
    for key, result in analysis.coverage.items():
        status = {"covered": "covered", "never": "never (fixed point)",
                  "not_within_max_steps": f"not within {result.max_steps} steps", "unknown": "unknown"}[result.status]
        fractions = ", ".join(f"{f:.4f}" for f in result.fractions)
        witness = "-" if result.witness is None else f"({result.witness[0]}, {result.witness[1]}) not connected"
        sequence = " | ".join(result.sequence) if key == "merged" else " -> ".join(result.sequence)
        table.add_row(labels[key], sequence, status, "-" if result.steps is None else str(result.steps),
                      fractions or "-", witness)
    return table


def _permutation_table(analysis: Analysis) -> Table:
    table = Table(title="Permutations (grid transposes, block density at the pattern's block)",
                  title_justify="left")
    for column in ("head", "periods tried", "block density before", "after", "chosen"):
        table.add_column(column)
    entries = list(analysis.heads) + ([analysis.union] if analysis.union else [])
    for entry in entries:
        choice = entry.permutation
        if choice is None or not choice.candidates:
            continue
        best = min(choice.candidates.values())
        chosen = choice.chosen.formula if choice.chosen else "none (no candidate halves the block density)"
        table.add_row(entry.name, ", ".join(map(str, sorted(choice.candidates))), f"{choice.natural_density:.4f}",
                      f"{(choice.permuted_density if choice.chosen else best):.4f}", chosen)
    return table


def _module_table(analysis: Analysis) -> Table:
    block, dense = analysis.bound.block, "causal" if analysis.pattern.causal else "all"
    table = Table(title=f"Block-sparse kernels (the generated module at n = {analysis.n}; efficiency = allowed pairs "
                        f"/ (computed tiles x {block}^2))", title_justify="left")
    for column in ("head", "attention heads", "mask", "order (q / k)", "computed tiles", "of tiles",
                   f"dense ({dense})", "allowed pairs", "efficiency"):
        table.add_column(column, justify="left" if column in ("head", "attention heads", "order (q / k)") else "right")
    for entry in analysis.module_heads:
        heads = ", ".join(map(str, entry.attention_heads))
        totals = [str(entry.tiles), str(entry.dense_tiles)]
        if len(entry.masks) > 1:  # a head split into parts: their sum, then each part
            table.add_row(entry.name, heads, "all", "-", str(entry.computed), *totals, f"{entry.allowed:,}",
                          f"{entry.efficiency:.3f}")
        for mask in entry.masks:
            first = len(entry.masks) == 1
            table.add_row(entry.name if first else "", heads if first else "", str(mask.mask),
                          f"{mask.q_order} / {mask.k_order}", str(mask.computed), *(totals if first else ["", ""]),
                          f"{mask.allowed:,}", f"{mask.efficiency:.3f}")
    return table

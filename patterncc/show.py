"""`patterncc show`: a PNG of a pattern's connectivity, after figure 3 of the Sparse Transformer paper.

One panel per distinct attention head and one for their union: the n x n matrix of allowed (query i, key j)
pairs, with the pattern's block grid on top. Heads that are identical (a group that does not use `h`, or every
head of `combine merged`) share a panel. With `--grid R`, a second row shows, for one query position, which
cells of an R-wide 2-D image (position p at row p // R, column p % R) it sees.

Up to `EXACT_MAX_N` the pairs come from the reference masks (`patterncc.mask`). Beyond it the n x n mask is
never built: panels show the block layout (`analysis.layout`), each tile empty, partial or full.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import ir
from .analysis.layout import EMPTY, FULL, PARTIAL, BlockLayout, head_layout
from .errors import PatternUsageError
from .format import format_set
from .mask import eval_expr, head_mask
from .runtime.random_blocks import random_block_table
from .semantics import bind_pattern

__all__ = ["EXACT_MAX_N", "query_row", "render"]

EXACT_MAX_N = 2048  # larger n: draw tiles from the block layout instead of pairs
MAX_PANELS = 64  # distinct heads in one picture: each is a panel, and up to n = 2048 an n x n mask
_MAX_TILES = 4096  # tiles per side beyond which a layout picture is too large to compute and says nothing
_DPI = 150
_PIXELS = 512  # matrix cells per panel side (about its size in pixels); larger matrices are averaged down to this
_MAX_GRID_LINES = 32  # block lines per axis; beyond that only every k-th block boundary is drawn
_COLUMNS = 5  # panels per row before wrapping
_HEAD_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_UNION_COLOR = "#2f3e4e"
_QUERY_COLOR = "#d62728"
_PAD_COLOR = "#d9d9d9"

Pairs = tuple[tuple[ir.HeadGroup, int], ...]


@dataclass(frozen=True)
class _Panel:
    label: str  # which attention heads
    detail: str  # what they compute
    pairs: Pairs  # the (group, h) whose union they attend over
    color: str


def render(pattern: ir.Pattern, n: int, path: str | Path, grid: int | None = None, query: int | None = None,
           layer: int = 0) -> Path:
    """Draw `pattern` at sequence length n into the PNG at `path`; returns the path.

    grid: also show, for query position `query`, which cells of a `grid`-wide 2-D image it sees (default query:
    the middle of the sequence, n // 2, or with `grid` the cell at the centre of the image).
    layer: which layer of a `combine interleaved` pattern to draw.
    """
    path = _check_output(path)
    bound = bind_pattern(pattern, n)  # validates n and every parameter before anything is drawn
    if not isinstance(layer, int) or layer < 0:
        raise PatternUsageError(f"the layer must be a non-negative integer, got {layer!r}")
    if grid is not None and (not isinstance(grid, int) or grid < 1):
        raise PatternUsageError(f"the grid width must be a positive integer, got {grid!r}")
    if grid is not None and grid > n:
        raise PatternUsageError(f"the grid width must be at most n = {n} (a row of the image), got {grid}")
    distinct = len(set(bound.head_sets(layer)))
    if distinct > MAX_PANELS:
        raise PatternUsageError(f"this pattern has {distinct} distinct attention heads; `show` draws at most "
                                f"{MAX_PANELS}", hint="`patterncc check` reports every head")
    if query is None:
        query = n // 2 if grid is None else _middle_cell(n, grid)
    elif not isinstance(query, int) or not 0 <= query < n:
        raise PatternUsageError(f"the query position must be in 0..{n - 1} (n = {n}), got {query!r}")
    exact = n <= EXACT_MAX_N
    if not exact and -(-n // bound.block) > _MAX_TILES:
        raise PatternUsageError(f"n = {n} is too large to draw: {-(-n // bound.block)} tiles of {bound.block} per "
                                f"side (at most {_MAX_TILES})", hint=f"draw n <= {_MAX_TILES * bound.block}")

    panels = _panels(bound, layer)
    figure = _figure(bound, panels, exact, grid, query, layer)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    try:
        figure.savefig(path, format="png", dpi=_DPI, facecolor="white")
    except OSError as err:
        raise PatternUsageError(f"cannot write {path}: {err.strerror or err}") from None
    return path


def _middle_cell(n: int, width: int) -> int:
    """The position at the centre of the R-wide image, so that the query sees around itself in 2-D."""
    return min(n - 1, (math.ceil(n / width) // 2) * width + width // 2)


def _check_output(path: str | Path) -> Path:
    path = Path(path)
    if path.is_dir():
        raise PatternUsageError(f"the output {str(path)!r} is a folder; give a file name ending in .png")
    if path.suffix.lower() != ".png":
        raise PatternUsageError(f"the output must be a .png file, got {str(path)!r}", hint="e.g. -o out.png")
    parent = path.parent
    if not parent.is_dir():
        raise PatternUsageError(f"cannot write {str(path)!r}: the folder {str(parent)!r} does not exist")
    return path


# What to draw --------------------------------------------------------------------------------------------------


def _describe(group: ir.HeadGroup) -> str:
    body = group.body
    if isinstance(body, ir.Kernel):
        return f"kernel({body.feature_map}): its support"
    if isinstance(body, ir.Hashed):
        return "hashed: support only, actual pairs depend on the data"
    text = format_set(body)
    return text if len(text) <= 44 else text[:41] + "..."


def _panels(bound: ir.Bound, layer: int) -> list[_Panel]:
    """Distinct attention heads of `layer` (identical heads share one), then the union if it adds anything."""
    distinct: dict[tuple, tuple[Pairs, list[int]]] = {}
    for k, pairs in enumerate(bound.head_sets(layer)):
        key = tuple((g.name, h if g.uses_head_index else 0) for g, h in pairs)
        distinct.setdefault(key, (pairs, []))[1].append(k)
    panels = []
    for index, (pairs, heads) in enumerate(distinct.values()):
        color = _HEAD_COLORS[index % len(_HEAD_COLORS)]
        count = f" (heads {_ranges(heads)})" if len(heads) > 1 else f" (head {heads[0]})"
        if len(pairs) == 1:
            group, h = pairs[0]
            name = f"{group.name}[h={h}]" if group.uses_head_index else group.name
            panels.append(_Panel(name + count, _describe(group), pairs, color))
        else:
            names = ", ".join(dict.fromkeys(g.name for g, _ in pairs))
            panels.append(_Panel("merged" + count, f"union of {names}", pairs, color))
    if len(panels) > 1:
        every = tuple(dict.fromkeys(pair for panel in panels for pair in panel.pairs))
        panels.append(_Panel("union of all heads", f"{len(bound.head_sets(layer))} heads", every, _UNION_COLOR))
    return panels


def _ranges(ks: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], ks[0]
    for a, b in zip(ks, [*ks[1:], None]):
        if b != a + 1:
            out.append(str(a) if a == start else f"{start}-{a}")
            start = b
    return ", ".join(out)


# Masks and rows ------------------------------------------------------------------------------------------------


def _panel_mask(bound: ir.Bound, pairs: Pairs, cache: dict) -> torch.Tensor:
    out = torch.zeros(bound.n, bound.n, dtype=torch.bool)
    for group, h in pairs:
        key = (group.name, h)
        if key not in cache:
            cache[key] = head_mask(bound, group, h)
        out |= cache[key]
    return out


def query_row(bound: ir.Bound, pairs: Pairs, query: int) -> torch.Tensor:
    """Boolean (n,): the keys `query` sees in the union of `pairs`, without building the n x n mask."""
    n = bound.n
    i = torch.tensor([[query]], dtype=torch.int64)
    j = torch.arange(n, dtype=torch.int64)[None, :]
    out = torch.zeros(1, n, dtype=torch.bool)
    for group, h in pairs:
        if group.family != "set":
            out[:] = True  # kernel heads: their support; hashed heads: the upper bound on their pairs
            continue
        env = {**bound.env, "n": n, "h": h}
        out |= _set_row(group.body, {**env, "i": i, "j": j}, env, bound, query)
    if bound.pattern.causal:
        out &= j <= query
    return out[0]


def _set_row(s: ir.SetExpr, env: dict, ints: dict, bound: ir.Bound, query: int) -> torch.Tensor:
    n = bound.n

    def primitive(p: ir.SetPrimitive) -> torch.Tensor:
        if isinstance(p, ir.Random):
            blocks = -(-n // bound.block)
            table = random_block_table(blocks, blocks, ir.evaluate_int(p.r, ints), ir.evaluate_int(p.seed, ints),
                                       bound.pattern.causal)
            return table[query // bound.block, torch.arange(n) // bound.block][None, :]
        return torch.as_tensor(eval_expr(p.predicate(), env), dtype=torch.bool).expand(1, n)

    return ir.fold_set_bool(s, primitive)


def _pool(mask: torch.Tensor, pixels: int) -> tuple[torch.Tensor, int]:
    """Average k x k cells so that the matrix is at most `pixels` wide; returns (fractions, k)."""
    n = mask.shape[0]
    k = max(1, math.ceil(n / pixels))
    if k == 1:
        return mask.float(), 1
    m = math.ceil(n / k) * k
    padded = torch.zeros(m, m)
    padded[:n, :n] = mask.float()
    return padded.view(m // k, k, m // k, k).mean(dim=(1, 3)), k


def _density(bound: ir.Bound, count: int) -> str:
    n = bound.n
    total = n * (n + 1) // 2 if bound.pattern.causal else n * n
    return f"{count:,} pairs, {100 * count / total:.3g}% of {'causal' if bound.pattern.causal else 'all'}"


def _tile_density(layout: BlockLayout) -> str:
    counts = layout.counts()
    tiles = layout.classes.numel()
    return (f"block layout: {100 * (tiles - counts['empty']) / tiles:.3g}% of tiles non-empty, "
            f"{100 * counts['full'] / tiles:.3g}% full")


# Drawing -------------------------------------------------------------------------------------------------------


def _figure(bound: ir.Bound, panels: list[_Panel], exact: bool, grid: int | None, query: int, layer: int):
    from matplotlib.figure import Figure

    n = bound.n
    columns = min(len(panels), _COLUMNS)
    chunks = [panels[k:k + columns] for k in range(0, len(panels), columns)]
    panel = 3.4  # inches per matrix panel side
    # Each matrix row needs room for three title lines and the axis labels, each grid row for one title line.
    heights = [panel + 1.0]
    if grid:
        heights.append(panel * min(max(math.ceil(n / grid) / grid, 0.2), 1.5) + 0.4)
    heights = heights * len(chunks)
    extra = 0.9 if exact else 1.3
    figure = Figure(figsize=(max(columns * (panel + 0.3), 5.0), sum(heights) + extra), layout="constrained")
    rows = figure.add_gridspec(len(heights), columns, height_ratios=heights)
    figure.suptitle(_suptitle(bound, exact, layer, narrow=columns < 3), fontsize=11)
    masks: dict = {}  # (group, h) -> (n, n), shared by the heads' panels and the union's
    row = 0
    for chunk in chunks:
        for col, p in enumerate(chunk):
            ax = figure.add_subplot(rows[row, col])
            if exact:
                _draw_pairs(ax, bound, p, query if grid else None, masks)
            else:
                _draw_tiles(ax, bound, p, query if grid else None)
        row += 1
        if grid:
            for col, p in enumerate(chunk):
                _draw_grid(figure.add_subplot(rows[row, col]), bound, p, grid, query)
            row += 1
    if not exact:
        from matplotlib.patches import Patch

        shades = [Patch(facecolor=c, edgecolor="#999999", label=s) for s, c in
                  (("empty tile", "white"), ("partial tile (light)", "#c6c6c6"), ("full tile (dark)", "#525252"))]
        figure.legend(handles=shades, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return figure


def _suptitle(bound: ir.Bound, exact: bool, layer: int, narrow: bool) -> str:
    p = bound.pattern
    params = ", ".join(f"{q.name} = {bound.env[q.name]}" for q in p.params if q.name in bound.env)
    parts = [f"{p.name}({params})", f"n = {bound.n:,}", f"block {bound.block}",
             "causal" if p.causal else "bidirectional"]
    if p.combine != "multihead":
        parts.append(f"combine {p.combine}" + (f", layer {layer}" if p.combine == "interleaved" else ""))
    step = _grid_step(bound.n, bound.block)
    if exact and step > 1:
        parts.append(f"grid lines every {step} blocks")
    title = parts[0] + ("\n" if narrow else "   ") + "   ".join(parts[1:])
    if not exact:
        title += f"\nn > {EXACT_MAX_N}: block layout at tile {bound.block} (tiles, not pairs)"
    return title


def _shaded(color: str):
    """White to `color`, for fractions of lit pairs."""
    from matplotlib.colors import LinearSegmentedColormap

    return LinearSegmentedColormap.from_list("lit", ["white", color])


def _three_shades(color: str):
    """Empty, partial, full tiles."""
    from matplotlib.colors import ListedColormap

    return ListedColormap(["white", _lighten(color), color])


def _lighten(color: str, amount: float = 0.6) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return tuple(c + (1 - c) * amount for c in to_rgb(color))


def _style(ax, n: int, title: str) -> None:
    ax.set_title(title, fontsize=8, loc="left")
    ax.set_xlim(0, n)
    ax.set_ylim(n, 0)
    ax.set_xlabel("key j", fontsize=8, labelpad=1)
    ax.set_ylabel("query i", fontsize=8, labelpad=1)
    ax.tick_params(labelsize=7, length=2)
    for spine in ax.spines.values():
        spine.set_color("#888888")


def _grid_step(n: int, block: int) -> int:
    """Draw every `step`-th block boundary, so that the lines do not hide the pattern."""
    return max(1, math.ceil(_boundaries(n, block) / _MAX_GRID_LINES))


def _boundaries(n: int, block: int) -> int:
    return (n - 1) // block


def _block_lines(ax, bound: ir.Bound, query: int | None, tiles: bool = False) -> None:
    """The block grid (in a tile picture, only when every boundary can be drawn) and the --grid query's row."""
    n, block = bound.n, bound.block
    step = _grid_step(n, block)
    if not (tiles and step > 1):
        at = [k * block for k in range(step, _boundaries(n, block) + 1, step)]
        style = {"colors": "#7f7f7f", "linewidths": 0.4, "alpha": 0.45}
        ax.vlines(at, 0, n, **style)
        ax.hlines(at, 0, n, **style)
    if query is not None:
        ax.axhline(query + 0.5, color=_QUERY_COLOR, linewidth=0.8, alpha=0.8)


def _draw_pairs(ax, bound: ir.Bound, p: _Panel, query: int | None, masks: dict) -> None:
    from matplotlib.colors import Normalize, PowerNorm

    n = bound.n
    mask = _panel_mask(bound, p.pairs, masks)
    image, k = _pool(mask, _PIXELS)
    # Square-root shading keeps one lit pair in an averaged k x k cell visible.
    norm = PowerNorm(gamma=0.5, vmin=0, vmax=1) if k > 1 else Normalize(vmin=0, vmax=1)
    ax.imshow(image.numpy(), cmap=_shaded(p.color), norm=norm, extent=(0, k * image.shape[1], k * image.shape[0], 0),
              interpolation="nearest")
    _block_lines(ax, bound, query)
    pooled = f"; pixel = {k}x{k} pairs" if k > 1 else ""
    _style(ax, n, f"{p.label}\n{p.detail}\n{_density(bound, int(mask.sum()))}{pooled}")


def _draw_tiles(ax, bound: ir.Bound, p: _Panel, query: int | None) -> None:
    n = bound.n
    layout = head_layout(bound, p.pairs)
    classes = layout.classes
    k = max(1, math.ceil(max(classes.shape) / _PIXELS))
    if k > 1:  # more tiles than pixels: each pixel shows the densest of its k x k tiles
        classes = torch.nn.functional.max_pool2d(classes[None].float(), k, ceil_mode=True)[0].to(torch.int8)
    ax.imshow(classes.numpy(), cmap=_three_shades(p.color), vmin=EMPTY, vmax=FULL, interpolation="nearest",
              extent=(0, k * classes.shape[1] * layout.tile_n, k * classes.shape[0] * layout.tile_m, 0))
    assert (EMPTY, PARTIAL, FULL) == (0, 1, 2)  # the colormap's order
    _block_lines(ax, bound, query, tiles=True)
    pooled = f"; pixel = {k}x{k} tiles" if k > 1 else ""
    _style(ax, n, f"{p.label}\n{p.detail}\n{_tile_density(layout)}{pooled}")


def _draw_grid(ax, bound: ir.Bound, p: _Panel, width: int, query: int) -> None:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Rectangle

    n = bound.n
    row = query_row(bound, p.pairs, query)
    height = math.ceil(n / width)
    cells = torch.full((height * width,), -1, dtype=torch.int8)  # -1: past the end of the sequence
    cells[:n] = row.to(torch.int8)
    ax.imshow(cells.view(height, width).numpy(), cmap=ListedColormap([_PAD_COLOR, "white", p.color]), vmin=-1,
              vmax=1, interpolation="nearest", extent=(0, width, height, 0))
    x, y = query % width, query // width
    ax.add_patch(Rectangle((x, y), 1, 1, facecolor=_QUERY_COLOR, edgecolor=_QUERY_COLOR, linewidth=1.2))
    if max(width, height) > 32:  # the cell is too small to see: ring it
        ax.plot(x + 0.5, y + 0.5, marker="o", markersize=9, markerfacecolor="none", markeredgecolor=_QUERY_COLOR,
                markeredgewidth=1.2)
    if width <= 64 and height <= 64:
        style = {"colors": "white", "linewidths": 0.3}
        ax.vlines(range(1, width), 0, height, **style)
        ax.hlines(range(1, height), 0, width, **style)
    ax.set_xticks([])
    ax.set_yticks([])
    hashed = any(g.family == "hashed" for g, _ in p.pairs)
    note = "\nsupport: actual pairs depend on the data" if hashed else ""
    ax.set_title(f"query {query} (row {query // width}, col {query % width}) sees {int(row.sum()):,} "
                 f"of {n:,}{note}", fontsize=8, loc="left")
    for spine in ax.spines.values():
        spine.set_color("#888888")

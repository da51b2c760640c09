"""Stage 4: a bound pattern -> a kernel plan -> generated source (Jinja templates in `templates/`).

All decisions are made here, in Python: which attention heads share a mask, each mask's predicate (with
parameters that do not depend on n folded to constants, and `causal` included), which permutation makes a
mask block-sparse, which parameters are runtime arguments (those that depend on n, so a new sequence length
never recompiles a kernel), int32 vs int64 arithmetic. Templates only place the emitted expressions.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from dataclasses import dataclass
from functools import cache

import jinja2

from . import __version__, ir
from .emit import RandomRef, TilesEmitter, TorchEmitter, TritonEmitter, describe, fold, needs_int64, value_range
from .errors import PatternUsageError
from .resources import resource_dir
from .semantics import bind_pattern
from .wrap import wrap_code, wrap_comment

# Sequence length at which candidate permutations are searched when the caller gives none. A grid transpose
# with period l needs n / l >= block positions per residue class to pay off, so this is long; the generated
# module still decides per n whether the candidate beats natural order.
REFERENCE_N = 16384


@dataclass(frozen=True)
class RandomTable:
    """One `random(r, seed)` node of a mask: r and seed as Python source over n and runtime parameters."""

    r: str
    seed: str


@dataclass(frozen=True)
class MaskPlan:
    """One distinct connectivity the block-sparse kernels run: a head's whole set, or one part of it when the head
    is split (heads with equal (group, h) sets share their masks)."""

    index: int
    heads: tuple[str, ...]  # the declared heads it is the union of, e.g. ("local",) or ("far[1]",)
    predicate: ir.Expr  # over i, j, n and runtime parameters; causal included; constants folded
    period: str | None  # Python source of a candidate grid-transpose period, or None for natural order only
    period_formula: str | None
    random_tables: tuple[RandomTable, ...]
    part: tuple[int, int] | None = None  # (k, parts): part k (from 1) of a head split into disjoint parts

    @property
    def math(self) -> str:
        return describe(self.predicate)

    @property
    def label(self) -> str:
        """e.g. "local", "a | b" or "strided, part 2 of 2"."""
        return " | ".join(self.heads) + (f", part {self.part[0]} of {self.part[1]}" if self.part else "")


@dataclass(frozen=True)
class HashedCall:
    """Attention heads of one hashed group with the same parameters: one `lsh_attention` call."""

    name: str  # module attribute of its rotations buffer, e.g. "rotations_lsh"
    group: str
    heads: tuple[int, ...]  # attention heads of the module
    draws: tuple[tuple[int, int], ...]  # per head: (seed, h); its rotation is lsh_rotations(count, ..., seed)[h]
    count: int  # heads in the declared group
    buckets: int
    rounds: int
    chunk: int
    shared_qk: bool


@dataclass(frozen=True)
class KernelCall:
    """Attention heads of one kernel (linear attention) group with the same parameters: one `linear_attention`
    call."""

    name: str  # module attribute of its FAVOR+ projection buffer (favor only), e.g. "projection_summary"
    group: str
    heads: tuple[int, ...]
    draws: tuple[tuple[int, int], ...]  # favor: per head (seed, h), as for HashedCall
    count: int
    feature_map: str
    features: int | None
    eps: float


@dataclass(frozen=True)
class KernelPlan:
    pattern: ir.Pattern
    params: dict  # parameter overrides baked in
    layer: int
    class_name: str
    prefix: str
    num_heads: int
    head_families: tuple[str, ...]  # attention head -> "set", "hashed" or "kernel"
    set_heads: tuple[int, ...]  # attention heads run by the block-sparse kernels, in order
    head_masks: tuple[tuple[int, ...], ...]  # set head (index into set_heads) -> its masks (parts), disjoint
    masks: tuple[MaskPlan, ...]
    runtime_params: tuple[tuple[str, str], ...]  # (name, Python source over n and earlier ones), in order
    runtime_ranges: tuple[tuple[str, tuple[int, int]], ...]  # bounds of n and runtime parameters
    block: int
    causal: bool
    int64: bool
    hashed_calls: tuple[HashedCall, ...] = ()
    kernel_calls: tuple[KernelCall, ...] = ()

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(f for f in ("set", "hashed", "kernel") if f in self.head_families)

    @property
    def permuted(self) -> bool:
        return any(m.period is not None for m in self.masks)

    @property
    def has_random(self) -> bool:
        return any(m.random_tables for m in self.masks)

    @property
    def random_tables(self) -> list[tuple[int, RandomTable]]:
        """(mask index, table) for every random table, in kernel table order."""
        return [(m.index, t) for m in self.masks for t in m.random_tables]


class PythonEmitter(TorchEmitter):
    """Plain Python integers (for runtime parameters): `//` and `%` already floor."""

    def call(self, func, args):
        return f"math.isqrt({args[0]})" if func == "isqrt" else f"{func}({', '.join(args)})"

    def not_(self, a):
        return f"(not {a})"

    def binary(self, op, a, b):
        return f"({a} {op} {b})"


def _class_name(name: str) -> str:
    # The one user-derived name in a generated module. Library names are snake_case, UPPER_CASE or _Private, and
    # never end in "Attention" after a capital: "<CamelCase>Attention" cannot collide with any of them.
    return "".join(part[:1].upper() + part[1:] for part in re.split(r"_+", name) if part) + "Attention"


def plan(pattern: ir.Pattern, layer: int = 0, n: int | None = None, params: dict | None = None) -> KernelPlan:
    """Decide everything the templates need for `pattern` (already carrying any parameter overrides)."""
    dependent = pattern.depends_on_n()
    if pattern.block.free_vars() & (dependent | {"n"}):
        raise PatternUsageError("the block size must not depend on n: it is the kernels' tile size",
                                filename=pattern.filename)
    bound = bind_pattern(pattern, n or REFERENCE_N)

    # Parameters and lets that do not change with n become constants; the others are runtime arguments.
    constants = {k: v for k, v in bound.env.items() if k not in dependent}
    python = PythonEmitter({"n": "n", **{k: f"P_{k}" for k in dependent}}, {})
    runtime: list[tuple[str, str]] = []
    ranges: dict[str, tuple[int, int]] = {"n": (1, 1 << 30)}
    for name, expr in [(p.name, p.default) for p in pattern.params] + list(pattern.lets):
        if name in dependent:
            body = fold(ir.substitute(expr, constants))
            runtime.append((name, python(body)))
            ranges[name] = value_range(body, ranges) or (0, 1)
    head_sets = bound.head_sets(layer)
    head_families = tuple(pairs[0][0].family for pairs in head_sets)  # `combine merged` unions set heads only
    set_heads = tuple(head for head, family in enumerate(head_families) if family == "set")
    hashed_calls, kernel_calls = _family_calls(pattern, bound, head_sets, constants, dependent | {"n"})
    masks: list[MaskPlan] = []
    keys: dict[tuple, int] = {}
    head_masks: list[tuple[int, ...]] = []
    for pairs in (head_sets[head] for head in set_heads):
        members, tables, labels = [], [], []
        for group, h in pairs:
            env = {**constants, "h": h}
            for member in ir.union_members(group.body):
                body, member_tables = _lower_set(member, env, pattern.block, python, len(tables), bound.block)
                members.append(((dataclasses.replace(group, body=member), h), body))
                tables.extend(member_tables)
            labels.append(f"{group.name}[{h}]" if bound.counts[pattern.heads.index(group)] > 1 else group.name)
        parts = _split_union(bound, pairs, members, tables)
        indices = []
        for k, (predicate, period) in enumerate(parts):
            if pattern.causal:
                predicate = ir.and_(predicate, ir.cmp("<=", ir.J, ir.I))
            predicate = fold(predicate)
            part = (k + 1, len(parts)) if len(parts) > 1 else None
            key = (predicate, tuple(tables), part)  # tables numbered from 0 within the head, for deduplication
            if key not in keys:
                if len(parts) > 1:
                    source, formula = _period_source(bound, predicate, period, python)
                else:
                    source, formula = _choose_period(bound, pairs, predicate, python)
                # In the kernel, tables of all masks live in one tensor: renumber this mask's from the running total.
                predicate = _renumber_tables(predicate, sum(len(m.random_tables) for m in masks))
                keys[key] = len(masks)
                masks.append(MaskPlan(len(masks), tuple(labels), predicate, source, formula, tuple(tables), part))
            indices.append(keys[key])
        head_masks.append(tuple(indices))

    int64 = any(needs_int64(m.predicate, ranges) for m in masks)
    return KernelPlan(
        # Overrides reach the header as re-printed plain ints: an int subclass's own __str__ never does.
        pattern=pattern, params={str(k): int(v) for k, v in (params or {}).items()}, layer=layer,
        class_name=_class_name(pattern.name),
        prefix=pattern.name.lower(), num_heads=len(head_sets), head_families=head_families, set_heads=set_heads,
        head_masks=tuple(head_masks), masks=tuple(masks), runtime_params=tuple(runtime),
        runtime_ranges=tuple(ranges.items()), block=bound.block, causal=pattern.causal, int64=int64,
        hashed_calls=hashed_calls, kernel_calls=kernel_calls)


def _family_calls(pattern: ir.Pattern, bound: ir.Bound, head_sets, constants: dict,
                  n_dependent: set[str]) -> tuple[tuple[HashedCall, ...], tuple[KernelCall, ...]]:
    """Hashed and kernel heads, grouped into calls of heads with equal parameters (values bound per head h).

    Their parameters fix buffer shapes (rotations, projections) and kernel constants, so they must not depend
    on n. Each head's random draw is (seed, h): row h of the group's draw from that seed, so the heads of a
    group differ even when they share a seed, and a module's buffers are reproducible from the pattern alone.
    """
    calls: dict[tuple, list[int]] = {}
    draws: dict[tuple, list[tuple[int, int]]] = {}
    for head, pairs in enumerate(head_sets):
        group, h = pairs[0]
        if group.family == "set":
            continue
        body = group.body
        for expr in body.exprs():
            if expr.free_vars() & n_dependent:
                raise PatternUsageError(
                    f"the parameters of {group.family} head `{group.name}` must not depend on n: they fix the "
                    f"shapes of its random buffers and its kernels' constants", filename=pattern.filename)

        def value(expr, group=group, h=h):
            return ir.evaluate_int(expr, {**constants, "h": h, "n": bound.n})

        count = bound.counts[pattern.heads.index(group)]
        if isinstance(body, ir.Hashed):
            key = ("hashed", group.name, count, value(body.buckets), value(body.rounds), value(body.chunk),
                   body.shared_qk)
        else:
            features = value(body.features) if body.features is not None else None
            key = ("kernel", group.name, count, body.feature_map, features, body.eps)
        calls.setdefault(key, []).append(head)
        draws.setdefault(key, []).append((value(body.seed), h))
    hashed: list[HashedCall] = []
    kernel: list[KernelCall] = []
    for index, (key, heads) in enumerate(calls.items()):
        family, group, count, *rest = key
        # Buffer names carry the call's index, unique in the module, before the group's name: `a` with per-head
        # parameters and a group named `a_0` can never share one.
        suffix = f"{index}_{group}"
        if family == "hashed":
            buckets, rounds, chunk, shared_qk = rest
            hashed.append(HashedCall(f"rotations_{suffix}", group, tuple(heads), tuple(draws[key]), count, buckets,
                                     rounds, chunk, shared_qk))
        else:
            feature_map, features, eps = rest
            kernel.append(KernelCall(f"projection_{suffix}", group, tuple(heads), tuple(draws[key]), count,
                                     feature_map, features, eps))
    return tuple(hashed), tuple(kernel)


def _renumber_tables(expr: ir.Expr, offset: int) -> ir.Expr:
    return ir.map_expr(expr, lambda e: RandomRef(e.table + offset, e.block) if isinstance(e, RandomRef) else e)


def _lower_set(s: ir.SetExpr, env: dict, block_expr: ir.Expr, python: PythonEmitter, first_table: int,
               block: int) -> tuple[ir.Expr, list[RandomTable]]:
    """A set as one predicate over i, j with `random` nodes replaced by table references."""
    tables: list[RandomTable] = []

    def primitive(node: ir.SetPrimitive) -> ir.Expr:
        if isinstance(node, ir.Random):
            r, seed = (fold(ir.substitute(e, env)) for e in (node.r, node.seed))
            tables.append(RandomTable(python(r), python(seed)))
            return RandomRef(first_table + len(tables) - 1, block)
        return fold(ir.substitute(node.predicate(), env))

    return fold(ir.fold_set(s, primitive=primitive, union=ir.or_, intersect=ir.and_,
                            difference=lambda a, b: ir.and_(a, ir.Not(b)))), tables


def _choose_period(bound, pairs, predicate, python) -> tuple[str | None, str | None]:
    """The grid-transpose period that makes this mask block-sparse (from the analysis), as Python source."""
    from .analysis.permute import choose_permutation

    perm = choose_permutation(bound, pairs, tile=bound.block)
    return _period_source(bound, predicate, None if perm is None else perm.period, python)


def _period_source(bound, predicate, period: int | None, python) -> tuple[str | None, str | None]:
    """(Python source of `period`, its formula): the modulus expression of the predicate that evaluates to it, so
    the period follows n at run time, or the number itself."""
    from .analysis.permute import Permutation

    if period is None:
        return None, None
    for node in predicate.walk():
        if isinstance(node, ir.BinOp) and node.op == "%":
            try:
                value = ir.evaluate_int(node.right, {**bound.env, "n": bound.n})
            except (KeyError, ZeroDivisionError):
                continue
            if value == period:
                return python(node.right), Permutation(period).formula
    return str(period), Permutation(period).formula


# A head whose set is a union is split into disjoint parts, each visited in its own order and combined by
# log-sum-exp, when the parts compute at most this share of the tiles the union computes in its best order (at the
# reference length; the extra launches and the combine are paid per part).
SPLIT_GAIN = 0.5


def _split_union(bound, pairs, members, tables) -> list[tuple[ir.Expr, int | None]]:
    """A set head's parts: [(predicate without causal, grid-transpose period or None)]. One part (the union) unless
    its union members prefer different visiting orders and splitting pays (SPLIT_GAIN): then part k is the union of
    the members preferring the k-th order (natural first) minus every earlier part, so the parts are disjoint and
    the union is exactly the head's set. `members`: [((group with the member as body, h), member predicate)]."""
    from .analysis.permute import search_permutation

    whole = members[0][1]
    for _, predicate in members[1:]:
        whole = ir.or_(whole, predicate)
    if len(members) < 2 or tables:  # random tables are numbered per head: such heads stay whole
        return [(whole, None)]

    def best(choice) -> tuple[float, int | None]:
        if choice.chosen is None:
            return choice.natural_density, None
        return choice.permuted_density, choice.chosen.period

    classes: dict[int | None, list[ir.Expr]] = {}
    member_cost = 0.0
    for pair, predicate in members:
        density, period = best(search_permutation(bound, (pair,)))
        classes.setdefault(period, []).append(predicate)
        member_cost += density
    union_cost, _ = best(search_permutation(bound, pairs))
    if len(classes) < 2 or member_cost > SPLIT_GAIN * union_cost:
        return [(whole, None)]
    parts, earlier = [], None
    for period in sorted(classes, key=lambda p: (p is not None, p or 0)):
        union = classes[period][0]
        for predicate in classes[period][1:]:
            union = ir.or_(union, predicate)
        parts.append((union if earlier is None else ir.and_(union, ir.Not(earlier)), period))
        earlier = union if earlier is None else ir.or_(earlier, union)
    return parts


# Rendering -----------------------------------------------------------------------------------------------------


@cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resource_dir("templates"))),
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    environment.filters["py"] = python_literal
    environment.filters["wrap"] = wrap_code
    environment.filters["wrap_comment"] = wrap_comment
    return environment




def render(kernel_plan: KernelPlan, key: str) -> str:
    """The generated module's source text: the template rendered with the pattern's hooks, then the library
    definitions they reach (patterncc.assemble). `key` is the compiled pattern's identity key (the driver's
    `identity_key`), shown in the file. The driver's next pass verifies the result (patterncc.verify)."""
    import torch

    from .assemble import assemble

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    pattern = kernel_plan.pattern
    runtime = {name: f"P_{name}" for name, _ in kernel_plan.runtime_params}
    ranges = dict(kernel_plan.runtime_ranges)
    triton_emit = TritonEmitter({"i": "o_i", "j": "o_j", "n": "n_ctx", **runtime}, ranges)
    torch_emit = TorchEmitter({"i": "pos_i", "j": "pos_j", "n": "n", **runtime}, ranges)
    tiles_emit = TilesEmitter({"i": "i", "j": "j", "n": "n", **runtime}, ranges)
    masks = []
    for m in kernel_plan.masks:
        pred = m.predicate
        constant = pred.value if isinstance(pred, ir.Const) else None
        masks.append({
            "plan": m,
            "triton_tile": (f"tl.full([ROWS, COLS], {int(constant)}, tl.int1)" if constant is not None
                            else f"tl.broadcast_to({triton_emit(pred)}, [ROWS, COLS])"),
            "torch": None if constant is not None else torch_emit(pred),
            "tiles": tiles_emit(pred),
            "constant": constant,
        })
    # The pattern is re-printed from the IR, never copied from the file: comments in an untrusted .attn file
    # stay out of generated code, and the file name is shown through repr() (it could hold a newline).
    from .format import format_pattern

    favor = sorted({call.features for call in kernel_plan.kernel_calls if call.feature_map == "favor"})
    buffer_names = [c.name for c in kernel_plan.hashed_calls]
    buffer_names += [c.name for c in kernel_plan.kernel_calls if c.feature_map == "favor"]
    # Each call as a typed literal of its family (LshCall / LinearCall in patterncc/families/*/ops.py).
    call_literals = {call.name: _call_literal("LshCall", buffer=call.name, heads=call.heads, draws=call.draws,
                                              count=call.count, buckets=call.buckets, rounds=call.rounds,
                                              chunk=call.chunk, shared_qk=call.shared_qk)
                     for call in kernel_plan.hashed_calls}
    call_literals.update({call.name: _call_literal("LinearCall", buffer=call.name, heads=call.heads,
                                                   draws=call.draws, count=call.count, feature_map=call.feature_map,
                                                   features=call.features, eps=call.eps)
                          for call in kernel_plan.kernel_calls})
    context = dict(
        plan=kernel_plan, masks=masks, call_literals=call_literals,
        permuted_masks=[m for m in masks if m["plan"].period],
        buffer_names=tuple(buffer_names), has_favor=bool(favor),
        can_step=kernel_plan.families == ("kernel",) and kernel_plan.causal,
        # KV-cache generation (prefill/decode): every family of a causal pattern.
        can_decode=kernel_plan.causal,
        head_summary=_head_summary(kernel_plan), version=__version__, torch_version=torch.__version__,
        triton_version=triton_version, source_lines=format_pattern(pattern).splitlines(),
        filename=repr(str(pattern.filename)),
        unpack_params=(f"({', '.join(f'P_{name}' for name, _ in kernel_plan.runtime_params)},) = runtime_params(n)"
                       if kernel_plan.runtime_params else None),
        runtime_params=[(f"P_{name}", source) for name, source in kernel_plan.runtime_params],
        key=key,
    )
    template = _environment().get_template("module.py.jinja")
    # First pass: the pattern's own code, to learn which library definitions it reaches.
    skeleton = template.render(**context, library="", stdlib_imports=(), public_names="[]")
    # Kernel heads: only the feature maps this pattern uses reach the kernels (and the module's checks).
    feature_maps = tuple(sorted({call.feature_map for call in kernel_plan.kernel_calls}))
    constants = {"FEATURE": feature_maps, "FAVOR": tuple({m == "favor" for m in feature_maps})} if feature_maps else {}
    # Set heads: without a candidate visiting order, the permutation code of the layout, CPU path and kernels goes.
    permuted = bool(context["permuted_masks"])
    constants.update(PERMUTED=(permuted,), PERMUTED_ORDERS=(permuted,))
    library = assemble(_global_reads(skeleton), constants=constants,
                       values={"LINEAR_FEATURE_MAPS": feature_maps} if feature_maps else None)
    public = _public_names(kernel_plan, context, library.names)
    source = template.render(**context, library=library.text.rstrip("\n"), stdlib_imports=library.imports,
                             public_names=_format_list(public))
    return source


# Entry points a generated module offers besides its attention function and class, when its plan uses them.
_LIBRARY_ENTRY_POINTS = ("CONFIG_OVERRIDE", "blocksparse_attention", "lsh_attention", "lsh_rotations",
                         "linear_attention", "linear_favor_projection")


def _public_names(kernel_plan: KernelPlan, context: dict, library_names: frozenset[str]) -> list[str]:
    names = [kernel_plan.class_name, "attention", "ATTENTION_OP", "NUM_HEADS", "HEAD_FAMILIES", "CAUSAL", "PATTERN_KEY"]
    if kernel_plan.masks:
        names += ["SET_HEADS", "PATTERN_MASKS", "get_layout"]
    if context["buffer_names"]:
        names += ["BUFFERS", "default_buffers"]
    if context["can_step"]:
        names += ["init_state", "step"]
    if context["can_decode"]:
        names += ["new_cache", "prefill", "decode"]
    return names + [name for name in _LIBRARY_ENTRY_POINTS if name in library_names]


def _format_list(names: list[str]) -> str:
    """A list literal of names, wrapped at 120 columns."""
    lines, line = [], "__all__ = ["
    for index, name in enumerate(names):
        item = repr(name) + (", " if index < len(names) - 1 else "]")
        if len(line) + len(item.rstrip()) > 120:
            lines.append(line.rstrip())
            line = "    "
        line += item
    lines.append(line)
    return "\n".join(lines)[len("__all__ = "):]


def _global_reads(source: str) -> set[str]:
    return {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}


def _call_literal(kind: str, **fields) -> str:
    return f"{kind}(" + ", ".join(f"{name}={python_literal(value)}" for name, value in fields.items()) + ")"


def python_literal(value) -> str:
    """Re-print a plan value as a Python literal: ints, bools, floats, None and strings (identifiers from the
    IR), and tuples of them. Anything else is a bug, never pasted."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return repr(int(value))
    if isinstance(value, float):
        return repr(float(value))
    if isinstance(value, str):
        return repr(str(value))
    if isinstance(value, list):
        return "[" + ", ".join(python_literal(v) for v in value) + "]"
    if isinstance(value, tuple):
        items = [python_literal(v) for v in value]
        return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
    raise TypeError(f"not a plan literal: {type(value).__name__}")


def _head_summary(kernel_plan: KernelPlan) -> str:
    """e.g. "heads 0-3 set, 4-5 kernel"."""
    runs: list[list] = []
    for head, family in enumerate(kernel_plan.head_families):
        if runs and runs[-1][2] == family:
            runs[-1][1] = head
        else:
            runs.append([head, head, family])
    return ", ".join(f"{'head' if a == b else 'heads'} {a if a == b else f'{a}-{b}'} {family}" for a, b, family in runs)

"""What the block-sparse kernels need of a pattern, and the per-sequence-length layout built from it.

`BlockMasks` is the family's slice of the plan: a pattern's distinct masks (set heads sharing a connectivity
share a mask), each with its predicate on positions, its tile classes in closed form, its candidate visiting
order and its random block tables. Generated modules build one from the pattern's hooks; `dense_block_masks`
builds one from boolean [n, n] masks (the tests' way to run the kernels on any mask). `Layout` is everything the
kernels need for one sequence length: tile lists per mask (and transposed, for dK/dV), permutations, tables and
runtime parameters, built once per (n, device) without an n x n mask.
"""

import torch

from ...runtime import tiles

# Whether layouts may visit a mask in a permuted order (a grid transpose). The library can; a generated module
# whose masks have no candidate order is assembled with False, which drops every branch that tests it
# (patterncc.assemble).
PERMUTED_ORDERS = True


class BlockMasks:
    """A pattern's masks for the block-sparse kernels.

    block: the layout tile size; head_masks: set head -> its mask, or the tuple of its masks when the head is split
    into disjoint parts (run one after another and combined by log-sum-exp); permuted: whether any mask has a
    candidate visiting order; int64: whether predicates need 64-bit arithmetic. The callables, each for a sequence
    length n: params(n) -> tuple of runtime parameters (kernel arguments, never a recompile); tables(n) -> list of block
    tables (random primitives); positions(mask, n) -> original position per slot of the mask's candidate order, or
    None; tile_classes(mask, n, tables, positions) -> int8 EMPTY/PARTIAL/FULL per tile pair;
    allowed(mask, pos_i, pos_j, n, tables) -> bool tensor, the predicate on position tensors (the CPU path).
    """

    def __init__(self, *, block, head_masks, num_masks, permuted, int64, params, tables, positions, tile_classes,
                 allowed):
        self.block = block
        self.head_masks = [tuple(m) if isinstance(m, (tuple, list)) else (m,) for m in head_masks]
        self.num_parts = max(len(m) for m in self.head_masks)  # launches per call: the most parts of a head
        self.num_masks = num_masks
        self.permuted = permuted
        self.int64 = int64
        self.params = params
        self.tables = tables
        self.positions = positions
        self.tile_classes = tile_classes
        self.allowed = allowed
        self._layouts = {}

    def layout(self, n, device):
        """The layout for sequence length n on `device`, built once and cached."""
        key = (n, str(device))
        if key not in self._layouts:
            self._layouts[key] = Layout(n, device, self)
        return self._layouts[key]


def dense_block_masks(masks, block, head_masks=None):
    """BlockMasks from boolean masks [num_masks, n, n] (True: query i may attend key j), for one n. Its tables
    hold the masks themselves, which the kernels' default `pattern_allowed` reads."""
    masks = masks.to(torch.bool).cpu()
    num_masks, n = masks.shape[0], masks.shape[1]

    def check(length):
        if length != n:
            raise ValueError(f"these dense masks are for n={n}, got n={length}")

    def tile_classes(mask, length, tables, positions):
        check(length)
        m = masks[mask] if positions is None else masks[mask][positions][:, positions]
        num_tiles = -(-n // block)
        padded = torch.zeros(num_tiles * block, num_tiles * block, dtype=torch.int8)
        padded[:n, :n] = m
        counts = padded.view(num_tiles, block, num_tiles, block).sum(dim=(1, 3), dtype=torch.int64)
        classes = torch.full((num_tiles, num_tiles), tiles.PARTIAL, dtype=torch.int8)
        classes[counts == 0] = tiles.EMPTY
        classes[counts == block * block] = tiles.FULL
        return classes

    def allowed(mask, pos_i, pos_j, length, tables):
        check(length)
        # Padding slots past n may be asked about; the caller masks them out.
        return masks[mask][pos_i.clamp(max=n - 1), pos_j.clamp(max=n - 1)]

    return BlockMasks(block=block, head_masks=range(num_masks) if head_masks is None else head_masks,
                      num_masks=num_masks, permuted=False, int64=False, params=lambda length: (),
                      tables=lambda length: [m.to(torch.int8) for m in masks], positions=lambda mask, length: None,
                      tile_classes=tile_classes, allowed=allowed)


class Layout:
    """Everything the kernels need for one sequence length: tile lists per mask (and transposed, for dK/dV),
    permutations, random tables and runtime parameters. Built in closed form (no n x n mask)."""

    def __init__(self, n, device, masks):
        self.masks = masks
        with tiles.single_threaded():
            self._build(n, device)

    def _build(self, n, device):
        masks, block = self.masks, self.masks.block
        self.n = n
        self.num_tiles = -(-n // block)
        tables = masks.tables(n)
        positions, classes, self.natural_classes = [], [], []
        for m in range(masks.num_masks):
            natural = masks.tile_classes(m, n, tables, None)
            self.natural_classes.append(natural)
            order, chosen = None, natural
            if PERMUTED_ORDERS and masks.permuted:
                order, chosen = _cheaper_order(masks, m, n, tables, natural)

            def allowed(pos_i, pos_j, mask=m):
                return masks.allowed(mask, pos_i, pos_j, n, tables)

            chosen = tiles.refine_partial(chosen, allowed, order, n, block)
            positions.append(order)
            classes.append(chosen)
        if masks.num_parts > 1:  # mask `num_masks`: no tile at all, the k-th part of heads with fewer parts
            positions.append(None)
            classes.append(torch.zeros_like(classes[0]))
        classes = torch.stack(classes)
        self.classes = classes  # int8 [masks, q tiles, k tiles]
        self.positions_cpu = positions
        self.random_cpu = tables

        def lists(selected):
            counts, index = zip(*(tiles.tile_lists(s) for s in selected))
            width = max(ix.shape[1] for ix in index)
            index = [torch.nn.functional.pad(ix, (0, width - ix.shape[1])) for ix in index]
            return torch.stack(counts).to(device), torch.stack(index).to(device), width

        self.full = lists(classes == tiles.FULL)
        self.part = lists(classes == tiles.PARTIAL)
        self.full_t = lists((classes == tiles.FULL).transpose(1, 2))
        self.part_t = lists((classes == tiles.PARTIAL).transpose(1, 2))
        self.num_parts = masks.num_parts
        # [parts, set heads]: the mask each head runs in launch k (the empty mask past its last part).
        self.head_masks = torch.tensor([[m[k] if k < len(m) else masks.num_masks for m in masks.head_masks]
                                        for k in range(masks.num_parts)], dtype=torch.int32, device=device)
        self.positions = torch.zeros(1, dtype=torch.int32, device=device)  # read only by kernels with PERMUTED
        if PERMUTED_ORDERS and masks.permuted:
            rows = [p if p is not None else torch.arange(n) for p in positions]
            self.positions = torch.stack(rows).to(torch.int32).to(device)
        if tables:
            self.random = torch.stack(tables).to(torch.int8).to(device)
        else:
            self.random = torch.zeros(1, dtype=torch.int8, device=device)
        self.params = masks.params(n)
        # The kernels read runtime parameters through one pointer, so every pattern's kernels share a signature.
        self.params_tensor = torch.tensor(list(self.params) or [0], dtype=torch.int64 if masks.int64 else torch.int32,
                                          device=device)
        self.cpu_plans = {}
        self.decode_rows = {}  # a head's masks -> the latest query tile's decode keys (decode.py)
        self.decode_inverse = {}  # mask -> each position's slot in its visiting order (decode.py)


def _cheaper_order(masks, mask, n, tables, natural):
    """(positions, classes) of the mask's candidate order where it pays at this n, else (None, natural)."""
    candidate = masks.positions(mask, n)
    if candidate is None:
        return None, natural
    permuted = masks.tile_classes(mask, n, tables, candidate)
    if tiles.permutation_pays(int((permuted != tiles.EMPTY).sum()), int((natural != tiles.EMPTY).sum())):
        return candidate, permuted
    return None, natural

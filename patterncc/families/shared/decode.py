"""Generation with a KV cache: what a module keeps between calls, and writing into it.

`DecodeCache` holds the keys and values of the positions seen so far, how many there are, the recurrent state of
kernel heads and the buckets of hashed heads. A module's `prefill(q, k, v, cache)` runs a prompt and fills it;
`decode(q_t, k_t, v_t, cache)` runs the next position(s) against it. Set and kernel heads equal the causal forward
over the whole sequence at those positions, with the pattern evaluated at the cache's length `max_len` (a pattern
whose parameters depend on n sees the sequence it will generate, not the part generated so far). Hashed heads'
buckets depend on every position, so a prefill equals their forward over the prompt and a decoded position t the
last row of their forward over positions 0..t (families/lsh/decode.py).

Keys and values live in pages of `page` positions (the set heads' layout tile), each kv head's tiles in pages of
its own, found through a page table. The module tells the cache, per kv head and key tile, the last query tile
that reads it (`keep_until`, from the pattern's exact tile layout); a page is freed once the position being
decoded is past that tile, and a tile no query will read is never stored. So a `local(w)` head keeps about
w + 2 x page positions, a kernel head's kv head none, and a `stride(l)` head every one (every residue recurs).
"""

import torch


class DecodeCache:
    """Keys and values of the positions decoded so far (paged), the kernel heads' recurrent state and the hashed
    heads' buckets."""

    def __init__(self, batch, kv_heads, head_dim, max_len, dtype=torch.float32, device=None, page=64):
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("max_len", max_len),
                            ("page", page)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.batch, self.kv_heads, self.head_dim, self.max_len = batch, kv_heads, head_dim, max_len
        self.dtype, self.device, self.page = dtype, torch.device(device or "cpu"), page
        self.tiles = -(-max_len // page)
        self.length = 0
        self.current_tile = -1  # the query tile of the last position written
        self.keep_until = None  # [kv_heads, tiles]: the last query tile reading each key tile (-1: none)
        self.table = None  # [kv_heads, tiles]: each key tile's page, -1 when not stored
        self.row_of = None  # [kv_heads, max_len]: each position's row in k and v, -1 when not stored
        self.write_heads = self.write_rows = None  # the kv heads storing the current query tile, and its rows
        self.set_gather = None  # the set heads' reads for the current query tile (blocksparse/decode.py)
        self.k = self.v = None  # [batch, pages * page, head_dim], made at the first write
        self.free_pages = []
        self.linear_state = None  # per kernel call, made at the first call (it has one state per query head)
        self.lsh_states = None  # per hashed call: its positions' buckets and keys, made at the first write

    @property
    def pages(self):
        """Pages the cache holds (each `page` positions of one kv head), the most it will ever need at once."""
        return 0 if self.k is None else self.k.shape[1] // self.page

    def __repr__(self):
        return (f"DecodeCache(batch={self.batch}, kv_heads={self.kv_heads}, head_dim={self.head_dim}, "
                f"length={self.length}, max_len={self.max_len}, pages={self.pages} of {self.page}, "
                f"dtype={self.dtype})")


def cache_keep(cache, keep_until):
    """Install what the cache keeps (before the first write): keep_until [kv_heads, tiles], per kv head and key
    tile the last query tile that reads it (-1: never read, never stored); the pages are allocated for the most
    tiles ever live at once."""
    if cache.k is not None:
        return
    keep_until = torch.as_tensor(keep_until, dtype=torch.int64).clone()
    want = (cache.kv_heads, cache.tiles)
    if tuple(keep_until.shape) != want:
        raise ValueError(f"keep_until must be (kv_heads, tiles) = {want}, got {tuple(keep_until.shape)}")
    tile = torch.arange(cache.tiles)
    stored = keep_until >= tile  # a tile is stored from its own query tile to its last reader
    # Live tiles at query tile t: those with first tile <= t <= keep_until (a difference array over t).
    change = torch.zeros(cache.tiles + 1, dtype=torch.int64)
    change.index_add_(0, tile.expand_as(keep_until)[stored], torch.ones(int(stored.sum()), dtype=torch.int64))
    change.index_add_(0, (keep_until[stored] + 1).clamp(max=cache.tiles),
                      -torch.ones(int(stored.sum()), dtype=torch.int64))
    pages = max(1, int(change.cumsum(0).max()))
    cache.keep_until = keep_until
    cache.table = torch.full(want, -1, dtype=torch.int64)
    cache.row_of = torch.full((cache.kv_heads, cache.max_len), -1, dtype=torch.int64, device=cache.device)
    cache.k = torch.zeros(cache.batch, pages * cache.page, cache.head_dim, dtype=cache.dtype, device=cache.device)
    cache.v = torch.zeros_like(cache.k)
    cache.free_pages = list(range(pages - 1, -1, -1))


def cache_write(cache, k, v):
    """Append k, v (batch, kv_heads, t, head_dim) at the cache's end, store what a later query reads, and free
    the pages no later query reads; errors name both numbers. Returns the first written position."""
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"k and v must be (batch, kv_heads, t, head_dim) of one shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    want = (cache.batch, cache.kv_heads, cache.head_dim)
    if (k.shape[0], k.shape[1], k.shape[3]) != want:
        raise ValueError(f"this cache holds (batch, kv_heads, head_dim) = {want}, got "
                         f"{(k.shape[0], k.shape[1], k.shape[3])}")
    if cache.length + k.shape[2] > cache.max_len:
        raise ValueError(f"the cache holds {cache.max_len} positions: {cache.length} used, {k.shape[2]} more do "
                         f"not fit")
    if cache.k is None:  # nothing installed: keep every tile to the end
        cache_keep(cache, torch.full((cache.kv_heads, cache.tiles), cache.tiles - 1))
    start, stop, page = cache.length, cache.length + k.shape[2], cache.page
    current = (stop - 1) // page  # the query tile of the last position written: the next query is there or later
    if current != cache.current_tile:  # a new query tile: free what it no longer reads, then pages for new tiles
        for head, tile in torch.nonzero((cache.table >= 0) & (cache.keep_until < current)).tolist():
            cache.free_pages.append(int(cache.table[head, tile]))
            cache.table[head, tile] = -1
            cache.row_of[head, tile * page:(tile + 1) * page] = -1
        for tile in range(start // page, current + 1):
            unstored = (cache.keep_until[:, tile] >= current) & (cache.table[:, tile] < 0)
            for head in torch.nonzero(unstored)[:, 0].tolist():
                cache.table[head, tile] = cache.free_pages.pop()
                stored = torch.arange(tile * page, min((tile + 1) * page, cache.max_len), device=cache.device)
                cache.row_of[head, stored] = int(cache.table[head, tile]) * page + stored - tile * page
        cache.current_tile = current
        heads = torch.nonzero(cache.keep_until[:, current] >= current)[:, 0].to(cache.device)
        # The kv heads storing this tile (None: all) and the row of the tile's first position in each one's page.
        cache.write_heads = None if len(heads) == cache.kv_heads else heads
        cache.write_rows = cache.row_of[heads, current * page]
    if stop - start == 1:  # one decoded position: written for the kv heads that keep its tile
        if not cache.write_rows.numel():  # no kv head keeps it (kernel heads read no key)
            cache.length = stop
            return start
        rows = cache.write_rows + (start - current * page)
        if cache.write_heads is not None:
            k, v = (x.index_select(1, cache.write_heads.to(k.device)) for x in (k, v))
        cache.k.index_copy_(1, rows, k[:, :, 0].to(cache.dtype))
        cache.v.index_copy_(1, rows, v[:, :, 0].to(cache.dtype))
    else:
        positions = torch.arange(start, stop)
        kept = cache.keep_until[:, positions // page] >= current  # [kv_heads, t]: written only where read later
        heads, offsets = torch.nonzero(kept, as_tuple=True)
        rows = cache.row_of[heads.to(cache.device), (positions[offsets]).to(cache.device)]
        heads, offsets = heads.to(k.device), offsets.to(k.device)
        cache.k[:, rows] = k[:, heads, offsets].to(cache.dtype)
        cache.v[:, rows] = v[:, heads, offsets].to(cache.dtype)
    cache.length = stop
    return start


def cache_rows(cache, kv_index, positions, valid=None):
    """The cache rows holding positions (int64 [..., K] on the cache's device) of the kv heads kv_index
    ([heads], or broadcastable against positions' leading dims) -> rows of the same shape; where `valid` (bool,
    positions' shape) is False, row 0. A position whose page was freed is a bug in what the module told the cache
    to keep: it raises instead of reading another one's."""
    if valid is not None:
        positions = positions.clamp(min=0)
    rows = cache.row_of[torch.as_tensor(kv_index, device=positions.device)[..., None], positions]
    if valid is not None:
        rows = rows.masked_fill(~valid, 0)
    if bool((rows < 0).any()):
        raise RuntimeError("patterncc: a decode step read a key the cache had dropped (a bug: please report it)")
    return rows


def cache_read_values(cache, kv_index, positions):
    """Values [batch, heads, K, head_dim] of per-batch positions [batch, heads, K] for the kv heads kv_index
    [heads]."""
    rows = cache_rows(cache, torch.as_tensor(kv_index)[None, :].expand(positions.shape[0], -1), positions)
    return rows_of_batches(cache.v, rows)


def rows_of_batches(x, rows):
    """x [batch, rows, d] at per-batch rows [batch, ...] -> [batch, ..., d]: one index_select of the flattened
    rows (a gather with the index expanded over d is several times slower on the CPU)."""
    base = torch.arange(x.shape[0], device=rows.device).view(-1, *[1] * (rows.dim() - 1)) * x.shape[1]
    return x.reshape(-1, x.shape[-1]).index_select(0, (rows + base).flatten()).view(*rows.shape, x.shape[-1])

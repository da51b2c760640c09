"""Generation with a KV cache: what a module keeps between calls, and writing into it.

`DecodeCache` holds the keys and values of the positions seen so far, (batch, kv_heads, max_len, head_dim), how
many there are, the recurrent state of kernel heads and the buckets of hashed heads. A module's `prefill(q, k, v,
cache)` runs a prompt and fills it; `decode(q_t, k_t, v_t, cache)` runs the next position(s) against it. Set and
kernel heads equal the causal forward over the whole sequence at those positions, with the pattern evaluated at
the cache's length `max_len` (a pattern whose parameters depend on n sees the sequence it will generate, not the
part generated so far). Hashed heads' buckets depend on every position, so a prefill equals their forward over
the prompt and a decoded position t the last row of their forward over positions 0..t (families/lsh/decode.py).
"""

import torch


class DecodeCache:
    """Keys and values of the positions decoded so far and the kernel heads' recurrent state."""

    def __init__(self, batch, kv_heads, head_dim, max_len, dtype=torch.float32, device=None):
        for name, value in (("batch", batch), ("kv_heads", kv_heads), ("head_dim", head_dim), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0
        self.max_len = max_len
        self.linear_state = None  # per kernel call, made at the first call (it has one state per query head)
        self.lsh_states = None  # per hashed call: its positions' buckets and keys, made at the first write

    def __repr__(self):
        batch, kv_heads, max_len, head_dim = self.k.shape
        return (f"DecodeCache(batch={batch}, kv_heads={kv_heads}, head_dim={head_dim}, length={self.length}, "
                f"max_len={max_len}, dtype={self.k.dtype})")


def cache_write(cache, k, v):
    """Append k, v (batch, kv_heads, t, head_dim) at the cache's end; errors name both numbers."""
    if k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"k and v must be (batch, kv_heads, t, head_dim) of one shape, got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    want = (cache.k.shape[0], cache.k.shape[1], cache.k.shape[3])
    if (k.shape[0], k.shape[1], k.shape[3]) != want:
        raise ValueError(f"this cache holds (batch, kv_heads, head_dim) = {want}, got "
                         f"{(k.shape[0], k.shape[1], k.shape[3])}")
    if cache.length + k.shape[2] > cache.max_len:
        raise ValueError(f"the cache holds {cache.max_len} positions: {cache.length} used, {k.shape[2]} more do "
                         f"not fit")
    start = cache.length
    cache.k[:, :, start:start + k.shape[2]] = k.to(cache.k.dtype)
    cache.v[:, :, start:start + k.shape[2]] = v.to(cache.v.dtype)
    cache.length += k.shape[2]
    return start

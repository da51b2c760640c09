"""Attention dropout from a counter-based generator, the same on the CPU path and in the Triton kernels.

Each (batch, query head, query position, key position) pair draws one 32-bit number from Philox-4x32-10 keyed by
the call's seed, at counter offset ((b * heads + h) * n + i) * n + j: Triton's `tl.randint(seed, offset)`, which
`philox_randint` reproduces with int64 torch ops. The pair is kept when the number, folded to 31 bits as Triton's
`uint_to_uniform_float` folds it, is at least `threshold` = round(p * 2^31): an integer comparison, so both
paths drop exactly the same pairs. Kept probabilities are scaled by 1 / (1 - p). The backward pass regenerates
the same numbers instead of storing a mask.
"""

import torch

_MASK32 = 0xFFFFFFFF
_PHILOX_KEY = (0x9E3779B9, 0xBB67AE85)
_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)


class Dropout:
    """One call's dropout: probability p, the Philox seed, and what the kernels take (threshold, scale)."""

    __slots__ = ("p", "seed", "threshold", "scale")

    def __init__(self, p, seed):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout_p must be in [0, 1), got {p}")
        self.p, self.seed = float(p), int(seed)
        self.threshold = min(round(self.p * 2**31), 2**31 - 1)
        self.scale = 1.0 / (1.0 - self.p)

    def stream(self, index):
        """The same p under Philox key number `index` of this call's seed (0: the seed itself): families of one
        module number their heads from 0 each, so each family (and each hashed call) draws from a stream of its
        own instead of dropping the same pairs as another family's head of the same number."""
        return Dropout(self.p, (self.seed + index * _STREAM_STEP) % 2**62)


# Odd and with mixed bits (2^64 / golden ratio, truncated): consecutive streams' keys share no structure.
_STREAM_STEP = 0x9E3779B97F4A7C15


def call_dropout(dropout_p, seed):
    """A call's Dropout from its probability and seed (a 0-d tensor, as dropout_seed draws it), or None without
    dropout (seed None)."""
    return None if seed is None else Dropout(dropout_p, int(seed))


def dropout_kernel_args(dropout):
    """The kernels' (seed, threshold, keep scale): unused (and constant) without dropout."""
    return (0, 0, 1.0) if dropout is None else (dropout.seed, dropout.threshold, dropout.scale)


def _mul_parts(a, b):
    """(high, low) 32 bits of a * b for 32-bit unsigned a (tensor) and b (int), in int64 without overflow."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    low_product = a * b_lo  # < 2^48
    high_product = a * b_hi  # < 2^48
    high = (high_product + (low_product >> 16)) >> 16
    low = (((high_product & 0xFFFF) << 16) + low_product) & _MASK32
    return high, low


def philox_randint(seed, offset):
    """Triton's `tl.randint(seed, offset)` for int64 offsets: the first word of Philox-4x32-10 with counter
    (offset low, offset high, 0, 0) and key (seed low, seed high), as an int64 tensor holding a uint32."""
    c0, c1 = offset & _MASK32, (offset >> 32) & _MASK32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_parts(c2, _PHILOX_ROUND[1])
        hi_a, lo_a = _mul_parts(c0, _PHILOX_ROUND[0])
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _PHILOX_KEY[0]) & _MASK32, (k1 + _PHILOX_KEY[1]) & _MASK32
    return c0


def dropout_keep(dropout, offset):
    """Which pairs at counter offsets `offset` (int64 tensor) are kept: bool tensor of offset's shape."""
    bits = philox_randint(dropout.seed, offset)
    folded = torch.where(bits >= 2**31, _MASK32 - bits, bits)  # int32 x < 0 -> ~x, as Triton folds it
    return folded >= dropout.threshold


def dropout_offsets(batch, heads, n, head_index, rows, cols, leading=False):
    """Counter offsets ((b * heads + h) * n + i) * n + j broadcast over [batch, len(head_index), *rows/cols]:
    head_index the query heads (1-D), rows and cols original positions broadcast against each other; leading:
    rows and cols already start with those [batch, heads] dims (positions that differ per batch and head)."""
    extra = max(rows.dim(), cols.dim()) - (2 if leading else 0)
    b = torch.arange(batch, dtype=torch.int64, device=rows.device).view(batch, 1, *([1] * extra))
    h = torch.as_tensor(head_index, dtype=torch.int64, device=rows.device).view(1, -1, *([1] * extra))
    return ((b * heads + h) * n + rows.to(torch.int64)) * n + cols.to(torch.int64)


def check_dropout(dropout_p, head_families, name="dropout_p"):
    """A ValueError unless dropout_p is a number in [0, 1) and, when it is not 0, the pattern has no kernel heads
    (linear attention forms no attention probabilities to drop); `name` is the argument's name in the message."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {dropout_p!r}")
    if dropout_p and "kernel" in head_families:
        raise ValueError(f"{name}={dropout_p}: attention dropout is implemented for set and hashed heads; kernel "
                         f"heads (linear attention) form no attention probabilities to drop, and this pattern has "
                         f"kernel heads")


def dropout_seed(dropout_p, head_families):
    """The Philox seed of a call with attention dropout, drawn from torch's default generator (so
    torch.manual_seed makes runs reproducible, as for SDPA's dropout) as a 0-d int64 tensor, or None when
    dropout_p is 0 (check_dropout's errors otherwise)."""
    check_dropout(dropout_p, head_families)
    return None if dropout_p == 0 else torch.randint(0, 2**62, (), dtype=torch.int64)

"""Triton helpers every kernel family uses: the online-softmax update and its finish, and the floor division and
integer square root that emitted predicates call (`_floordiv`, `_floormod`, `_isqrt`: patterncc.emit spells them
so).

Scores are in the log2 domain (s2 = q.k * scale * log2(e)); the running state of a row is its maximum `m_i`,
its sum of exponentials `l_i` and its weighted sum of values `acc` (FlashAttention-2). Prefixes: b_ block values,
o_ offsets, m_ masks.
"""

import triton
import triton.language as tl


@triton.jit
def online_softmax_update(acc, l_i, m_i, b_s, b_v, DOT_PRECISION: tl.constexpr):
    """Fold one tile of scores b_s [BLOCK_M, BLOCK_N] (-inf where not allowed) and values b_v [BLOCK_N, D] into
    the running (acc, l_i, m_i)."""
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    # A row with nothing allowed yet keeps m = -inf; subtracting 0 instead keeps exp2 free of NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_p = tl.math.exp2(b_s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def online_softmax_finish(acc, l_i, m_i, EMPTY_LSE: tl.constexpr):
    """(output, log2-sum-exp) of each row; a row with no allowed key gives 0 and EMPTY_LSE."""
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    acc = acc / l_safe[:, None]
    b_lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), EMPTY_LSE)
    return acc, b_lse


@triton.jit
def _floordiv(a, b):
    # Triton's integer // truncates toward zero; the pattern language floors (as Python does).
    q = a // b
    return tl.where(((a % b) != 0) & ((a < 0) != (b < 0)), q - 1, q)


@triton.jit
def _floormod(a, b):
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def _isqrt(x):
    # float32 sqrt is within one of the integer root for x < 2**30; fix it up exactly.
    r = tl.sqrt(x.to(tl.float32)).to(x.dtype)
    r = tl.where(r * r > x, r - 1, r)
    return tl.where((r + 1) * (r + 1) <= x, r + 1, r)

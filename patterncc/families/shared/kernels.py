"""Triton helpers every kernel family uses: the online-softmax update and its finish, the softmax backward steps,
row loads of (batch, heads, n, head_dim) tensors, and the floor division and integer square root that emitted
predicates call (`_floordiv`, `_floormod`, `_isqrt`: patterncc.emit spells them so).

Scores are in the log2 domain (s2 = q.k * scale * log2(e)); the running state of a row is its maximum `m_i`,
its sum of exponentials `l_i` and its weighted sum of values `acc` (FlashAttention-2). Prefixes: b_ block values,
o_ offsets, m_ masks.
"""

import triton
import triton.language as tl


@triton.jit
def pair_dropout(seed, threshold, keep_scale, row_base, o_i, o_j, n_ctx, DROPOUT: tl.constexpr):
    """Dropout's multiplier for pairs (o_i, o_j) (broadcast) of the (batch, head) whose rows start at row_base =
    (b * heads + h) * n: keep_scale = 1 / (1 - p) where kept, 0 where dropped, or 1.0 without dropout. A pair's
    Philox number (counter (row_base + i) * n + j) folded to 31 bits is kept when >= threshold = round(p * 2^31),
    exactly as patterncc/families/shared/dropout.py decides on the CPU."""
    if DROPOUT:
        offset = (row_base + o_i.to(tl.int64)) * n_ctx + o_j.to(tl.int64)
        bits = tl.randint(seed, offset).to(tl.int32, bitcast=True)
        bits = tl.where(bits < 0, ~bits, bits)
        return tl.where(bits >= threshold, keep_scale, 0.0)
    else:
        return 1.0


@triton.jit
def online_softmax_update(acc, l_i, m_i, b_s, b_v, b_drop, DOT_PRECISION: tl.constexpr):
    """Fold one tile of scores b_s [BLOCK_M, BLOCK_N] (-inf where not allowed) and values b_v [BLOCK_N, D] into
    the running (acc, l_i, m_i). b_drop: dropout's multiplier per pair (or 1.0): the normalizer l_i sums every
    probability, the output only the kept ones, scaled."""
    m_new = tl.maximum(m_i, tl.max(b_s, 1))
    # A row with nothing allowed yet keeps m = -inf; subtracting 0 instead keeps exp2 free of NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    b_p = tl.math.exp2(b_s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    acc = acc * alpha[:, None] + tl.dot((b_p * b_drop).to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
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


@triton.jit
def head_rows(P, b, h, stride_b, stride_h):
    """Pointer to row 0 of head h of batch b of a (batch, heads, n, head_dim) tensor."""
    return P + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def row_block(P_HEAD, o_n, stride_n, HEAD_DIM: tl.constexpr):
    """Pointers [N, HEAD_DIM] to rows o_n of a head whose row 0 is at P_HEAD (unit column stride)."""
    return P_HEAD + o_n.to(tl.int64)[:, None] * stride_n + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def load_rows(P_HEAD, o_n, m_n, stride_n, HEAD_DIM: tl.constexpr):
    """Rows o_n of a head as [N, HEAD_DIM]; rows where m_n is False read 0."""
    return tl.load(row_block(P_HEAD, o_n, stride_n, HEAD_DIM), mask=m_n[:, None], other=0.0)


@triton.jit
def load_rows_t(P_HEAD, o_n, m_n, stride_n, HEAD_DIM: tl.constexpr):
    """Rows o_n of a head, transposed: [HEAD_DIM, N]."""
    p_rows_t = P_HEAD + o_n.to(tl.int64)[None, :] * stride_n + tl.arange(0, HEAD_DIM)[:, None]
    return tl.load(p_rows_t, mask=m_n[None, :], other=0.0)


@triton.jit
def load_row_stats(LSE, DELTA, row_base, o_n, m_n):
    """(log2-sum-exp, rowsum(dO * O)) of rows o_n of one (batch, head): rows where m_n is False read +inf and 0,
    so their probabilities exp2(s2 - LSE) are 0."""
    b_lse = tl.load(LSE + row_base + o_n, mask=m_n, other=float("inf"))
    b_delta = tl.load(DELTA + row_base + o_n, mask=m_n, other=0.0)
    return b_lse, b_delta


@triton.jit
def softmax_bwd_kv(dk, dv, b_pT, b_dropT, b_q, b_v, b_do, b_delta, DOT_PRECISION: tl.constexpr):
    """Add one query tile's share to a key tile's dV and (unscaled) dK: b_pT [BLOCK_N, BLOCK_M] holds the
    probabilities, 0 where a pair is not allowed, b_dropT dropout's multipliers (or 1.0); with Z the dropped,
    scaled probabilities, dV = Z^T dO and dS = P * (dZ * drop - delta), delta = rowsum(dO * O)."""
    dv += tl.dot((b_pT * b_dropT).to(b_do.dtype), b_do, input_precision=DOT_PRECISION)
    b_dpT = tl.dot(b_v, tl.trans(b_do), input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
    b_dsT = b_pT * (b_dpT * b_dropT - b_delta[None, :])
    dk += tl.dot(b_dsT.to(b_q.dtype), b_q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def softmax_bwd_q(dq, b_p, b_drop, b_k, b_vT, b_do, b_delta, DOT_PRECISION: tl.constexpr):
    """Add one key tile's share to a query tile's (unscaled) dQ: b_p [BLOCK_M, BLOCK_N] and b_drop as in
    softmax_bwd_kv."""
    b_dp = tl.dot(b_do, b_vT, input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    b_ds = b_p * (b_dp * b_drop - b_delta[:, None])
    dq += tl.dot(b_ds.to(b_k.dtype), b_k, input_precision=DOT_PRECISION)
    return dq

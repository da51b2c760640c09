"""Triton kernel: one decode step of set heads, split-K.

A decoded position attends the few keys its pattern allows (strided(l): l + t / l of them), gathered from the KV
cache's pages by row. With one query per (batch, head) there is no query tile to fill a GPU, so the keys are
split: program (batch x head, split) runs an online softmax over BLOCK_M steps of BLOCK_N keys and writes its
partial output and log-sum-exp; the splits are combined by log-sum-exp afterwards (FlashDecoding's scheme).
Scores are in the natural-log domain, float32. Prefixes: b_ block values, p_ pointers, o_ offsets, m_ masks.
"""

import triton
import triton.language as tl


@triton.jit
def blocksparse_decode_kernel(Q, K, V, ROWS, OUT, LSE, sm_scale, num_keys, num_heads, stride_qb, stride_qh,
                              stride_kb, stride_rh, stride_ob, stride_oh, stride_os, HEAD_DIM: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Q [batch, heads, HEAD_DIM]; K, V [batch, cache rows, HEAD_DIM] (rows contiguous); ROWS [heads, num_keys]
    int32: the cache row of each key each head attends; OUT [batch, heads, splits, HEAD_DIM] and LSE [batch,
    heads, splits] float32: split s covers keys s * BLOCK_M * BLOCK_N onwards (-inf LSE, 0 output when empty)."""
    pid_bh, split = tl.program_id(0), tl.program_id(1)
    batch, head = pid_bh // num_heads, pid_bh % num_heads
    o_d = tl.arange(0, HEAD_DIM)
    b_q = tl.load(Q + batch.to(tl.int64) * stride_qb + head * stride_qh + o_d).to(tl.float32) * sm_scale
    p_k, p_v = K + batch.to(tl.int64) * stride_kb, V + batch.to(tl.int64) * stride_kb
    m_i = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), 0)  # a float32 scalar
    l_i = tl.sum(tl.zeros([BLOCK_N], tl.float32), 0)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for step in range(BLOCK_M):
        o_n = (split * BLOCK_M + step) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_n = o_n < num_keys
        o_row = tl.load(ROWS + head * stride_rh + o_n, mask=m_n, other=0).to(tl.int64)
        b_k = tl.load(p_k + o_row[:, None] * HEAD_DIM + o_d[None, :], mask=m_n[:, None], other=0.0).to(tl.float32)
        b_s = tl.where(m_n, tl.sum(b_k * b_q[None, :], 1), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(b_s, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key yet: every exp below is 0, never NaN
        alpha = tl.exp(m_i - m_safe)
        b_p = tl.exp(b_s - m_safe)
        b_v = tl.load(p_v + o_row[:, None] * HEAD_DIM + o_d[None, :], mask=m_n[:, None], other=0.0).to(tl.float32)
        l_i = l_i * alpha + tl.sum(b_p, 0)
        acc = acc * alpha + tl.sum(b_p[:, None] * b_v, 0)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    p_out = OUT + batch.to(tl.int64) * stride_ob + head * stride_oh + split * stride_os
    tl.store(p_out + o_d, out)
    tl.store(LSE + (batch * num_heads + head) * tl.num_programs(1) + split,
             tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf")))

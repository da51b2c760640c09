"""Triton kernels: Reformer LSH attention (hashed heads), FlashAttention-2 style over sorted buckets.

Notation. Program axis `bhr` runs over (batch, head, round). In each round queries and keys are sorted by
(bucket, position); slots are indices into that order and `o_i` / `o_j` the ORIGINAL positions held by query /
key slots (PERM_Q / PERM_K, int32 [B*H*R, n]), so rows are loaded and stored through the permutation, with no
copy of q, k, v. CODE_Q / CODE_K (int32 [B*H*R, n], indexed by original position) pack a position's bucket and
chunk of one round, code = bucket * (num_chunks + 2) + slot // chunk: key j is in query i's window of that
round (same bucket, key chunk = query chunk or the one before) iff code_i - code_j is 0 or 1 (different
buckets differ by at least 3). count_ij = the number of rounds with that property. Round r scores allowed pairs
s2 = q.k * scale * log2(e) - log2(count_ij) (the duplicate correction), in the log2 domain; its LSE stores
m + log2(l) per row, -inf for a row with no key in that round. The backward kernels take the FINAL LSE over
all rounds, +inf for rows without any key, so every exp2(s2 - LSE) of such a row is 0. Attention dropout
(DROPOUT) multiplies pair (i, j)'s probability by its Philox keep decision in every round that holds the pair,
so the rounds' combination drops the pair once, as dropout of the final attention weights.
Prefixes: b_ block values, p_ pointers, o_ offsets, m_ masks.
"""

import triton
import triton.language as tl

from ..shared.kernels import (
    head_rows,
    load_row_stats,
    load_rows,
    load_rows_t,
    online_softmax_finish,
    online_softmax_update,
    pair_dropout,
    row_block,
    softmax_bwd_kv,
    softmax_bwd_q,
)


@triton.jit
def lsh_pair_count(CODE_Q, CODE_K, heads_base, n_ctx, o_i, o_j, m_i, m_j, ROUNDS: tl.constexpr):
    """In how many rounds key o_j is in query o_i's window: o_i, o_j (and masks m_i, m_j) broadcast to the tile."""
    count = tl.zeros(o_i.shape, tl.int32) + tl.zeros(o_j.shape, tl.int32)
    for r in tl.static_range(ROUNDS):
        base = heads_base + r * n_ctx
        b_code_i = tl.load(CODE_Q + base + o_i, mask=m_i, other=0)
        b_code_j = tl.load(CODE_K + base + o_j, mask=m_j, other=0)
        b_diff = b_code_i - b_code_j
        count += ((b_diff >= 0) & (b_diff <= 1)).to(tl.int32)
    return count


@triton.jit
def lsh_allowed(b_code_i, b_code_j, o_i, o_j, CAUSAL: tl.constexpr, SHARED_QK: tl.constexpr):
    """This round's window (same bucket, key chunk = query chunk or the one before), causal and self rules."""
    b_diff = b_code_i - b_code_j
    m_allowed = (b_diff >= 0) & (b_diff <= 1)
    if CAUSAL:
        m_allowed = m_allowed & (o_j <= o_i)
    if SHARED_QK:
        # The self rule: a position attends to itself only when nothing else is allowed in any round, which the
        # launcher handles after combining rounds.
        m_allowed = m_allowed & (o_j != o_i)
    return m_allowed


@triton.jit
def lsh_program(n_ctx, num_heads, TILE: tl.constexpr, ROUNDS: tl.constexpr):
    """A program's (tile, batch x head, batch, head, offset of its round's rows, offset of its head's rounds) on
    the 1-D grid over (tiles of TILE sorted slots, batch x head x round)."""
    pid = tl.program_id(0)
    num_tiles = tl.cdiv(n_ctx, TILE)
    bhr = pid // num_tiles
    bh = bhr // ROUNDS
    return pid % num_tiles, bh, bh // num_heads, bh % num_heads, bhr.to(tl.int64) * n_ctx, \
        bh.to(tl.int64) * ROUNDS * n_ctx


@triton.jit
def lsh_slots(start, n_ctx, PERM, CODE, round_base, SIZE: tl.constexpr):
    """The original positions held by sorted slots start .. start + SIZE - 1 of this round, which slots exist,
    and the positions' window codes."""
    o_slot = start + tl.arange(0, SIZE)
    m_slot = o_slot < n_ctx
    o_pos = tl.load(PERM + round_base + o_slot, mask=m_slot, other=0)
    return o_pos, m_slot, tl.load(CODE + round_base + o_pos, mask=m_slot, other=0)


@triton.jit
def lsh_fwd_kernel(
        Q, K, V, O, LSE, PERM_Q, PERM_K, CODE_Q, CODE_K,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        n_ctx, num_heads, chunk, sm_scale_log2, seed, dropout_threshold, dropout_scale,
        HEAD_DIM: tl.constexpr, ROUNDS: tl.constexpr, CAUSAL: tl.constexpr, SHARED_QK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    # One program per (tile of BLOCK_M sorted query slots, batch x head x round); a 1-D grid, since
    # batch x heads x rounds can pass CUDA's 65535 limit on the second axis. Writes this round's output and LSE
    # at the queries' original positions of O [B*H*R, n, HEAD_DIM] and LSE [B*H*R, n] (float32).
    pid_m, bh, b, h, round_base, heads_base = lsh_program(n_ctx, num_heads, BLOCK_M, ROUNDS)
    row_base = bh.to(tl.int64) * n_ctx  # dropout's pairs are keyed by (batch x head, i, j), the same every round

    m0 = pid_m * BLOCK_M
    o_i, m_m, b_code_i = lsh_slots(m0, n_ctx, PERM_Q, CODE_Q, round_base, BLOCK_M)
    b_q = load_rows(head_rows(Q, b, h, stride_qb, stride_qh), o_i, m_m, stride_qn, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
    p_k_head = head_rows(K, b, h, stride_kb, stride_kh)
    p_v_head = head_rows(V, b, h, stride_vb, stride_vh)

    # Key slots of the chunks these query slots may see: from the chunk before the first to the last one.
    first = m0 // chunk
    last = (tl.minimum(m0 + BLOCK_M, n_ctx) - 1) // chunk
    lo = tl.maximum(first - 1, 0) * chunk
    hi = tl.minimum((last + 1) * chunk, n_ctx)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        o_slot_n = start + tl.arange(0, BLOCK_N)
        m_n = o_slot_n < hi
        o_j = tl.load(PERM_K + round_base + o_slot_n, mask=m_n, other=0)
        b_code_j = tl.load(CODE_K + round_base + o_j, mask=m_n, other=0)
        b_kT = load_rows_t(p_k_head, o_j, m_n, stride_kn, HEAD_DIM)  # [HEAD_DIM, BLOCK_N]
        b_v = load_rows(p_v_head, o_j, m_n, stride_vn, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        b_s = tl.dot(b_q, b_kT, input_precision=DOT_PRECISION) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
        m_allowed = lsh_allowed(b_code_i[:, None], b_code_j[None, :], o_i[:, None], o_j[None, :], CAUSAL,
                                SHARED_QK) & m_n[None, :]
        if ROUNDS > 1:
            count = lsh_pair_count(CODE_Q, CODE_K, heads_base, n_ctx, o_i[:, None], o_j[None, :], m_m[:, None],
                                   m_n[None, :], ROUNDS)
            b_s = b_s - tl.math.log2(tl.maximum(count, 1).to(tl.float32))
        b_s = tl.where(m_allowed, b_s, float("-inf"))
        b_drop = pair_dropout(seed, dropout_threshold, dropout_scale, row_base, o_i[:, None], o_j[None, :], n_ctx,
                              DROPOUT)
        acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, b_s, b_v, b_drop, DOT_PRECISION)

    acc, b_lse = online_softmax_finish(acc, l_i, m_i, float("-inf"))
    p_o = row_block(O + round_base * HEAD_DIM, o_i, HEAD_DIM, HEAD_DIM)
    tl.store(p_o, acc, mask=m_m[:, None])
    tl.store(LSE + round_base + o_i, b_lse, mask=m_m)


@triton.jit
def lsh_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA, PERM_Q, PERM_K, CODE_Q, CODE_K,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_don,
        n_ctx, num_heads, chunk, sm_scale, sm_scale_log2, seed, dropout_threshold, dropout_scale,
        HEAD_DIM: tl.constexpr, ROUNDS: tl.constexpr, CAUSAL: tl.constexpr, SHARED_QK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    # One program per (tile of BLOCK_N sorted key slots, batch x head x round): this round's share of dK and dV,
    # written at the keys' original positions of DK, DV [B*H*R, n, HEAD_DIM] (float32); the launcher sums the
    # rounds, so no atomics and a deterministic result. LSE and DELTA [B*H, n] are over all rounds.
    pid_n, bh, b, h, round_base, heads_base = lsh_program(n_ctx, num_heads, BLOCK_N, ROUNDS)
    row_base = bh.to(tl.int64) * n_ctx

    n0 = pid_n * BLOCK_N
    o_j, m_n, b_code_j = lsh_slots(n0, n_ctx, PERM_K, CODE_K, round_base, BLOCK_N)
    b_k = load_rows(head_rows(K, b, h, stride_kb, stride_kh), o_j, m_n, stride_kn, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
    b_v = load_rows(head_rows(V, b, h, stride_vb, stride_vh), o_j, m_n, stride_vn, HEAD_DIM)
    p_q_head = head_rows(Q, b, h, stride_qb, stride_qh)
    p_do_head = head_rows(DO, b, h, stride_dob, stride_doh)

    # Query slots that may see these keys: the keys' chunks and the chunk after the last one.
    first = n0 // chunk
    last = (tl.minimum(n0 + BLOCK_N, n_ctx) - 1) // chunk
    lo = first * chunk
    hi = tl.minimum((last + 2) * chunk, n_ctx)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_M):
        o_slot_m = start + tl.arange(0, BLOCK_M)
        m_m = o_slot_m < hi
        o_i = tl.load(PERM_Q + round_base + o_slot_m, mask=m_m, other=0)
        b_code_i = tl.load(CODE_Q + round_base + o_i, mask=m_m, other=0)
        b_q = load_rows(p_q_head, o_i, m_m, stride_qn, HEAD_DIM)
        b_do = load_rows(p_do_head, o_i, m_m, stride_don, HEAD_DIM)
        b_lse, b_delta = load_row_stats(LSE, DELTA, row_base, o_i, m_m)  # [BLOCK_M]
        b_sT = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * sm_scale_log2  # [BLOCK_N, BLOCK_M]
        m_allowedT = lsh_allowed(b_code_i[None, :], b_code_j[:, None], o_i[None, :], o_j[:, None], CAUSAL,
                                 SHARED_QK) & m_m[None, :]
        if ROUNDS > 1:
            countT = lsh_pair_count(CODE_Q, CODE_K, heads_base, n_ctx, o_i[None, :], o_j[:, None], m_m[None, :],
                                    m_n[:, None], ROUNDS)
            b_sT = b_sT - tl.math.log2(tl.maximum(countT, 1).to(tl.float32))
        b_pT = tl.where(m_allowedT, tl.math.exp2(b_sT - b_lse[None, :]), 0.0)
        b_dropT = pair_dropout(seed, dropout_threshold, dropout_scale, row_base, o_i[None, :], o_j[:, None], n_ctx,
                               DROPOUT)
        dk, dv = softmax_bwd_kv(dk, dv, b_pT, b_dropT, b_q, b_v, b_do, b_delta, DOT_PRECISION)

    tl.store(row_block(DK + round_base * HEAD_DIM, o_j, HEAD_DIM, HEAD_DIM), dk * sm_scale, mask=m_n[:, None])
    tl.store(row_block(DV + round_base * HEAD_DIM, o_j, HEAD_DIM, HEAD_DIM), dv, mask=m_n[:, None])


@triton.jit
def lsh_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA, PERM_Q, PERM_K, CODE_Q, CODE_K,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
        stride_dob, stride_doh, stride_don,
        n_ctx, num_heads, chunk, sm_scale, sm_scale_log2, seed, dropout_threshold, dropout_scale,
        HEAD_DIM: tl.constexpr, ROUNDS: tl.constexpr, CAUSAL: tl.constexpr, SHARED_QK: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, DROPOUT: tl.constexpr):
    # As the forward kernel, for this round's share of dQ (DQ [B*H*R, n, HEAD_DIM], float32, summed by the
    # launcher).
    pid_m, bh, b, h, round_base, heads_base = lsh_program(n_ctx, num_heads, BLOCK_M, ROUNDS)
    row_base = bh.to(tl.int64) * n_ctx

    m0 = pid_m * BLOCK_M
    o_i, m_m, b_code_i = lsh_slots(m0, n_ctx, PERM_Q, CODE_Q, round_base, BLOCK_M)
    b_q = load_rows(head_rows(Q, b, h, stride_qb, stride_qh), o_i, m_m, stride_qn, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
    b_do = load_rows(head_rows(DO, b, h, stride_dob, stride_doh), o_i, m_m, stride_don, HEAD_DIM)
    b_lse, b_delta = load_row_stats(LSE, DELTA, row_base, o_i, m_m)
    p_k_head = head_rows(K, b, h, stride_kb, stride_kh)
    p_v_head = head_rows(V, b, h, stride_vb, stride_vh)

    first = m0 // chunk
    last = (tl.minimum(m0 + BLOCK_M, n_ctx) - 1) // chunk
    lo = tl.maximum(first - 1, 0) * chunk
    hi = tl.minimum((last + 1) * chunk, n_ctx)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        o_slot_n = start + tl.arange(0, BLOCK_N)
        m_n = o_slot_n < hi
        o_j = tl.load(PERM_K + round_base + o_slot_n, mask=m_n, other=0)
        b_code_j = tl.load(CODE_K + round_base + o_j, mask=m_n, other=0)
        b_k = load_rows(p_k_head, o_j, m_n, stride_kn, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        b_vT = load_rows_t(p_v_head, o_j, m_n, stride_vn, HEAD_DIM)  # [HEAD_DIM, BLOCK_N]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
        m_allowed = lsh_allowed(b_code_i[:, None], b_code_j[None, :], o_i[:, None], o_j[None, :], CAUSAL,
                                SHARED_QK) & m_n[None, :]
        if ROUNDS > 1:
            count = lsh_pair_count(CODE_Q, CODE_K, heads_base, n_ctx, o_i[:, None], o_j[None, :], m_m[:, None],
                                   m_n[None, :], ROUNDS)
            b_s = b_s - tl.math.log2(tl.maximum(count, 1).to(tl.float32))
        b_p = tl.where(m_allowed, tl.math.exp2(b_s - b_lse[:, None]), 0.0)
        b_drop = pair_dropout(seed, dropout_threshold, dropout_scale, row_base, o_i[:, None], o_j[None, :], n_ctx,
                              DROPOUT)
        dq = softmax_bwd_q(dq, b_p, b_drop, b_k, b_vT, b_do, b_delta, DOT_PRECISION)

    p_dq = row_block(DQ + round_base * HEAD_DIM, o_i, HEAD_DIM, HEAD_DIM)
    tl.store(p_dq, dq * sm_scale, mask=m_m[:, None])

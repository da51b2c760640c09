"""Triton kernels: block-sparse FlashAttention-2 over the tile lists of each mask.

Notation. Slots are positions in a mask's visiting order (natural order, or a grid transpose that makes the
mask block-sparse); `o_i` / `o_j` are the ORIGINAL positions held by query / key slots, so rows are loaded
and stored in natural order through the permutation, with no copy of q, k, v. For each query tile the
layout lists FULL key tiles (every pair allowed: no predicate) and PARTIAL ones (the predicate decides).
Scores are kept in the log2 domain: s2 = q.k * scale * log2(e); LSE stores m + log2(l) per row, +inf for a
row with no allowed key (its output is 0 and every exp2(s2 - LSE) in the backward pass is 0).
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
def pattern_allowed(o_i, o_j, mask_id, n_ctx, RANDOM, NUM_BLOCKS, PARAMS, ROWS: tl.constexpr, COLS: tl.constexpr):
    """Which (query, key) pairs mask `mask_id` allows, o_i and o_j broadcast to [ROWS, COLS]: the one hook where a
    pattern enters the kernels. Generated modules replace it with the pattern's predicate (reading its block
    tables from RANDOM and its runtime parameters from PARAMS); this default reads dense masks, RANDOM holding
    int8 [masks, n, n] (`dense_block_masks`), so the kernels can be tested on any mask."""
    m_real = (o_i < n_ctx) & (o_j < n_ctx)
    m_allowed = tl.load(RANDOM + (mask_id.to(tl.int64) * n_ctx + o_i) * n_ctx + o_j, mask=m_real, other=0) != 0
    return tl.broadcast_to(m_allowed, [ROWS, COLS])


@triton.jit
def blocksparse_program_head(pid_bh, num_q_heads, q_per_kv, q_per_head, HEAD_MASK):
    """A program's (batch, query head, kv head, mask) from its batch x query-head index."""
    b = pid_bh // num_q_heads
    hq = pid_bh % num_q_heads
    return b, hq, hq // q_per_kv, tl.load(HEAD_MASK + hq // q_per_head)


@triton.jit
def blocksparse_positions(start, n_ctx, POSITIONS, mask_id, SIZE: tl.constexpr, PERMUTED: tl.constexpr):
    """The original positions held by slots start .. start + SIZE - 1 of mask `mask_id`'s visiting order, and which
    of those slots exist (< n)."""
    o_slot = start + tl.arange(0, SIZE)
    m_slot = o_slot < n_ctx
    if PERMUTED:
        o_pos = tl.load(POSITIONS + mask_id.to(tl.int64) * n_ctx + o_slot, mask=m_slot, other=0)
    else:
        o_pos = o_slot
    return o_pos, m_slot


@triton.jit
def blocksparse_fwd_inner(acc, l_i, m_i, b_q, p_k_head, p_v_head, stride_kn, stride_vn, COUNT, INDEX, width,
        row, o_i, mask_id, n_ctx, POSITIONS, RANDOM, NUM_BLOCKS, PARAMS, sm_scale_log2, row_base, seed,
        dropout_threshold, dropout_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        PERMUTED: tl.constexpr, IS_PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr, LAYOUT_BLOCK: tl.constexpr,
        DROPOUT: tl.constexpr):
    SPLIT: tl.constexpr = LAYOUT_BLOCK // BLOCK_N  # kernel tiles per layout tile
    count = tl.load(COUNT + row)
    for t in range(0, count * SPLIT):
        kb = tl.load(INDEX + row * width + t // SPLIT)
        o_j, m_n = blocksparse_positions(kb * LAYOUT_BLOCK + (t % SPLIT) * BLOCK_N, n_ctx, POSITIONS, mask_id,
                                         BLOCK_N, PERMUTED)
        b_kT = load_rows_t(p_k_head, o_j, m_n, stride_kn, HEAD_DIM)  # [HEAD_DIM, BLOCK_N]
        b_v = load_rows(p_v_head, o_j, m_n, stride_vn, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        b_s = tl.dot(b_q, b_kT, input_precision=DOT_PRECISION) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
        if IS_PARTIAL:
            m_allowed = pattern_allowed(o_i[:, None], o_j[None, :], mask_id, n_ctx, RANDOM, NUM_BLOCKS, PARAMS,
                                        BLOCK_M, BLOCK_N)
            b_s = tl.where(m_allowed & m_n[None, :], b_s, float("-inf"))
        b_drop = pair_dropout(seed, dropout_threshold, dropout_scale, row_base, o_i[:, None], o_j[None, :], n_ctx,
                              DROPOUT)
        acc, l_i, m_i = online_softmax_update(acc, l_i, m_i, b_s, b_v, b_drop, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def blocksparse_fwd_kernel(
        Q, K, V, O, LSE,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
        n_ctx, num_q_heads, q_per_kv, q_per_head, num_q_tiles,
        HEAD_MASK, POSITIONS, FULL_COUNT, FULL_INDEX, full_width, PART_COUNT, PART_INDEX, part_width,
        RANDOM, NUM_BLOCKS, PARAMS, sm_scale_log2, seed, dropout_threshold, dropout_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERMUTED: tl.constexpr,
        DOT_PRECISION: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
    # Kernel tiles subdivide layout tiles: a query tile of BLOCK_M rows lies in one layout row.
    tl.static_assert(LAYOUT_BLOCK % BLOCK_M == 0 and LAYOUT_BLOCK % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hq, hkv, mask_id = blocksparse_program_head(pid_bh, num_q_heads, q_per_kv, q_per_head, HEAD_MASK)

    o_i, m_m = blocksparse_positions(pid_m * BLOCK_M, n_ctx, POSITIONS, mask_id, BLOCK_M, PERMUTED)
    b_q = load_rows(head_rows(Q, b, hq, stride_qb, stride_qh), o_i, m_m, stride_qn, HEAD_DIM)  # [BLOCK_M, HEAD_DIM]
    p_k_head = head_rows(K, b, hkv, stride_kb, stride_kh)
    p_v_head = head_rows(V, b, hkv, stride_vb, stride_vh)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row = mask_id.to(tl.int64) * num_q_tiles + pid_m * BLOCK_M // LAYOUT_BLOCK
    row_base = pid_bh.to(tl.int64) * n_ctx
    acc, l_i, m_i = blocksparse_fwd_inner(
        acc, l_i, m_i, b_q, p_k_head, p_v_head, stride_kn, stride_vn, FULL_COUNT, FULL_INDEX, full_width, row, o_i,
        mask_id, n_ctx, POSITIONS, RANDOM, NUM_BLOCKS, PARAMS, sm_scale_log2, row_base, seed, dropout_threshold,
        dropout_scale, HEAD_DIM, BLOCK_M, BLOCK_N, PERMUTED, False, DOT_PRECISION, LAYOUT_BLOCK, DROPOUT)
    acc, l_i, m_i = blocksparse_fwd_inner(
        acc, l_i, m_i, b_q, p_k_head, p_v_head, stride_kn, stride_vn, PART_COUNT, PART_INDEX, part_width, row, o_i,
        mask_id, n_ctx, POSITIONS, RANDOM, NUM_BLOCKS, PARAMS, sm_scale_log2, row_base, seed, dropout_threshold,
        dropout_scale, HEAD_DIM, BLOCK_M, BLOCK_N, PERMUTED, True, DOT_PRECISION, LAYOUT_BLOCK, DROPOUT)

    acc, b_lse = online_softmax_finish(acc, l_i, m_i, float("inf"))
    p_o = row_block(head_rows(O, b, hq, stride_ob, stride_oh), o_i, stride_on, HEAD_DIM)
    tl.store(p_o, acc.to(O.dtype.element_ty), mask=m_m[:, None])
    tl.store(LSE + row_base + o_i, b_lse, mask=m_m)


@triton.jit
def blocksparse_bwd_dkdv_inner(dk, dv, b_k, b_v, o_j, m_n, p_q_head, p_do_head, LSE, DELTA, row_base,
        stride_qn, stride_don, COUNT, INDEX, width, row, mask_id, n_ctx, POSITIONS, RANDOM,
        NUM_BLOCKS, PARAMS, sm_scale_log2, seed, dropout_threshold, dropout_scale, HEAD_DIM: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERMUTED: tl.constexpr, IS_PARTIAL: tl.constexpr,
        DOT_PRECISION: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
    SPLIT: tl.constexpr = LAYOUT_BLOCK // BLOCK_M
    count = tl.load(COUNT + row)
    for t in range(0, count * SPLIT):
        qb = tl.load(INDEX + row * width + t // SPLIT)
        o_i, m_m = blocksparse_positions(qb * LAYOUT_BLOCK + (t % SPLIT) * BLOCK_M, n_ctx, POSITIONS, mask_id,
                                         BLOCK_M, PERMUTED)
        b_q = load_rows(p_q_head, o_i, m_m, stride_qn, HEAD_DIM)
        b_do = load_rows(p_do_head, o_i, m_m, stride_don, HEAD_DIM)
        b_lse, b_delta = load_row_stats(LSE, DELTA, row_base, o_i, m_m)  # [BLOCK_M]
        b_sT = tl.dot(b_k, tl.trans(b_q), input_precision=DOT_PRECISION) * sm_scale_log2  # [BLOCK_N, BLOCK_M]
        b_pT = tl.math.exp2(b_sT - b_lse[None, :])
        if IS_PARTIAL:
            m_allowedT = pattern_allowed(o_i[None, :], o_j[:, None], mask_id, n_ctx, RANDOM, NUM_BLOCKS, PARAMS,
                                         BLOCK_N, BLOCK_M)
            b_pT = tl.where(m_allowedT & m_n[:, None], b_pT, 0.0)
        b_dropT = pair_dropout(seed, dropout_threshold, dropout_scale, row_base, o_i[None, :], o_j[:, None], n_ctx,
                               DROPOUT)
        dk, dv = softmax_bwd_kv(dk, dv, b_pT, b_dropT, b_q, b_v, b_do, b_delta, DOT_PRECISION)
    return dk, dv


@triton.jit
def blocksparse_bwd_dkdv_kernel(
        Q, K, V, DO, DK, DV, LSE, DELTA,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
        stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
        n_ctx, num_q_heads, q_per_kv, q_per_head, num_k_tiles,
        HEAD_MASK, POSITIONS, FULL_COUNT_T, FULL_INDEX_T, full_width_t, PART_COUNT_T, PART_INDEX_T, part_width_t,
        RANDOM, NUM_BLOCKS, PARAMS, sm_scale, sm_scale_log2, seed, dropout_threshold, dropout_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERMUTED: tl.constexpr,
        DOT_PRECISION: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
    tl.static_assert(LAYOUT_BLOCK % BLOCK_M == 0 and LAYOUT_BLOCK % BLOCK_N == 0)
    # One program per (key tile, batch x query head): dK and dV of that query head's view of the key tile,
    # summed over the query tiles that see it (the transposed tile lists). Grouped-query heads are summed
    # by the launcher.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hq, hkv, mask_id = blocksparse_program_head(pid_bh, num_q_heads, q_per_kv, q_per_head, HEAD_MASK)

    o_j, m_n = blocksparse_positions(pid_n * BLOCK_N, n_ctx, POSITIONS, mask_id, BLOCK_N, PERMUTED)
    # [BLOCK_N, HEAD_DIM] each
    b_k = load_rows(head_rows(K, b, hkv, stride_kb, stride_kh), o_j, m_n, stride_kn, HEAD_DIM)
    b_v = load_rows(head_rows(V, b, hkv, stride_vb, stride_vh), o_j, m_n, stride_vn, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    p_q_head = head_rows(Q, b, hq, stride_qb, stride_qh)
    p_do_head = head_rows(DO, b, hq, stride_dob, stride_doh)
    row_base = pid_bh.to(tl.int64) * n_ctx
    row = mask_id.to(tl.int64) * num_k_tiles + pid_n * BLOCK_N // LAYOUT_BLOCK
    dk, dv = blocksparse_bwd_dkdv_inner(
        dk, dv, b_k, b_v, o_j, m_n, p_q_head, p_do_head, LSE, DELTA, row_base, stride_qn, stride_don,
        FULL_COUNT_T, FULL_INDEX_T, full_width_t, row, mask_id, n_ctx, POSITIONS, RANDOM,
        NUM_BLOCKS, PARAMS, sm_scale_log2, seed, dropout_threshold, dropout_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
        PERMUTED, False, DOT_PRECISION, LAYOUT_BLOCK, DROPOUT)
    dk, dv = blocksparse_bwd_dkdv_inner(
        dk, dv, b_k, b_v, o_j, m_n, p_q_head, p_do_head, LSE, DELTA, row_base, stride_qn, stride_don,
        PART_COUNT_T, PART_INDEX_T, part_width_t, row, mask_id, n_ctx, POSITIONS, RANDOM,
        NUM_BLOCKS, PARAMS, sm_scale_log2, seed, dropout_threshold, dropout_scale, HEAD_DIM, BLOCK_M, BLOCK_N,
        PERMUTED, True, DOT_PRECISION, LAYOUT_BLOCK, DROPOUT)

    p_dk = row_block(head_rows(DK, b, hq, stride_dkb, stride_dkh), o_j, stride_dkn, HEAD_DIM)
    p_dv = row_block(head_rows(DV, b, hq, stride_dvb, stride_dvh), o_j, stride_dvn, HEAD_DIM)
    tl.store(p_dk, (dk * sm_scale).to(DK.dtype.element_ty), mask=m_n[:, None])
    tl.store(p_dv, dv.to(DV.dtype.element_ty), mask=m_n[:, None])


@triton.jit
def blocksparse_bwd_dq_inner(dq, b_q, b_do, b_lse, b_delta, o_i, p_k_head, p_v_head, stride_kn, stride_vn,
        COUNT, INDEX, width, row, mask_id, n_ctx, POSITIONS, RANDOM, NUM_BLOCKS, PARAMS, sm_scale_log2, row_base,
        seed, dropout_threshold, dropout_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, PERMUTED: tl.constexpr, IS_PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
        LAYOUT_BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
    SPLIT: tl.constexpr = LAYOUT_BLOCK // BLOCK_N
    count = tl.load(COUNT + row)
    for t in range(0, count * SPLIT):
        kb = tl.load(INDEX + row * width + t // SPLIT)
        o_j, m_n = blocksparse_positions(kb * LAYOUT_BLOCK + (t % SPLIT) * BLOCK_N, n_ctx, POSITIONS, mask_id,
                                         BLOCK_N, PERMUTED)
        b_k = load_rows(p_k_head, o_j, m_n, stride_kn, HEAD_DIM)  # [BLOCK_N, HEAD_DIM]
        b_vT = load_rows_t(p_v_head, o_j, m_n, stride_vn, HEAD_DIM)  # [HEAD_DIM, BLOCK_N]
        b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * sm_scale_log2  # [BLOCK_M, BLOCK_N]
        b_p = tl.math.exp2(b_s - b_lse[:, None])
        if IS_PARTIAL:
            m_allowed = pattern_allowed(o_i[:, None], o_j[None, :], mask_id, n_ctx, RANDOM, NUM_BLOCKS, PARAMS,
                                        BLOCK_M, BLOCK_N)
            b_p = tl.where(m_allowed & m_n[None, :], b_p, 0.0)
        b_drop = pair_dropout(seed, dropout_threshold, dropout_scale, row_base, o_i[:, None], o_j[None, :], n_ctx,
                              DROPOUT)
        dq = softmax_bwd_q(dq, b_p, b_drop, b_k, b_vT, b_do, b_delta, DOT_PRECISION)
    return dq


@triton.jit
def blocksparse_bwd_dq_kernel(
        Q, K, V, DO, DQ, LSE, DELTA,
        stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
        n_ctx, num_q_heads, q_per_kv, q_per_head, num_q_tiles,
        HEAD_MASK, POSITIONS, FULL_COUNT, FULL_INDEX, full_width, PART_COUNT, PART_INDEX, part_width,
        RANDOM, NUM_BLOCKS, PARAMS, sm_scale, sm_scale_log2, seed, dropout_threshold, dropout_scale,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PERMUTED: tl.constexpr,
        DOT_PRECISION: tl.constexpr, LAYOUT_BLOCK: tl.constexpr, DROPOUT: tl.constexpr):
    tl.static_assert(LAYOUT_BLOCK % BLOCK_M == 0 and LAYOUT_BLOCK % BLOCK_N == 0)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, hq, hkv, mask_id = blocksparse_program_head(pid_bh, num_q_heads, q_per_kv, q_per_head, HEAD_MASK)

    o_i, m_m = blocksparse_positions(pid_m * BLOCK_M, n_ctx, POSITIONS, mask_id, BLOCK_M, PERMUTED)
    b_q = load_rows(head_rows(Q, b, hq, stride_qb, stride_qh), o_i, m_m, stride_qn, HEAD_DIM)
    b_do = load_rows(head_rows(DO, b, hq, stride_dob, stride_doh), o_i, m_m, stride_don, HEAD_DIM)
    row_base = pid_bh.to(tl.int64) * n_ctx
    b_lse, b_delta = load_row_stats(LSE, DELTA, row_base, o_i, m_m)
    p_k_head = head_rows(K, b, hkv, stride_kb, stride_kh)
    p_v_head = head_rows(V, b, hkv, stride_vb, stride_vh)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    row = mask_id.to(tl.int64) * num_q_tiles + pid_m * BLOCK_M // LAYOUT_BLOCK
    dq = blocksparse_bwd_dq_inner(
        dq, b_q, b_do, b_lse, b_delta, o_i, p_k_head, p_v_head, stride_kn, stride_vn, FULL_COUNT, FULL_INDEX,
        full_width, row, mask_id, n_ctx, POSITIONS, RANDOM, NUM_BLOCKS, PARAMS, sm_scale_log2, row_base, seed,
        dropout_threshold, dropout_scale, HEAD_DIM, BLOCK_M, BLOCK_N, PERMUTED, False, DOT_PRECISION, LAYOUT_BLOCK,
        DROPOUT)
    dq = blocksparse_bwd_dq_inner(
        dq, b_q, b_do, b_lse, b_delta, o_i, p_k_head, p_v_head, stride_kn, stride_vn, PART_COUNT, PART_INDEX,
        part_width, row, mask_id, n_ctx, POSITIONS, RANDOM, NUM_BLOCKS, PARAMS, sm_scale_log2, row_base, seed,
        dropout_threshold, dropout_scale, HEAD_DIM, BLOCK_M, BLOCK_N, PERMUTED, True, DOT_PRECISION, LAYOUT_BLOCK,
        DROPOUT)
    p_dq = row_block(head_rows(DQ, b, hq, stride_dqb, stride_dqh), o_i, stride_dqn, HEAD_DIM)
    tl.store(p_dq, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_m[:, None])

"""Triton kernels: linear attention (kernel heads), out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps).

Chunk-parallel, as flash-linear-attention's chunked kernels. Rows are cut into chunks of BLOCK_M rows (one chunk
size for every kernel of a call, except the scan, whose BLOCK_M is a block of features), and each pass is three
steps:
  1. state:  per chunk, its own contribution to a state [F, d] and its normalizer [F]: the keys' sum of
             phi(k_j) v_j^T and phi(k_j) in the forward pass (linear_state_kernel), the queries' sum of
             phi(q_i) G_i^T and phi(q_i) dl_i in the backward pass (BACKWARD), G and dl the gradients of row
             i's numerator and denominator;
  2. scan:   over chunks, in place: each chunk's slot becomes the state its rows see, the sum over earlier
             chunks (forward) or later chunks (backward, REVERSE) when causal, the sum over all chunks, in
             slot 0, otherwise (TOTAL);
  3. apply:  per chunk, the outputs (linear_fwd_kernel) or gradients (linear_bwd_dq_kernel,
             linear_bwd_dkdv_kernel): the state of step 2, plus the masked products within the chunk when causal.
Only the scan is sequential, over n / BLOCK_M chunks of [BLOCK_M, BLOCK_N] state tiles; no kernel carries a
state through a loop, which keeps every kernel's tiles in registers. Work O(n d F), memory n / BLOCK_M states.

FEATURE is "elu1", "relu" or "favor". favor's features are held as phi~_j = exp(a_j - r_j) / sqrt(F) with
r_j = max_f a_jf (so phi~ <= 1/sqrt(F)); key j enters query i's sums scaled by exp(r_j - M_i), M_i the largest
r_j query i sees (a prefix maximum when CAUSAL). A state is sum_i exp(e_i - e) x_i with a reference e >= every
e_i it sums: e_j = r_j for the keys' states, e_i = -M_i for the queries' (weights exp(X - M_i) = exp(-M_i - (-X))),
so every exponential here has an argument <= 0, and the scan rescales to the larger reference, like online
softmax. For elu1 and relu every weight is 1.
Products take their operands in the input dtype (16-bit inputs: features and states are rounded to it for the
tensor cores, as flash-linear-attention does) and accumulate in float32; fp32 inputs use exact IEEE products
(DOT_PRECISION "ieee"), or 3xTF32 ("tf32x3": fp32-level error on tensor cores) for favor at head_dim 128, where
IEEE tiles spill. favor's projection and its gradient take float32 operands (TF32 for 16-bit inputs).
Prefixes: b_ block values, p_ pointers, o_ offsets, m_ masks.
"""

import triton
import triton.language as tl


@triton.jit
def _linear_dot(a, b, P, DOT_PRECISION: tl.constexpr):
    """a @ b with float32 accumulation, the operands in the element type of pointer P (the input dtype)."""
    return tl.dot(a.to(P.dtype.element_ty), b.to(P.dtype.element_ty), input_precision=DOT_PRECISION)


@triton.jit
def _linear_dot_rows(a, b, P, DOT_PRECISION: tl.constexpr):
    """_linear_dot for linear_state_kernel's phi^T Y, a reduction over the chunk's rows (K = BLOCK_M, 16 for fp32
    inputs): fp32 always takes exact IEEE FMA products there, cheap at that K, as 3xTF32's split transposed
    operand spills on sm_80 (measured)."""
    if DOT_PRECISION == "tf32x3":
        return _linear_dot(a, b, P, "ieee")
    else:
        return _linear_dot(a, b, P, DOT_PRECISION)


@triton.jit
def _linear_features(b_x, m_row, p_w, data_scale, feature_scale, FEATURE: tl.constexpr, HEAD_DIM: tl.constexpr,
        FEATURE_DIM: tl.constexpr, BLOCK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """phi of the rows b_x [BLOCK, HEAD_DIM] (0 on rows outside the sequence) and each row's log-scale r (favor:
    max_f w_f.x' - |x'|^2 / 2, -inf outside the sequence; 0 otherwise). favor projects in float32."""
    if FEATURE == "favor":
        o_f = tl.arange(0, FEATURE_DIM)
        o_d = tl.arange(0, HEAD_DIM)
        b_w = tl.load(p_w + o_f[:, None] * HEAD_DIM + o_d[None, :])  # [F, HEAD_DIM]
        b_xs = b_x * data_scale
        b_proj = tl.dot(b_xs, tl.trans(b_w), input_precision=DOT_PRECISION)  # [BLOCK, F]
        b_top = tl.max(b_proj, 1)
        b_phi = tl.exp(b_proj - b_top[:, None]) * feature_scale
        b_r = tl.where(m_row, b_top - 0.5 * tl.sum(b_xs * b_xs, 1), float("-inf"))
    else:
        tl.static_assert(FEATURE_DIM == HEAD_DIM)
        if FEATURE == "elu1":
            b_phi = tl.where(b_x > 0, b_x + 1.0, tl.exp(b_x))
        else:
            b_phi = tl.maximum(b_x, 0.0)
        b_r = tl.zeros([BLOCK], tl.float32)
    b_phi = tl.where(m_row[:, None], b_phi, 0.0)
    return b_phi, b_r


@triton.jit
def _linear_features_bwd(b_dphi, b_phi, X, row0, o_i, m_i, p_w, data_scale, FEATURE: tl.constexpr,
        HEAD_DIM: tl.constexpr, FEATURE_DIM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dL/dx from dL/dphi [BLOCK, F] for the rows o_i of X. favor's stabilisers are constants here (the Performer's
    .detach()): for phi_f = exp(w_f.x' - |x'|^2/2 - const), dphi_f/dx' = phi_f (w_f - x'); it reloads the x tile
    (from cache) rather than keeping it live through the kernel. elu1 and relu read their derivative off phi
    (elu1: 1 where x > 0, i.e. phi > 1, else phi = exp(x), so min(phi, 1); relu: phi > 0)."""
    if FEATURE == "favor":
        o_f = tl.arange(0, FEATURE_DIM)
        o_d = tl.arange(0, HEAD_DIM)
        b_x = _linear_load_rows(X, row0, o_i, m_i, o_d, HEAD_DIM).to(tl.float32)
        b_w = tl.load(p_w + o_f[:, None] * HEAD_DIM + o_d[None, :])  # [F, HEAD_DIM]
        b_t = b_dphi * b_phi
        b_dxs = tl.dot(b_t, b_w, input_precision=DOT_PRECISION) - (b_x * data_scale) * tl.sum(b_t, 1)[:, None]
        b_dx = b_dxs * data_scale
    elif FEATURE == "elu1":
        b_dx = b_dphi * tl.minimum(b_phi, 1.0)
    else:
        b_dx = tl.where(b_phi > 0, b_dphi, 0.0)
    return b_dx


@triton.jit
def _linear_load_rows(P, row0, o_i, m_i, o_d, HEAD_DIM: tl.constexpr):
    """Rows o_i of one (batch, head) of a contiguous (batch, heads, n, HEAD_DIM) tensor, in its own dtype (0 outside
    the sequence)."""
    p = P + (row0 + o_i.to(tl.int64))[:, None] * HEAD_DIM + o_d[None, :]
    return tl.load(p, mask=m_i[:, None], other=0.0)


@triton.jit
def _linear_row_scales(DEN, DELTA, row0, o_i, m_i, eps):
    """1 / (den_i + eps) and dl_i = -(dO_i . O_i) / (den_i + eps) [BLOCK], the gradient of row i's denominator."""
    b_den = tl.load(DEN + row0 + o_i, mask=m_i, other=0.0)
    b_delta = tl.load(DELTA + row0 + o_i, mask=m_i, other=0.0)
    b_rinv = 1.0 / (b_den + eps)
    return b_rinv, -b_delta * b_rinv


@triton.jit
def _linear_row_grads(DO, row0, o_i, m_i, o_v, b_rinv, HEAD_DIM: tl.constexpr):
    """G_i = dO_i / (den_i + eps) [BLOCK, columns o_v], the gradient of row i's numerator, in DO's dtype (it only
    enters products)."""
    b_do = _linear_load_rows(DO, row0, o_i, m_i, o_v, HEAD_DIM).to(tl.float32)
    return (b_do * b_rinv[:, None]).to(DO.dtype.element_ty)


@triton.jit
def _linear_slot(pid_c, CAUSAL: tl.constexpr):
    """The state slot chunk pid_c reads: its own when CAUSAL, the total (slot 0) otherwise."""
    if CAUSAL:
        return pid_c
    else:
        return 0


@triton.jit
def _linear_state_offsets(pid_bh, slot, num_chunks, o_f, o_v, FEATURE_DIM: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Offsets of rows o_f, columns o_v of state `slot` in a (batch x heads, chunks, F, HEAD_DIM) buffer."""
    base = (pid_bh.to(tl.int64) * num_chunks + slot) * FEATURE_DIM
    return (base + o_f)[:, None] * HEAD_DIM + o_v[None, :]


@triton.jit
def linear_state_kernel(
        X, Y, W, DEN, DELTA, MX, STATE_S, STATE_Z, STATE_E, n_ctx, num_heads, eps, data_scale, feature_scale,
        HEAD_DIM: tl.constexpr, FEATURE_DIM: tl.constexpr, FEATURE: tl.constexpr, BACKWARD: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Step 1, one chunk's own state: S_c = sum_i w_i phi(x_i) y_i^T [F, BLOCK_N columns],
    # z_c = sum_i w_i phi(x_i) u_i and (favor) its reference e_c = max_i e_i, with w_i = exp(e_i - e_c).
    #   forward (keys):     x = k, y = v, u = 1,  e = r (the key's log-scale);
    #   BACKWARD (queries): x = q, y = G = dO / (den + eps) (Y is dO), u = dl, e = -M_i (MX).
    # Grid: (batch x heads, chunks, HEAD_DIM / BLOCK_N); the column-0 program writes z and e.
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_v = tl.program_id(2)
    num_chunks = tl.num_programs(1)
    row0 = pid_bh.to(tl.int64) * n_ctx
    o_i = pid_c * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = o_i < n_ctx
    o_d = tl.arange(0, HEAD_DIM)
    o_f = tl.arange(0, FEATURE_DIM)
    o_v = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    p_w = W + (pid_bh % num_heads).to(tl.int64) * FEATURE_DIM * HEAD_DIM
    b_x = _linear_load_rows(X, row0, o_i, m_i, o_d, HEAD_DIM).to(tl.float32)
    b_phi, b_e = _linear_features(b_x, m_i, p_w, data_scale, feature_scale, FEATURE, HEAD_DIM, FEATURE_DIM,
                                  BLOCK_M, DOT_PRECISION)
    if BACKWARD:
        b_rinv, b_u = _linear_row_scales(DEN, DELTA, row0, o_i, m_i, eps)
        b_y = _linear_row_grads(Y, row0, o_i, m_i, o_v, b_rinv, HEAD_DIM)
        if FEATURE == "favor":
            b_e = -tl.load(MX + row0 + o_i, mask=m_i, other=float("inf"))
    else:
        b_y = _linear_load_rows(Y, row0, o_i, m_i, o_v, HEAD_DIM)
        b_u = tl.full([BLOCK_M], 1.0, tl.float32)
    if FEATURE == "favor":
        e_c = tl.max(b_e, 0)
        b_phi = b_phi * tl.exp(b_e - e_c)[:, None]
    b_s = _linear_dot_rows(tl.trans(b_phi), b_y, X, DOT_PRECISION)  # [F, BLOCK_N]
    tl.store(STATE_S + _linear_state_offsets(pid_bh, pid_c, num_chunks, o_f, o_v, FEATURE_DIM, HEAD_DIM), b_s)
    if pid_v == 0:
        p_z = STATE_Z + (pid_bh.to(tl.int64) * num_chunks + pid_c) * FEATURE_DIM + o_f
        tl.store(p_z, tl.sum(b_phi * b_u[:, None], 0))
        if FEATURE == "favor":
            tl.store(STATE_E + pid_bh.to(tl.int64) * num_chunks + pid_c, e_c)


@triton.jit
def linear_scan_kernel(
        STATE_S, STATE_Z, STATE_E, SEEN_Z, SEEN_E, num_chunks,
        HEAD_DIM: tl.constexpr, FEATURE_DIM: tl.constexpr, FAVOR: tl.constexpr, REVERSE: tl.constexpr,
        TOTAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Step 2: walks the chunks (last to first when REVERSE) and replaces each chunk's own state S_c by the sum of
    # the states walked before it (exclusive scan); TOTAL: by nothing, and slot 0 gets the sum of all. The
    # normalizers and references go to SEEN_Z and SEEN_E, not in place: every program of a (batch x head) reads
    # them.
    # Grid: (batch x heads, FEATURE_DIM / BLOCK_M, HEAD_DIM / BLOCK_N); each program owns its S tiles, so S is
    # updated in place.
    pid_bh = tl.program_id(0)
    pid_f = tl.program_id(1)
    pid_v = tl.program_id(2)
    o_f = pid_f * BLOCK_M + tl.arange(0, BLOCK_M)
    o_v = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    base = pid_bh.to(tl.int64) * num_chunks
    b_s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    b_z = tl.zeros([BLOCK_M], tl.float32)
    e_ref = tl.max(tl.full([BLOCK_M], float("-inf"), tl.float32), 0)  # -inf: an empty sum
    for t in range(0, num_chunks):
        if REVERSE:
            c = num_chunks - 1 - t
        else:
            c = t
        p_s = STATE_S + _linear_state_offsets(pid_bh, c, num_chunks, o_f, o_v, FEATURE_DIM, HEAD_DIM)
        b_own = tl.load(p_s)
        b_own_z = tl.load(STATE_Z + (base + c) * FEATURE_DIM + o_f)
        if not TOTAL:
            tl.store(p_s, b_s)
            if pid_v == 0:
                tl.store(SEEN_Z + (base + c) * FEATURE_DIM + o_f, b_z)
                if FAVOR:
                    if pid_f == 0:
                        tl.store(SEEN_E + base + c, e_ref)
        if FAVOR:
            e_own = tl.load(STATE_E + base + c)
            e_new = tl.maximum(e_ref, e_own)
            b_old = tl.exp(e_ref - e_new)
            b_new = tl.exp(e_own - e_new)
            b_s = b_s * b_old + b_own * b_new
            b_z = b_z * b_old + b_own_z * b_new
            e_ref = e_new
        else:
            b_s += b_own
            b_z += b_own_z
    if TOTAL:
        tl.store(STATE_S + _linear_state_offsets(pid_bh, 0, num_chunks, o_f, o_v, FEATURE_DIM, HEAD_DIM), b_s)
        if pid_v == 0:
            tl.store(SEEN_Z + base * FEATURE_DIM + o_f, b_z)
            if FAVOR:
                if pid_f == 0:
                    tl.store(SEEN_E + base, e_ref)


@triton.jit
def linear_fwd_kernel(
        Q, K, V, W, O, DEN, MX, STATE_S, STATE_Z, STATE_E, n_ctx, num_heads, eps, data_scale, feature_scale,
        HEAD_DIM: tl.constexpr, FEATURE_DIM: tl.constexpr, FEATURE: tl.constexpr, CAUSAL: tl.constexpr,
        DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Step 3 of the forward pass, output columns [BLOCK_N] of one chunk: phi(q_i)^T S_c (the scanned state) plus,
    # when CAUSAL, the masked products phi(Q_c) phi(K_c)^T V_c within the chunk. Writes DEN (phi(q)^T z, before
    # eps) and MX (favor: M_i) for the backward pass. Grid: (batch x heads, chunks, HEAD_DIM / BLOCK_N).
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_v = tl.program_id(2)
    num_chunks = tl.num_programs(1)
    slot = _linear_slot(pid_c, CAUSAL)
    row0 = pid_bh.to(tl.int64) * n_ctx
    o_c = tl.arange(0, BLOCK_M)
    o_i = pid_c * BLOCK_M + o_c
    m_i = o_i < n_ctx
    o_d = tl.arange(0, HEAD_DIM)
    o_f = tl.arange(0, FEATURE_DIM)
    o_v = pid_v * BLOCK_N + tl.arange(0, BLOCK_N)
    p_w = W + (pid_bh % num_heads).to(tl.int64) * FEATURE_DIM * HEAD_DIM
    b_s = tl.load(STATE_S + _linear_state_offsets(pid_bh, slot, num_chunks, o_f, o_v, FEATURE_DIM, HEAD_DIM))
    b_z = tl.load(STATE_Z + (pid_bh.to(tl.int64) * num_chunks + slot) * FEATURE_DIM + o_f)
    b_q = _linear_load_rows(Q, row0, o_i, m_i, o_d, HEAD_DIM).to(tl.float32)
    b_phiq, _ = _linear_features(b_q, m_i, p_w, data_scale, feature_scale, FEATURE, HEAD_DIM, FEATURE_DIM,
                                 BLOCK_M, DOT_PRECISION)
    b_num = _linear_dot(b_phiq, b_s, Q, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
    b_den = tl.sum(b_phiq * b_z[None, :], 1)
    if FEATURE == "favor":
        e_ref = tl.load(STATE_E + pid_bh.to(tl.int64) * num_chunks + slot)
        b_mx = tl.zeros([BLOCK_M], tl.float32) + e_ref
    if CAUSAL:
        b_k = _linear_load_rows(K, row0, o_i, m_i, o_d, HEAD_DIM).to(tl.float32)
        b_v = _linear_load_rows(V, row0, o_i, m_i, o_v, HEAD_DIM)
        b_phik, b_r = _linear_features(b_k, m_i, p_w, data_scale, feature_scale, FEATURE, HEAD_DIM, FEATURE_DIM,
                                       BLOCK_M, DOT_PRECISION)
        m_causal = o_c[:, None] >= o_c[None, :]  # key j <= query i within the chunk
        b_a = _linear_dot(b_phiq, tl.trans(b_phik), Q, DOT_PRECISION)  # [BLOCK_M, BLOCK_M]
        if FEATURE == "favor":
            # M_i over keys j <= i only: later keys never rescale earlier outputs (no leak from the future).
            b_mx = tl.maximum(e_ref, tl.max(tl.where(m_causal, b_r[None, :], float("-inf")), 1))
            b_inter = tl.exp(e_ref - b_mx)
            b_num = b_num * b_inter[:, None]
            b_den = b_den * b_inter
            b_a = b_a * tl.exp(tl.where(m_causal, b_r[None, :] - b_mx[:, None], float("-inf")))
        else:
            b_a = tl.where(m_causal, b_a, 0.0)
        b_num += _linear_dot(b_a, b_v, Q, DOT_PRECISION)
        b_den += tl.sum(b_a, 1)
    b_o = b_num / (b_den + eps)[:, None]
    p_o = O + (row0 + o_i.to(tl.int64))[:, None] * HEAD_DIM + o_v[None, :]
    tl.store(p_o, b_o.to(O.dtype.element_ty), mask=m_i[:, None])
    if pid_v == 0:
        tl.store(DEN + row0 + o_i, b_den, mask=m_i)
        if FEATURE == "favor":
            tl.store(MX + row0 + o_i, b_mx, mask=m_i)


@triton.jit
def linear_bwd_dq_kernel(
        Q, K, V, W, DO, DEN, DELTA, MX, DQ, STATE_S, STATE_Z, STATE_E, n_ctx, num_heads, eps, data_scale,
        feature_scale, HEAD_DIM: tl.constexpr, FEATURE_DIM: tl.constexpr, FEATURE: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # dphi(q_i) = exp(e_c - M_i) (S_c G_i + z_c dl_i) with the forward pass's scanned state, plus, when CAUSAL,
    # sum_{j <= i in the chunk} exp(r_j - M_i) (G_i . v_j + dl_i) phi(k_j); then through the feature map. The
    # value columns are walked BLOCK_N at a time (G_i . v_j and S_c G_i are sums over them), so only one block of
    # S, G and V is live at a time. Grid: (batch x heads, chunks).
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    slot = _linear_slot(pid_c, CAUSAL)
    row0 = pid_bh.to(tl.int64) * n_ctx
    o_c = tl.arange(0, BLOCK_M)
    o_i = pid_c * BLOCK_M + o_c
    m_i = o_i < n_ctx
    o_d = tl.arange(0, HEAD_DIM)
    o_f = tl.arange(0, FEATURE_DIM)
    p_w = W + (pid_bh % num_heads).to(tl.int64) * FEATURE_DIM * HEAD_DIM
    b_z = tl.load(STATE_Z + (pid_bh.to(tl.int64) * num_chunks + slot) * FEATURE_DIM + o_f)
    b_q = _linear_load_rows(Q, row0, o_i, m_i, o_d, HEAD_DIM).to(tl.float32)
    b_phiq, _ = _linear_features(b_q, m_i, p_w, data_scale, feature_scale, FEATURE, HEAD_DIM, FEATURE_DIM,
                                 BLOCK_M, DOT_PRECISION)
    b_rinv, b_dl = _linear_row_scales(DEN, DELTA, row0, o_i, m_i, eps)
    b_dphi = b_dl[:, None] * b_z[None, :]  # [BLOCK_M, F]
    if CAUSAL:
        b_p = tl.zeros([BLOCK_M, BLOCK_M], tl.float32) + b_dl[:, None]  # G_i . v_j + dl_i, summed over blocks
    for v0 in range(0, HEAD_DIM, BLOCK_N):
        o_v = v0 + tl.arange(0, BLOCK_N)
        b_g = _linear_row_grads(DO, row0, o_i, m_i, o_v, b_rinv, HEAD_DIM)  # [BLOCK_M, BLOCK_N]
        b_s = tl.load(STATE_S + _linear_state_offsets(pid_bh, slot, num_chunks, o_f, o_v, FEATURE_DIM, HEAD_DIM))
        b_dphi += _linear_dot(b_g, tl.trans(b_s), Q, DOT_PRECISION)
        if CAUSAL:
            b_v = _linear_load_rows(V, row0, o_i, m_i, o_v, HEAD_DIM)
            b_p += _linear_dot(b_g, tl.trans(b_v), Q, DOT_PRECISION)
    if FEATURE == "favor":
        e_ref = tl.load(STATE_E + pid_bh.to(tl.int64) * num_chunks + slot)
        b_mx = tl.load(MX + row0 + o_i, mask=m_i, other=float("inf"))
        b_dphi = b_dphi * tl.exp(e_ref - b_mx)[:, None]
    if CAUSAL:
        b_k = _linear_load_rows(K, row0, o_i, m_i, o_d, HEAD_DIM).to(tl.float32)
        b_phik, b_r = _linear_features(b_k, m_i, p_w, data_scale, feature_scale, FEATURE, HEAD_DIM, FEATURE_DIM,
                                       BLOCK_M, DOT_PRECISION)
        m_causal = o_c[:, None] >= o_c[None, :]
        if FEATURE == "favor":
            b_p = b_p * tl.exp(tl.where(m_causal, b_r[None, :] - b_mx[:, None], float("-inf")))
        else:
            b_p = tl.where(m_causal, b_p, 0.0)
        b_dphi += _linear_dot(b_p, b_phik, Q, DOT_PRECISION)
    b_dq = _linear_features_bwd(b_dphi, b_phiq, Q, row0, o_i, m_i, p_w, data_scale, FEATURE, HEAD_DIM, FEATURE_DIM,
                                DOT_PRECISION)
    p_dq = DQ + (row0 + o_i.to(tl.int64))[:, None] * HEAD_DIM + o_d[None, :]
    tl.store(p_dq, b_dq.to(DQ.dtype.element_ty), mask=m_i[:, None])


@triton.jit
def linear_bwd_dkdv_kernel(
        Q, K, V, W, DO, DEN, DELTA, MX, DK, DV, STATE_R, STATE_RHO, STATE_E, n_ctx, num_heads, eps,
        data_scale, feature_scale, HEAD_DIM: tl.constexpr, FEATURE_DIM: tl.constexpr, FEATURE: tl.constexpr,
        CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # For key j: dv_j = sum_{i sees j} A_ij G_i and dphi~(k_j) = sum_{i sees j} exp(r_j - M_i) phi(q_i) (G_i . v_j
    # + dl_i). The queries of later chunks (all queries when not CAUSAL) come in through the backward pass's
    # scanned state R_c = sum_i exp(-M_i - e_c) phi(q_i) G_i^T, rho_c likewise, e_c = max of their -M_i (so
    # exp(r_j + e_c) <= 1: M_i >= r_j); those of the key's own chunk, when CAUSAL, through the masked products.
    # The value columns are walked BLOCK_N at a time: each block's dv is stored at once, and its share of dphi~
    # (v_j R_c and G_i . v_j) accumulated. Grid: (batch x heads, chunks).
    pid_bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    num_chunks = tl.num_programs(1)
    slot = _linear_slot(pid_c, CAUSAL)
    row0 = pid_bh.to(tl.int64) * n_ctx
    o_c = tl.arange(0, BLOCK_M)
    o_j = pid_c * BLOCK_M + o_c
    m_j = o_j < n_ctx
    o_d = tl.arange(0, HEAD_DIM)
    o_f = tl.arange(0, FEATURE_DIM)
    p_w = W + (pid_bh % num_heads).to(tl.int64) * FEATURE_DIM * HEAD_DIM
    b_rho = tl.load(STATE_RHO + (pid_bh.to(tl.int64) * num_chunks + slot) * FEATURE_DIM + o_f)
    b_k = _linear_load_rows(K, row0, o_j, m_j, o_d, HEAD_DIM).to(tl.float32)
    b_phik, b_r = _linear_features(b_k, m_j, p_w, data_scale, feature_scale, FEATURE, HEAD_DIM, FEATURE_DIM,
                                   BLOCK_M, DOT_PRECISION)
    b_dphi = tl.zeros([BLOCK_M, FEATURE_DIM], tl.float32) + b_rho[None, :]  # v_j R_c + rho_c, summed over blocks
    if FEATURE == "favor":
        e_ref = tl.load(STATE_E + pid_bh.to(tl.int64) * num_chunks + slot)
        b_wk = tl.exp(b_r + e_ref)[:, None]  # [BLOCK_M, 1]: key j's weight against the scanned state
    if CAUSAL:
        b_q = _linear_load_rows(Q, row0, o_j, m_j, o_d, HEAD_DIM).to(tl.float32)
        b_phiq, _ = _linear_features(b_q, m_j, p_w, data_scale, feature_scale, FEATURE, HEAD_DIM, FEATURE_DIM,
                                     BLOCK_M, DOT_PRECISION)
        b_phiq = b_phiq.to(K.dtype.element_ty)  # only enters products here
        b_rinv, b_dl = _linear_row_scales(DEN, DELTA, row0, o_j, m_j, eps)
        m_causal_t = o_c[None, :] >= o_c[:, None]  # [BLOCK_M (keys j), BLOCK_M (queries i)]: i >= j
        if FEATURE == "favor":
            b_mx = tl.load(MX + row0 + o_j, mask=m_j, other=float("inf"))
            b_pair = tl.exp(tl.where(m_causal_t, b_r[:, None] - b_mx[None, :], float("-inf")))
        else:
            b_pair = m_causal_t.to(tl.float32)
        b_at = _linear_dot(b_phik, tl.trans(b_phiq), K, DOT_PRECISION) * b_pair  # [BLOCK_M (j), BLOCK_M (i)]
        b_pt = tl.zeros([BLOCK_M, BLOCK_M], tl.float32) + b_dl[None, :]  # v_j . G_i + dl_i, summed over blocks
    for v0 in range(0, HEAD_DIM, BLOCK_N):
        o_v = v0 + tl.arange(0, BLOCK_N)
        b_rs = tl.load(STATE_R + _linear_state_offsets(pid_bh, slot, num_chunks, o_f, o_v, FEATURE_DIM, HEAD_DIM))
        b_v = _linear_load_rows(V, row0, o_j, m_j, o_v, HEAD_DIM)  # [BLOCK_M, BLOCK_N]
        b_dv = _linear_dot(b_phik, b_rs, K, DOT_PRECISION)  # [BLOCK_M, BLOCK_N]
        if FEATURE == "favor":
            b_dv = b_dv * b_wk
        b_dphi += _linear_dot(b_v, tl.trans(b_rs), K, DOT_PRECISION)
        if CAUSAL:
            b_g = _linear_row_grads(DO, row0, o_j, m_j, o_v, b_rinv, HEAD_DIM)
            b_dv += _linear_dot(b_at, b_g, K, DOT_PRECISION)
            b_pt += _linear_dot(b_v, tl.trans(b_g), K, DOT_PRECISION)
        p_dv = DV + (row0 + o_j.to(tl.int64))[:, None] * HEAD_DIM + o_v[None, :]
        tl.store(p_dv, b_dv.to(DV.dtype.element_ty), mask=m_j[:, None])
    if FEATURE == "favor":
        b_dphi = b_dphi * b_wk
    if CAUSAL:
        b_dphi += _linear_dot(b_pt * b_pair, b_phiq, K, DOT_PRECISION)
    b_dk = _linear_features_bwd(b_dphi, b_phik, K, row0, o_j, m_j, p_w, data_scale, FEATURE, HEAD_DIM, FEATURE_DIM,
                                DOT_PRECISION)
    p_dk = DK + (row0 + o_j.to(tl.int64))[:, None] * HEAD_DIM + o_d[None, :]
    tl.store(p_dk, b_dk.to(DK.dtype.element_ty), mask=m_j[:, None])

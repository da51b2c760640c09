"""Kernel heads: linear attention (Katharopoulos et al. 2020, "Transformers are RNNs"). ---------------------------

For head h, query i:  out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),
                      S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j),
over keys j <= i when causal, all j otherwise. No softmax scale: phi replaces the exponential.
  elu1:  phi(x) = elu(x) + 1                      (d features)
  relu:  phi(x) = max(x, 0)                       (d features; a row of zeros gives 0 / (0 + eps) = 0)
  favor: FAVOR+ positive random features (Choromanski et al. 2020), m features: with x' = x * d^-1/4,
         phi_f(x) = exp(w_f . x' - |x'|^2 / 2 - c) / sqrt(m), W = (w_f) an (m, d) buffer of orthogonal random
         rows with chi-distributed norms, drawn from a seed (linear_favor_projection).
         The stabiliser c: queries use their row's largest exponent; keys use M_i, the largest exponent
         max_f (w_f . k_j' - |k_j'|^2 / 2) over the keys j query i sees (j <= i when causal). Both cancel in the
         ratio except against eps, and no later key can change an earlier output (a sequence-wide maximum would:
         performer-pytorch issue 82). Every exponential has an argument <= 0, so nothing overflows, and eps is
         relative to a denominator whose largest visible key feature is 1/sqrt(m). Stabilisers are constants
         for differentiation (as the Performer's .detach()); no gradient reaches W (a fixed buffer).
eps: added to the denominator (1e-6 by default, passed by the caller). fp16/bf16 inputs are computed in float32
and the output is returned in the input dtype.

Lowering (Triton): chunks of rows; per chunk its own state, an exclusive scan over chunks (the total, when
bidirectional), then per chunk the outputs from the scanned state plus, when causal, the masked products within
the chunk. O(n d F) work, O(n d F / chunk) memory for the states, never the n x n matrix. The backward pass is
the same three steps with a reverse scan for the key gradients. Kernels (CONFIG_OVERRIDE names): linear_state,
linear_scan, linear_fwd, linear_bwd_state, linear_bwd_scan, linear_bwd_dq, linear_bwd_dkdv.
The CPU path ("torch") runs the same chunked math in plain torch, differentiated by autograd.
Decoding: linear_init_state / linear_step update (S, z, M) one token at a time.
"""

import inspect
import math
from typing import NamedTuple

import torch

from ..shared.heads import assemble_heads, empty_batch_output, heads_of, per_q_head
from ..shared.launch import (
    AOT_DTYPES,
    CONFIG_OVERRIDE,
    TRITON_HEAD_DIMS,
    aot_configs,
    aot_signature,
    check_backend,
    check_one_shape,
    check_triton_inputs,
    launch_kernel,
    uses_triton,
)
from .cpu import linear_attention_torch, linear_phi

try:
    import triton

    from .kernels import (
        linear_bwd_dkdv_kernel,
        linear_bwd_dq_kernel,
        linear_fwd_kernel,
        linear_scan_kernel,
        linear_state_kernel,
    )
except ImportError:  # the CPU path needs only torch
    triton = None

LINEAR_FEATURE_MAPS = ("elu1", "relu", "favor")


def linear_favor_projection(num_heads, features, head_dim, seed):
    """FAVOR+ projection (num_heads, features, head_dim), float32 on the CPU, a function of `seed` only.

    Per head, blocks of head_dim orthogonal rows (QR of a Gaussian matrix, signs fixed so each block is
    Haar-distributed), stacked and cut to `features` rows, each row rescaled to the norm of a Gaussian vector
    (chi-distributed with head_dim degrees of freedom), as the Performer's orthogonal random features.
    """
    generator = torch.Generator().manual_seed(int(seed))
    heads = []
    for _ in range(num_heads):
        blocks = []
        for _ in range(-(-features // head_dim)):
            gaussian = torch.randn(head_dim, head_dim, generator=generator, dtype=torch.float64)
            orthogonal, upper = torch.linalg.qr(gaussian)
            blocks.append((orthogonal * torch.sign(torch.diagonal(upper))).T)
        rows = torch.cat(blocks)[:features]
        norms = torch.randn(features, head_dim, generator=generator, dtype=torch.float64).norm(dim=1)
        heads.append(rows * norms[:, None])
    return torch.stack(heads).to(torch.float32)


def linear_feature_dim(feature_map, head_dim, features=None):
    """The dimension of phi(x): head_dim for elu1 and relu, `features` for favor."""
    if feature_map not in LINEAR_FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {LINEAR_FEATURE_MAPS}, got {feature_map!r}")
    if feature_map == "favor":
        if not features or features < 1:
            raise ValueError(f"feature_map 'favor' needs a positive number of features, got {features!r}")
        return int(features)
    return int(head_dim)


# Triton launchers ----------------------------------------------------------------------------------------------

# The chunk: BLOCK_M of every kernel but the scans, one per call (the states are stored per chunk). Intra-chunk
# products cost n x chunk per row, states n / chunk x F x d; the backward kernels hold about ten [chunk, width]
# tiles, which bounds the chunk: 32 rows for 16-bit inputs with F <= head_dim <= 64, 16 otherwise (fp32, wider
# rows, or favor with more features than head_dim, whose backward kernels spill at 32).
_LINEAR_WIDE_CHUNK = 32
_LINEAR_CHUNK = 16
# Per kernel, (BLOCK_N, num_warps, num_stages) tried in order with that chunk (none with num_stages=1, which
# Triton's pipeliner cannot build for the scan's loop). BLOCK_N is a block of value columns: the state and forward
# kernels split the columns over programs, dq and dk/dv walk them in a loop. The scans' BLOCK_M is their feature
# block, min(64, F). Chosen with ptxas (sm_80 and sm_90) over every variant: tests/test_linear.py checks them.
_LINEAR_CHAINS = {
    "linear_state": [(128, 8, 2), (64, 8, 2), (32, 8, 2), (16, 8, 2)],
    "linear_scan": [(64, 4, 2), (32, 4, 2)],
    "linear_fwd": [(64, 8, 2), (32, 8, 2), (16, 8, 2)],
    "linear_bwd_state": [(128, 8, 2), (64, 8, 2), (32, 8, 2), (16, 8, 2)],
    "linear_bwd_scan": [(64, 4, 2), (32, 4, 2)],
    "linear_bwd_dq": [(32, 8, 2), (64, 8, 2), (16, 8, 2), (32, 4, 2)],
    "linear_bwd_dkdv": [(32, 8, 2), (64, 8, 2), (16, 8, 2), (32, 4, 2)],
}
_LINEAR_KERNELS = tuple(_LINEAR_CHAINS)
_LINEAR_SCANS = ("linear_scan", "linear_bwd_scan")


def linear_chunk(dtype, head_dim, feature_dim=None):
    """The rows per chunk of the Triton kernels (see _LINEAR_WIDE_CHUNK), or the BLOCK_M of CONFIG_OVERRIDE's
    chunked kernels (which must agree: the states are stored per chunk)."""
    overridden = {CONFIG_OVERRIDE[name][0] for name in _LINEAR_KERNELS
                  if name in CONFIG_OVERRIDE and name not in _LINEAR_SCANS}
    if len(overridden) > 1:
        raise ValueError(f"CONFIG_OVERRIDE gives the linear-attention kernels different chunks (BLOCK_M) "
                         f"{sorted(overridden)}: they share one")
    if overridden:
        return overridden.pop()
    feats = feature_dim or head_dim
    return _LINEAR_WIDE_CHUNK if dtype != torch.float32 and feats <= head_dim <= 64 else _LINEAR_CHUNK


def linear_config_chain(kernel, dtype, head_dim, feature_dim=None, causal=False):
    """The configs (BLOCK_M, BLOCK_N, num_warps, num_stages) of a kernel, in the order `launch_kernel` (and
    ahead-of-time compilation) tries them: the first that compiles without register spills is used.
    CONFIG_OVERRIDE[kernel] replaces the chain. `causal` is part of the signature for chains that may differ by
    it; today they do not."""
    if kernel in CONFIG_OVERRIDE:
        return [CONFIG_OVERRIDE[kernel]]
    feats = feature_dim or head_dim
    rows = min(64, feats) if kernel in _LINEAR_SCANS else linear_chunk(dtype, head_dim, feats)
    chain = []
    for block_n, warps, stages in _LINEAR_CHAINS[kernel]:
        config = (rows, min(block_n, head_dim), warps, stages)
        if config not in chain:
            chain.append(config)
    return chain


def _linear_variant(kernel, feature_map, feature_dim, causal):
    # launch_kernel caches the spill-free config per name: each constexpr variant gets its own entry.
    return f"{kernel}[{feature_map},F={feature_dim},{'causal' if causal else 'full'}]"


def _linear_launcher(q, feature_map, feature_dim, causal):
    """run(name, kernel, grid, args, constexprs): one kernel of this call, with its config chain."""
    def run(name, kernel, grid, args, constexprs):
        chain = linear_config_chain(name, q.dtype, q.shape[-1], feature_dim, causal)
        launch_kernel(_linear_variant(name, feature_map, feature_dim, causal), kernel, grid, args, constexprs, q, chain)
    return run


def _linear_scanned_states(run, x, y, w, den, delta, mx, eps, scales, constexprs, causal, backward):
    """Steps 1 and 2 of a pass: each chunk's own state (linear_state_kernel), then the scan. Returns (S, z, e):
    (batch, heads, chunks, F, d), (..., F) and (batch, heads, chunks), the state each chunk's rows see (slot 0:
    the total, when not causal). Forward: x, y = k, v. Backward: x, y = q, dO, with den, delta and mx."""
    batch, heads, n, dim = x.shape
    feats = constexprs["FEATURE_DIM"]
    chunk = linear_chunk(x.dtype, dim, feats)
    chunks = triton.cdiv(n, chunk)
    if chunks > 65535:  # CUDA's limit on the grid's second dimension, which indexes the chunks
        raise ValueError(f"the Triton kernels take at most 65535 chunks of {chunk} rows ({65535 * chunk} "
                         f"positions for {x.dtype} at head_dim {dim}), got n = {n}")
    f32 = dict(device=x.device, dtype=torch.float32)
    states = torch.empty(batch, heads, chunks, feats, dim, **f32)
    own_z, own_e = torch.empty(batch, heads, chunks, feats, **f32), torch.empty(batch, heads, chunks, **f32)
    seen_z, seen_e = torch.empty_like(own_z), torch.empty_like(own_e)
    prefix = "linear_bwd" if backward else "linear"
    run(f"{prefix}_state", linear_state_kernel, lambda bm, bn: (batch * heads, chunks, dim // bn),
        (x, y, w, den, delta, mx, states, own_z, own_e, n, heads, eps, *scales), dict(constexprs, BACKWARD=backward))
    run(f"{prefix}_scan", linear_scan_kernel, lambda bm, bn: (batch * heads, feats // bm, dim // bn),
        (states, own_z, own_e, seen_z, seen_e, chunks),
        dict(HEAD_DIM=dim, FEATURE_DIM=feats, FAVOR=constexprs["FEATURE"] == "favor", REVERSE=backward,
             TOTAL=not causal))
    return states, seen_z, seen_e


def _linear_dot_precision(dtype, feature_map, head_dim):
    # fp32 inputs: exact IEEE products, except favor at head_dim 128, whose IEEE tiles (a whole reduction
    # dimension per thread) spill in the causal backward kernels: 3xTF32 there (tensor-core products with
    # fp32-level error, ~2^-22 relative). 16-bit inputs: TF32 for the float32 operands left (favor's projection),
    # below the inputs' own rounding. Measured with ptxas over every variant (tests/test_linear.py).
    if dtype != torch.float32:
        return "tf32"
    return "tf32x3" if feature_map == "favor" and head_dim >= 128 else "ieee"


def _linear_setup(q, w, feature_map):
    dim = q.shape[-1]
    feats = w.shape[1] if feature_map == "favor" else dim
    constexprs = dict(HEAD_DIM=dim, FEATURE_DIM=feats, FEATURE=feature_map,
                      DOT_PRECISION=_linear_dot_precision(q.dtype, feature_map, dim))
    return feats, (dim ** -0.25, feats ** -0.5), constexprs


def _linear_triton_fwd(q, k, v, w, feature_map, eps, causal):
    batch, heads, n, dim = q.shape
    feats, scales, constexprs = _linear_setup(q, w, feature_map)
    run = _linear_launcher(q, feature_map, feats, causal)
    f32 = dict(device=q.device, dtype=torch.float32)
    o = torch.empty_like(q)
    den = torch.empty(batch, heads, n, **f32)
    mx = torch.empty(batch, heads, n, **f32) if feature_map == "favor" else torch.empty(1, **f32)
    state = _linear_scanned_states(run, k, v, w, den, den, mx, eps, scales, constexprs, causal, backward=False)
    run("linear_fwd", linear_fwd_kernel, lambda bm, bn: (batch * heads, triton.cdiv(n, bm), dim // bn),
        (q, k, v, w, o, den, mx, *state, n, heads, eps, *scales), dict(constexprs, CAUSAL=causal))
    return o, den, mx


def _linear_triton_bwd(q, k, v, w, o, den, mx, do, feature_map, eps, causal):
    batch, heads, n, dim = q.shape
    feats, scales, constexprs = _linear_setup(q, w, feature_map)
    run = _linear_launcher(q, feature_map, feats, causal)
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1)  # [batch, heads, n]: dO_i . O_i, the denominator's gradient term
    # The forward states are recomputed, not saved: n / chunk x F x d floats per head would outweigh q, k and v
    # (4 n d at chunk 16, F = d = 64), while recomputing costs one state kernel and one scan.
    state = _linear_scanned_states(run, k, v, w, den, den, mx, eps, scales, constexprs, causal, backward=False)
    reverse = _linear_scanned_states(run, q, do, w, den, delta, mx, eps, scales, constexprs, causal, backward=True)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def grid(bm, bn):  # one program per chunk: each walks the value columns BLOCK_N at a time
        return batch * heads, triton.cdiv(n, bm)

    constexprs = dict(constexprs, CAUSAL=causal)
    run("linear_bwd_dq", linear_bwd_dq_kernel, grid,
        (q, k, v, w, do, den, delta, mx, dq, *state, n, heads, eps, *scales), constexprs)
    run("linear_bwd_dkdv", linear_bwd_dkdv_kernel, grid,
        (q, k, v, w, do, den, delta, mx, dk, dv, *reverse, n, heads, eps, *scales), constexprs)
    return dq, dk, dv


class _LinearTritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, w, feature_map, eps, causal):
        o, den, mx = _linear_triton_fwd(q, k, v, w, feature_map, eps, causal)
        # O(n d) saved: the inputs, the output and two floats per row (den; favor's M).
        ctx.save_for_backward(q, k, v, w, o, den, mx)
        ctx.options = (feature_map, eps, causal)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, w, o, den, mx = ctx.saved_tensors
        dq, dk, dv = _linear_triton_bwd(q, k, v, w, o, den, mx, do, *ctx.options)
        return dq, dk, dv, None, None, None, None


def _linear_check(q, k, v, feature_map, eps, causal, projection, backend):
    check_backend(backend)
    if feature_map not in LINEAR_FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {LINEAR_FEATURE_MAPS}, got {feature_map!r}")
    check_one_shape(q=q, k=k, v=v)
    if not isinstance(causal, bool):
        raise ValueError(f"causal must be True or False, got {causal!r}")
    if not isinstance(eps, (int, float)) or not eps >= 0 or math.isinf(eps):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if feature_map == "favor":
        expected = (q.shape[1], "features", q.shape[3])
        if not isinstance(projection, torch.Tensor) or projection.dim() != 3 \
                or projection.shape[0] != q.shape[1] or projection.shape[2] != q.shape[3]:
            got = tuple(projection.shape) if isinstance(projection, torch.Tensor) else projection
            raise ValueError(f"feature_map 'favor' needs a projection of shape {expected} "
                             f"(heads={q.shape[1]}, head_dim={q.shape[3]}), got {got}")
    elif projection is not None:
        raise ValueError(f"a projection is only used by feature_map 'favor', got one for {feature_map!r}")
    if uses_triton(q, backend):
        check_triton_inputs(q, TRITON_HEAD_DIMS)
        if feature_map == "favor":
            feats = projection.shape[1]
            if feats < 16 or feats > 256 or feats & (feats - 1):
                raise ValueError(f"the Triton kernels take favor features that are a power of two in [16, 256], "
                                 f"got {feats}")


def linear_attention(q, k, v, feature_map, eps, causal, projection=None, backend="auto"):
    """Linear attention of one kernel head family: out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps).

    q, k, v: (batch, heads, n, head_dim), the same heads (expand grouped-query heads first). feature_map: "elu1",
    "relu" or "favor"; projection: (heads, features, head_dim) for "favor" (linear_favor_projection), else None.
    backend: "triton" (the kernels: CUDA, or CPU under TRITON_INTERPRET=1), "torch" (the CPU path) or "auto"
    (triton on CUDA, torch otherwise). Returns (batch, heads, n, head_dim) in q's dtype.

        w = linear_favor_projection(8, 64, 64, seed=0)
        out = linear_attention(q, k, v, "favor", 1e-6, causal=True, projection=w)
    """
    _linear_check(q, k, v, feature_map, eps, causal, projection, backend)
    if q.shape[0] == 0:
        return empty_batch_output(q, k, v)
    if uses_triton(q, backend):
        q, k, v = (x.contiguous() for x in (q, k, v))
        if feature_map == "favor":
            w = projection.to(device=q.device, dtype=torch.float32).contiguous()
        else:
            w = torch.empty(1, device=q.device, dtype=torch.float32)
        return _LinearTritonAttention.apply(q, k, v, w, feature_map, float(eps), causal)
    if projection is not None:
        projection = projection.to(q.device)
    return linear_attention_torch(q, k, v, feature_map, float(eps), causal, projection)


def linear_init_state(batch, heads, feature_dim, head_dim, device, dtype=torch.float32):
    """The empty decoding state (S, z, m): S (batch, heads, feature_dim, head_dim), z (batch, heads, feature_dim)
    and m (batch, heads), favor's reference maximum (-inf: no key yet; unused by elu1 and relu)."""
    return (torch.zeros(batch, heads, feature_dim, head_dim, device=device, dtype=dtype),
            torch.zeros(batch, heads, feature_dim, device=device, dtype=dtype),
            torch.full((batch, heads), float("-inf"), device=device, dtype=dtype))


def linear_step(q_t, k_t, v_t, state, feature_map, eps, projection=None):
    """One causal decoding step in O(1): q_t, k_t, v_t (batch, heads, head_dim) -> (out_t, state), out_t in q_t's
    dtype; equals position t of linear_attention(..., causal=True) over the tokens seen so far."""
    s, z, m = state
    _linear_check(q_t[:, :, None], k_t[:, :, None], v_t[:, :, None], feature_map, eps, True, projection, "torch")
    compute = s.dtype
    if projection is not None:
        projection = projection.to(q_t.device)
    phi_q, _ = linear_phi(q_t[:, :, None].to(compute), feature_map, projection)
    phi_k, r = linear_phi(k_t[:, :, None].to(compute), feature_map, projection)
    if r is None:  # elu1, relu: no rescaling (the reference maximum is 0 once a key is seen, and S, z start at 0)
        m_new, phi_k = m.clamp(min=0), phi_k[:, :, 0]
        s = s + phi_k[..., :, None] * v_t.to(compute)[..., None, :]
        z = z + phi_k
    else:
        m_new = torch.maximum(m, r[..., 0])
        old, new = torch.exp(m - m_new), torch.exp(r[..., 0] - m_new)
        phi_k = phi_k[:, :, 0] * new[..., None]  # [batch, heads, F]
        s = s * old[..., None, None] + phi_k[..., :, None] * v_t.to(compute)[..., None, :]
        z = z * old[..., None] + phi_k
    phi_q = phi_q[:, :, 0]
    num = torch.matmul(phi_q[..., None, :], s)[..., 0, :]
    den = (phi_q * z).sum(-1, keepdim=True)
    return (num / (den + eps)).to(q_t.dtype), (s, z, m_new)


def linear_prefill_state(k, v, feature_map, projection=None, dtype=torch.float32):
    """The decoding state (S, z, m) after keys k and values v (batch, heads, p, head_dim) of a prompt, in closed
    form (two matrix products, not p steps): what p calls of linear_step from linear_init_state give."""
    batch, heads, length, _ = k.shape
    if projection is not None:
        projection = projection.to(k.device)
    phi_k, r = linear_phi(k.to(dtype), feature_map, projection)
    if r is None:  # elu1, relu: linear_step's reference maximum is 0 once a key is seen
        r = torch.zeros(batch, heads, length, device=k.device, dtype=dtype)
    m = r.max(dim=-1).values if length else torch.full((batch, heads), float("-inf"), device=k.device, dtype=dtype)
    weights = torch.exp(r - m[..., None])[..., None] if length else r[..., None]
    phi_k = phi_k * weights  # [batch, heads, p, F]
    return torch.matmul(phi_k.transpose(-1, -2), v.to(dtype)), phi_k.sum(dim=2), m


def linear_aot_specs(dtype="fp16", head_dim=64, feature_maps=LINEAR_FEATURE_MAPS, causal=(True, False),
                     features=64, kernels=None):
    """For every kernel variant: (name, kernel, signature, [(constexprs, options) per config of its chain]), as
    `patterncc.aot`: the name is "<kernel>[<feature map>,F=<features>,causal|full]"; both passes' state and scan
    kernels, linear_fwd, linear_bwd_dq and linear_bwd_dkdv, for causal and bidirectional heads."""
    torch_dtype = AOT_DTYPES[dtype]
    # Every pointer but the inputs and their gradients holds float32 (features, states, row statistics).
    inputs = ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "X", "Y")
    # `kernels` maps kernel function names to the kernels to compile (default: this module's).
    functions = kernels or {"linear_state_kernel": linear_state_kernel, "linear_scan_kernel": linear_scan_kernel,
                            "linear_fwd_kernel": linear_fwd_kernel, "linear_bwd_dq_kernel": linear_bwd_dq_kernel,
                            "linear_bwd_dkdv_kernel": linear_bwd_dkdv_kernel}
    kernels = {"linear_state": functions["linear_state_kernel"], "linear_scan": functions["linear_scan_kernel"],
               "linear_fwd": functions["linear_fwd_kernel"], "linear_bwd_state": functions["linear_state_kernel"],
               "linear_bwd_scan": functions["linear_scan_kernel"], "linear_bwd_dq": functions["linear_bwd_dq_kernel"],
               "linear_bwd_dkdv": functions["linear_bwd_dkdv_kernel"]}
    out = []
    for feature_map in feature_maps:
        feats = linear_feature_dim(feature_map, head_dim, features)
        for is_causal in causal:
            for name, kernel in kernels.items():
                if name in _LINEAR_SCANS:
                    flags = dict(HEAD_DIM=head_dim, FEATURE_DIM=feats, FAVOR=feature_map == "favor",
                                 REVERSE=name == "linear_bwd_scan", TOTAL=not is_causal)
                else:
                    flags = dict(HEAD_DIM=head_dim, FEATURE_DIM=feats, FEATURE=feature_map,
                                 DOT_PRECISION=_linear_dot_precision(torch_dtype, feature_map, head_dim))
                    if name.endswith("_state"):
                        flags["BACKWARD"] = name == "linear_bwd_state"
                    else:
                        flags["CAUSAL"] = is_causal
                pointers = {name: "*fp32" for name in inspect.signature(kernel.fn).parameters
                            if name.isupper() and name not in inputs}
                signature = aot_signature(kernel, dtype, pointers,
                                          floats=("eps", "data_scale", "feature_scale"))
                chain = linear_config_chain(name, torch_dtype, head_dim, feats, is_causal)
                out.append((_linear_variant(name, feature_map, feats, is_causal), kernel, signature,
                            aot_configs(chain, flags)))
    return out


class LinearCall(NamedTuple):
    """Pattern heads of one kernel group with equal parameters: one `linear_attention` call."""

    buffer: str  # the module attribute holding its FAVOR+ projection (favor only)
    heads: tuple  # pattern heads
    draws: tuple  # favor: per head (seed, h), row h of linear_favor_projection(count, ..., seed)
    count: int  # heads in the declared group
    feature_map: str
    features: int | None
    eps: float


def linear_call_buffer(call, head_dim):
    """The FAVOR+ projections of a call's heads (heads, features, head_dim), from their seeds."""
    seeds = {seed for seed, _ in call.draws}
    drawn = {seed: linear_favor_projection(call.count, call.features, head_dim, seed) for seed in seeds}
    return torch.stack([drawn[seed][h] for seed, h in call.draws])


def linear_heads_attention(q, k, v, calls, buffers, num_heads, causal, backend):
    """[(pattern heads, output)] for each kernel call of a module with `num_heads` pattern heads."""
    pieces = []
    for call in calls:
        q_part, k_part, v_part = heads_of(q, k, v, call.heads, num_heads, expand_kv=True)
        projection = per_q_head(buffers[call.buffer], q, num_heads) if call.feature_map == "favor" else None
        pieces.append((call.heads, linear_attention(q_part, k_part, v_part, call.feature_map, call.eps, causal,
                                                    projection, backend)))
    return pieces


def linear_heads_init_state(calls, batch, heads, head_dim, num_heads, device, dtype):
    """The decoding state of every kernel call before the first token."""
    repeat = heads // num_heads
    return [linear_init_state(batch, len(call.heads) * repeat, linear_feature_dim(call.feature_map, head_dim,
                                                                                  call.features),
                              head_dim, device, dtype) for call in calls]


def linear_heads_step(q_t, k_t, v_t, state, calls, buffers, num_heads):
    """One decoding step of every kernel call: (out_t, new state), as the causal forward at that position."""
    pieces, new_state = linear_heads_step_pieces(q_t, k_t, v_t, state, calls, buffers, num_heads)
    return assemble_heads(pieces, q_t.unsqueeze(2), num_heads).squeeze(2), new_state


def linear_heads_step_pieces(q_t, k_t, v_t, state, calls, buffers, num_heads):
    """One decoding step of every kernel call: ([(pattern heads, out_t (batch, heads, 1, head_dim))], new
    state), for modules that assemble them with other families' heads."""
    q, k, v = (x.unsqueeze(2) for x in (q_t, k_t, v_t))
    pieces, new_state = [], []
    for call, call_state in zip(calls, state):
        q_part, k_part, v_part = (x.squeeze(2) for x in heads_of(q, k, v, call.heads, num_heads, expand_kv=True))
        projection = per_q_head(buffers[call.buffer], q, num_heads) if call.feature_map == "favor" else None
        out_part, call_state = linear_step(q_part, k_part, v_part, call_state, call.feature_map, call.eps, projection)
        pieces.append((call.heads, out_part.unsqueeze(2)))
        new_state.append(call_state)
    return pieces, new_state


def linear_heads_prefill_state(q, k, v, calls, buffers, num_heads, dtype=torch.float32):
    """The decoding state of every kernel call after a prompt (batch, heads, p, head_dim), in closed form."""
    states = []
    for call in calls:
        _, k_part, v_part = heads_of(q, k, v, call.heads, num_heads, expand_kv=True)
        projection = per_q_head(buffers[call.buffer], q, num_heads) if call.feature_map == "favor" else None
        states.append(linear_prefill_state(k_part, v_part, call.feature_map, projection, dtype))
    return states

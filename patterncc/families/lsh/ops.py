"""Reformer LSH attention (hashed heads): hashing, sorting, launchers, autograd, CPU path --------------------------

Semantics (docs/hashed-heads.md says the same for users). Inputs q, k, v: (B, H, n, D); rotations:
(H, R, D, buckets // 2) float32, one per head and round; chunk c; causal; shared_qk; scale (default 1/sqrt(D)).
- Hash, per round r, in float32 whatever the input dtype: bucket(x) = argmax([x R_r ; -x R_r]). shared_qk:
  the keys are the unit-normalized queries (k = F.normalize(q); the k argument is ignored) and both sides get
  bucket(q); otherwise queries are hashed from q and keys from k with the same rotation.
- Sort, per round: queries by (bucket, position) and keys by (bucket, position), i.e. torch.argsort of
  bucket * n + position. Each sorted order is split into chunks of c slots (the last may be shorter). A query
  in chunk t attends the keys in chunks t and t - 1 (chunk 0 has no previous chunk: no wrap-around) that have
  its bucket, and with causal only keys j <= i (original positions).
- Self rule (shared_qk only): j == i is excluded from every round's window, unless i has no other allowed key
  in any round: then its output is v_i (weight 1 on itself; gradient to v_i only). shared_qk = false has no
  self rule: a row with no allowed key outputs 0 (gradient 0).
- Duplicates: count_ij = the number of rounds whose window holds j for i (same bucket and chunk rule in that
  round). Round r scores s_ij - log(count_ij) and gives out_r, lse_r; the result is sum_r exp(lse_r - LSE) out_r
  with LSE = logsumexp_r lse_r: exactly softmax attention over the union of all rounds' windows.
- Attention dropout (optional): pair (i, j) of batch b and head h is kept by the Philox decision of
  patterncc/families/shared/dropout.py at counter ((b * H + h) * n + i) * n + j, the same in every round, and
  kept probabilities are scaled by 1 / (1 - p): dropout of the final attention weights (the LSE is unchanged).
  The self rule's fallback weight on v_i is dropped by pair (i, i).
- Scores and softmax in float32 (float64 inputs: float64 on the CPU path). Buckets are not differentiable;
  gradients flow through the attention to q, k, v (with shared_qk, through F.normalize into q).
Memory beyond q, k, v: O(n * R) int32 (permutations, their inverses, buckets, window codes) and O(n * R * D)
float32 per-round outputs; never an n x n tensor (the CPU path holds O(n * c * R) scores).
"""

from typing import NamedTuple

import torch

from ..shared.dropout import dropout_kernel_args
from ..shared.heads import attention_scale, empty_batch_output, heads_of, per_q_head
from ..shared.launch import (
    AOT_DTYPES,
    TRITON_HEAD_DIMS,
    aot_configs,
    aot_signature,
    check_backend,
    check_one_shape,
    check_triton_inputs,
    config_chain,
    dot_precision,
    launch_kernel,
    uses_triton,
)
from .cpu import lsh_attention_torch, lsh_self_values

try:
    import triton

    from .kernels import lsh_bwd_dkdv_kernel, lsh_bwd_dq_kernel, lsh_fwd_kernel
except ImportError:  # the CPU path needs only torch
    triton = None

_LSH_LOG2E = 1.4426950408889634

# Default tile sizes and warps per (kernel, 16-bit?, head_dim): (BLOCK_M, BLOCK_N, num_warps, num_stages), each
# spill-free on both sm_80 and sm_90 (tests/test_lsh.py compiles them ahead of time and reads ptxas's report;
# ptxas is not monotone in tile size, hence one entry per head_dim; checked with the heaviest and the lightest
# predicate). fp32 uses exact IEEE products (no tensor cores), so its tiles are small.
_LSH_DEFAULTS = {
    ("lsh_fwd", True, 16): (64, 32, 4, 2), ("lsh_fwd", True, 32): (64, 32, 4, 2),
    ("lsh_fwd", True, 64): (64, 32, 4, 2), ("lsh_fwd", True, 128): (32, 32, 8, 2),
    ("lsh_dkdv", True, 16): (32, 32, 4, 2), ("lsh_dkdv", True, 32): (32, 32, 8, 2),
    ("lsh_dkdv", True, 64): (32, 32, 4, 2), ("lsh_dkdv", True, 128): (16, 32, 8, 2),
    ("lsh_dq", True, 16): (64, 32, 4, 2), ("lsh_dq", True, 32): (64, 32, 4, 2),
    ("lsh_dq", True, 64): (32, 32, 4, 2), ("lsh_dq", True, 128): (32, 32, 8, 2),
    ("lsh_fwd", False, 16): (32, 32, 8, 2), ("lsh_fwd", False, 32): (32, 32, 8, 2),
    ("lsh_fwd", False, 64): (16, 32, 4, 2), ("lsh_fwd", False, 128): (32, 16, 8, 2),
    ("lsh_dkdv", False, 16): (16, 32, 4, 2), ("lsh_dkdv", False, 32): (16, 32, 4, 2),
    ("lsh_dkdv", False, 64): (16, 32, 4, 2), ("lsh_dkdv", False, 128): (16, 16, 8, 2),
    ("lsh_dq", False, 16): (16, 32, 4, 2), ("lsh_dq", False, 32): (16, 32, 4, 2),
    ("lsh_dq", False, 64): (16, 32, 8, 2), ("lsh_dq", False, 128): (16, 16, 4, 2),
}
# Tried on CUDA besides the spill-free default, once per shape (bounded autotuning in `launch_kernel`).
_LSH_CANDIDATES = [(64, 64, 4, 3), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2)]


def lsh_config_chain(kernel, dtype, head_dim):
    """The configs of kernel "lsh_fwd", "lsh_dkdv" or "lsh_dq" to try in order: the first that compiles without
    register spills is used (on CUDA by `launch_kernel`, ahead of time by `patterncc compile --target`)."""
    tabled = next((d for d in TRITON_HEAD_DIMS if d >= head_dim), TRITON_HEAD_DIMS[-1])
    return config_chain(kernel, _LSH_DEFAULTS[(kernel, dtype != torch.float32, tabled)])


def lsh_rotations(num_heads, rounds, head_dim, buckets, seed):
    """Random rotations (num_heads, rounds, head_dim, buckets // 2), float32 on the CPU: standard normal from
    torch.Generator().manual_seed(seed), so one seed gives one tensor on every machine."""
    if buckets < 2 or buckets % 2:
        raise ValueError(f"buckets must be an even number >= 2, got {buckets}")
    for name, value in (("num_heads", num_heads), ("rounds", rounds), ("head_dim", head_dim)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((num_heads, rounds, head_dim, buckets // 2), generator=generator, dtype=torch.float32)


def _lsh_buckets(x, rotations):
    """bucket = argmax([x R ; -x R]) per (batch, head, round, position), int64 (B, H, R, n), in float32."""
    proj = torch.einsum("bhnd,hrdk->bhrnk", x.float(), rotations.to(device=x.device, dtype=torch.float32))
    # argmax over [p, -p] without materialising the concatenation: the first maximum of p wins ties with -p's,
    # as argmax's first-maximum rule does on the concatenation.
    top, top_index = proj.max(dim=-1)
    bottom, bottom_index = proj.min(dim=-1)
    return torch.where(top >= -bottom, top_index, bottom_index + proj.shape[-1])


def _lsh_sort(buckets, chunk):
    """For buckets (B, H, R, n): (slot -> position, position -> slot, window code per position), int32.

    code = bucket * (num_chunks + 2) + slot // chunk, so (i, j) share a bucket and j's chunk is i's or the one
    before iff code_i - code_j is 0 or 1."""
    n = buckets.shape[-1]
    positions = torch.arange(n, device=buckets.device)
    perm = torch.argsort(buckets * n + positions, dim=-1)
    inverse = torch.empty_like(perm).scatter_(-1, perm, positions.expand_as(perm))
    num_chunks = -(-n // chunk)
    code = buckets * (num_chunks + 2) + inverse // chunk
    return perm.to(torch.int32), inverse.to(torch.int32), code.to(torch.int32)


def _lsh_plan(q, k, rotations, chunk, shared_qk):
    """Buckets, sort permutations, inverses and window codes of queries and keys, int32 (B, H, R, n) each."""
    bucket_q = _lsh_buckets(q, rotations)
    perm_q, inverse_q, code_q = _lsh_sort(bucket_q, chunk)
    if shared_qk:
        return {"bucket_q": bucket_q.to(torch.int32), "perm_q": perm_q, "inverse_q": inverse_q, "code_q": code_q,
                    "bucket_k": bucket_q.to(torch.int32), "perm_k": perm_q, "inverse_k": inverse_q, "code_k": code_q}
    bucket_k = _lsh_buckets(k, rotations)
    perm_k, inverse_k, code_k = _lsh_sort(bucket_k, chunk)
    return {"bucket_q": bucket_q.to(torch.int32), "perm_q": perm_q, "inverse_q": inverse_q, "code_q": code_q,
                "bucket_k": bucket_k.to(torch.int32), "perm_k": perm_k, "inverse_k": inverse_k, "code_k": code_k}


# Triton path -----------------------------------------------------------------------------------------------------


def _lsh_combine_log2(out_r, lse_r):
    """Rounds -> final: out_r (B, H, R, n, D) and lse_r (B, H, R, n) in the log2 domain (-inf: no key that round).
    Returns out (B, H, n, D) float32 and LSE (B, H, n), -inf for rows with no key in any round."""
    top = lse_r.amax(dim=2)
    has_keys = top > float("-inf")
    top_safe = torch.where(has_keys, top, torch.zeros_like(top))
    weights = torch.exp2(lse_r - top_safe[:, :, None])  # 0 for rounds without a key
    total = weights.sum(dim=2)
    total_safe = torch.where(has_keys, total, torch.ones_like(total))
    out = torch.einsum("bhrn,bhrnd->bhnd", weights, out_r) / total_safe[..., None]
    lse = torch.where(has_keys, top_safe + torch.log2(total_safe), torch.full_like(top, float("-inf")))
    return out, lse


def _lsh_constexprs(q, rounds, causal, shared_qk, dropout):
    return {"HEAD_DIM": q.shape[-1], "ROUNDS": rounds, "CAUSAL": bool(causal), "SHARED_QK": bool(shared_qk),
            "DOT_PRECISION": dot_precision(q.dtype), "DROPOUT": dropout is not None}


def _lsh_fwd(q, k, v, plan, chunk, causal, shared_qk, scale, dropout):
    batch, heads, n, dim = q.shape
    rounds = plan["perm_q"].shape[2]
    out_r = torch.empty(batch, heads, rounds, n, dim, device=q.device, dtype=torch.float32)
    lse_r = torch.empty(batch, heads, rounds, n, device=q.device, dtype=torch.float32)
    args = (q, k, v, out_r, lse_r, plan["perm_q"], plan["perm_k"], plan["code_q"], plan["code_k"],
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], n, heads, chunk, scale * _LSH_LOG2E,
            *dropout_kernel_args(dropout))
    launch_kernel("lsh_fwd", lsh_fwd_kernel, lambda bm, bn: (triton.cdiv(n, bm) * batch * heads * rounds,), args,
                  _lsh_constexprs(q, rounds, causal, shared_qk, dropout), q, lsh_config_chain("lsh_fwd", q.dtype, dim),
                  _LSH_CANDIDATES)
    return _lsh_combine_log2(out_r, lse_r)


def _lsh_bwd(q, k, v, out, lse, do, plan, chunk, causal, shared_qk, scale, dropout):
    batch, heads, n, dim = q.shape
    rounds = plan["perm_q"].shape[2]
    delta = (out.float() * do.float()).sum(-1)  # rowsum(dO * O) of the final output, [B, H, n]
    dq_r = torch.empty(batch, heads, rounds, n, dim, device=q.device, dtype=torch.float32)
    dk_r, dv_r = torch.empty_like(dq_r), torch.empty_like(dq_r)
    common = (plan["perm_q"], plan["perm_k"], plan["code_q"], plan["code_k"], *q.stride()[:3], *k.stride()[:3],
              *v.stride()[:3], *do.stride()[:3], n, heads, chunk, scale, scale * _LSH_LOG2E,
              *dropout_kernel_args(dropout))
    constexprs = _lsh_constexprs(q, rounds, causal, shared_qk, dropout)
    tiles = batch * heads * rounds
    launch_kernel("lsh_dkdv", lsh_bwd_dkdv_kernel, lambda bm, bn: (triton.cdiv(n, bn) * tiles,),
            (q, k, v, do, dk_r, dv_r, lse, delta, *common), constexprs, q,
            lsh_config_chain("lsh_dkdv", q.dtype, dim), _LSH_CANDIDATES)
    launch_kernel("lsh_dq", lsh_bwd_dq_kernel, lambda bm, bn: (triton.cdiv(n, bm) * tiles,),
            (q, k, v, do, dq_r, lse, delta, *common), constexprs, q, lsh_config_chain("lsh_dq", q.dtype, dim),
            _LSH_CANDIDATES)
    return dq_r.sum(2), dk_r.sum(2), dv_r.sum(2)


class _LshTritonAttention(torch.autograd.Function):
    """The attention core on the Triton kernels: q, k, v as given (with shared_qk, k = F.normalize(q) computed
    outside, so autograd carries dk into dq) and a precomputed plan of int32 permutations and window codes."""

    @staticmethod
    def forward(ctx, q, k, v, perm_q, perm_k, code_q, code_k, chunk, causal, shared_qk, scale, dropout):
        plan = {"perm_q": perm_q, "perm_k": perm_k, "code_q": code_q, "code_k": code_k}
        out, lse = _lsh_fwd(q, k, v, plan, chunk, causal, shared_qk, scale, dropout)
        has_keys = lse > float("-inf")
        if shared_qk:  # the self rule's fallback: v_i (times pair (i, i)'s dropout multiplier)
            out = torch.where(has_keys[..., None], out, lsh_self_values(v.float(), dropout))
        out = out.to(q.dtype)
        # +inf makes every exp2(s - LSE) of a row without keys 0 in the backward kernels.
        lse = torch.where(has_keys, lse, torch.full_like(lse, float("inf")))
        ctx.save_for_backward(q, k, v, out, lse, perm_q, perm_k, code_q, code_k)
        ctx.params = (chunk, causal, shared_qk, scale, dropout)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, perm_q, perm_k, code_q, code_k = ctx.saved_tensors
        chunk, causal, shared_qk, scale, dropout = ctx.params
        plan = {"perm_q": perm_q, "perm_k": perm_k, "code_q": code_q, "code_k": code_k}
        do = do.contiguous()
        dq, dk, dv = _lsh_bwd(q, k, v, out, lse, do, plan, chunk, causal, shared_qk, scale, dropout)
        if shared_qk:
            fallback = lsh_self_values(do.float(), dropout)  # the gradient of the self rule's v_i
            dv = dv + torch.where(torch.isinf(lse)[..., None], fallback, torch.zeros_like(dv))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *[None] * 9


# Public entry points ---------------------------------------------------------------------------------------------


def _lsh_check(q, k, v, rotations, chunk, shared_qk, backend):
    check_backend(backend)
    check_one_shape(**(dict(q=q, v=v) if shared_qk else dict(q=q, k=k, v=v)))
    _batch, heads, n, dim = q.shape
    if not isinstance(rotations, torch.Tensor) or rotations.dim() != 4:
        raise ValueError(f"rotations must be a 4-D tensor (heads, rounds, head_dim, buckets // 2), got "
                         f"{tuple(rotations.shape) if isinstance(rotations, torch.Tensor) else type(rotations)}")
    if rotations.shape[0] != heads or rotations.shape[2] != dim or rotations.shape[1] < 1 or rotations.shape[3] < 1:
        raise ValueError(f"rotations must have shape (heads={heads}, rounds, head_dim={dim}, buckets // 2), got "
                         f"{tuple(rotations.shape)}")
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    buckets = 2 * rotations.shape[3]
    if buckets * (-(-n // chunk) + 3) >= 2 ** 31:
        raise ValueError(f"buckets x (n / chunk) must stay below 2**31, got buckets={buckets}, n={n}, chunk={chunk}")
    if uses_triton(q, backend):
        check_triton_inputs(q, TRITON_HEAD_DIMS)


def lsh_attention(q, k, v, rotations, chunk, causal, shared_qk, scale=None, backend="auto", dropout=None):
    """Reformer LSH attention (the semantics are stated at the top of this section).

    q, k, v: (batch, heads, n, head_dim), one shape (k is ignored with shared_qk); rotations: (heads, rounds,
    head_dim, buckets // 2) from `lsh_rotations`; chunk: slots per chunk of the sorted order; scale defaults to
    1/sqrt(head_dim). backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (plain torch, any
    device) or "auto" (Triton on CUDA, torch otherwise). dropout: a Dropout (patterncc/families/shared/dropout.py)
    or None. Returns (batch, heads, n, head_dim) in q's dtype.

        rotations = lsh_rotations(8, 4, 64, 64, seed=1)
        out = lsh_attention(q, None, v, rotations, chunk=64, causal=True, shared_qk=True)
    """
    _lsh_check(q, k, v, rotations, chunk, shared_qk, backend)
    if q.shape[0] == 0:
        return empty_batch_output(q, q if shared_qk else k, v)
    scale = attention_scale(q, scale)
    with torch.no_grad():
        plan = _lsh_plan(q, k, rotations, chunk, shared_qk)
    if uses_triton(q, backend):
        q, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, v))
        # Normalised in float32: F.normalize's eps underflows in float16.
        k = torch.nn.functional.normalize(q.float(), dim=-1).to(q.dtype) if shared_qk else k
        k = k if k.stride(-1) == 1 else k.contiguous()
        return _LshTritonAttention.apply(q, k, v, plan["perm_q"], plan["perm_k"], plan["code_q"], plan["code_k"],
                                         chunk, bool(causal), bool(shared_qk), float(scale), dropout)
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    qc, vc = q.to(compute), v.to(compute)
    kc = torch.nn.functional.normalize(qc, dim=-1) if shared_qk else k.to(compute)
    out = lsh_attention_torch(qc, kc, vc, plan, chunk, bool(causal), bool(shared_qk), float(scale), dropout)
    return out.to(q.dtype)


def lsh_aot_specs(dtype="fp16", head_dim=64, rounds=4, causal=True, shared_qk=True, kernels=None, dropout=False):
    """For every LSH kernel: (name, kernel, signature, [(constexprs, options) per config of its chain]), as
    `patterncc.aot`. rounds, causal and shared_qk are constexprs of the kernels: pass the pattern's values.
    `kernels` maps names to the kernels to compile (default: this module's); dropout: the variant with attention
    dropout."""
    kernels = kernels or {"lsh_fwd": lsh_fwd_kernel, "lsh_dkdv": lsh_bwd_dkdv_kernel, "lsh_dq": lsh_bwd_dq_kernel}
    torch_dtype = AOT_DTYPES[dtype]
    pointers = dict(O="*fp32", LSE="*fp32", DK="*fp32", DV="*fp32", DQ="*fp32", DELTA="*fp32", PERM_Q="*i32",
                    PERM_K="*i32", CODE_Q="*i32", CODE_K="*i32")
    constexprs = dict(HEAD_DIM=head_dim, ROUNDS=rounds, CAUSAL=bool(causal), SHARED_QK=bool(shared_qk),
                      DOT_PRECISION=dot_precision(torch_dtype), DROPOUT=bool(dropout))
    return [(name, kernel, aot_signature(kernel, dtype, pointers, floats=("sm_scale", "sm_scale_log2", "dropout_scale"),
                                         int64s=("seed",)),
             aot_configs(lsh_config_chain(name, torch_dtype, head_dim), constexprs))
            for name, kernel in kernels.items()]


class LshCall(NamedTuple):
    """Pattern heads of one hashed group with equal parameters: one `lsh_attention` call."""

    buffer: str  # the module attribute holding its rotations
    heads: tuple  # pattern heads
    draws: tuple  # per head (seed, h): its rotation is row h of lsh_rotations(count, ..., seed)
    count: int  # heads in the declared group
    buckets: int
    rounds: int
    chunk: int
    shared_qk: bool


def lsh_call_buffer(call, head_dim):
    """The rotations of a call's heads (heads, rounds, head_dim, buckets // 2), from their seeds."""
    seeds = {seed for seed, _ in call.draws}
    drawn = {seed: lsh_rotations(call.count, call.rounds, head_dim, call.buckets, seed) for seed in seeds}
    return torch.stack([drawn[seed][h] for seed, h in call.draws])


def lsh_heads_attention(q, k, v, calls, buffers, num_heads, causal, scale, backend, dropout=None):
    """[(pattern heads, output)] for each hashed call of a module with `num_heads` pattern heads. dropout: the
    module call's Dropout or None; hashed call c draws from its stream c + 1 (the set heads' is 0)."""
    pieces = []
    for index, call in enumerate(calls):
        q_part, k_part, v_part = heads_of(q, k, v, call.heads, num_heads, expand_kv=True)
        rotations = per_q_head(buffers[call.buffer], q, num_heads)
        pieces.append((call.heads, lsh_attention(q_part, k_part, v_part, rotations, call.chunk, causal,
                                                 call.shared_qk, scale, backend,
                                                 dropout.stream(index + 1) if dropout is not None else None)))
    return pieces

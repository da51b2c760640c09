"""Set heads: launchers, autograd and the public entry point of the block-sparse kernels.

`blocksparse_attention(q, k, v, masks, scale, backend)` runs the heads of a `BlockMasks` (a generated module's
pattern, or `dense_block_masks` of boolean masks) on the Triton kernels or the torch CPU path.
"""


import torch

from ..shared.dropout import dropout_kernel_args
from ..shared.heads import attention_scale, check_attention_inputs, empty_batch_output
from ..shared.launch import (
    AOT_DTYPES,
    TRITON_HEAD_DIMS,
    aot_configs,
    aot_signature,
    config_chain,
    dot_precision,
    launch_kernel,
    uses_triton,
)
from .cpu import blocksparse_attention_torch, blocksparse_torch_backward, combine_parts

try:
    import triton

    from .kernels import blocksparse_bwd_dkdv_kernel, blocksparse_bwd_dq_kernel, blocksparse_fwd_kernel
except ImportError:  # the CPU path needs only torch
    triton = None

_LOG2E = 1.4426950408889634

# Default tile sizes and warps per (kernel, 16-bit?, head_dim <= 64?): (BLOCK_M, BLOCK_N, num_warps, num_stages),
# spill-free on sm_80 and sm_90 with register headroom for the pattern's predicate (tests/test_aot.py checks every
# example). Kernel tiles subdivide the layout's block, so they never exceed it.
_BLOCKSPARSE_DEFAULTS = {
    ("blocksparse_fwd", True, True): (64, 32, 8, 2), ("blocksparse_fwd", True, False): (32, 32, 8, 2),
    ("blocksparse_dq", True, True): (64, 32, 8, 2), ("blocksparse_dq", True, False): (16, 32, 8, 2),
    ("blocksparse_dkdv", True, True): (32, 32, 8, 2), ("blocksparse_dkdv", True, False): (16, 16, 4, 2),
    # fp32 uses exact IEEE products (not TF32): no tensor cores, and 16-row tiles to stay in registers.
    ("blocksparse_fwd", False, True): (16, 64, 8, 2), ("blocksparse_fwd", False, False): (16, 32, 8, 2),
    ("blocksparse_dq", False, True): (16, 64, 8, 2), ("blocksparse_dq", False, False): (16, 32, 8, 2),
    ("blocksparse_dkdv", False, True): (16, 64, 8, 2), ("blocksparse_dkdv", False, False): (16, 16, 8, 2),
}
# Tried on CUDA besides the spill-free default, once per shape: bounded autotuning.
_BLOCKSPARSE_CANDIDATES = [(64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 3), (32, 32, 4, 2)]


def blocksparse_config_chain(kernel, dtype, head_dim, block):
    """The configs of kernel "blocksparse_fwd", "blocksparse_dkdv" or "blocksparse_dq" to try in order: the first
    that compiles without register spills is used (on CUDA by `launch_kernel`, ahead of time by
    `patterncc compile --target`)."""
    block_m, block_n, warps, stages = _BLOCKSPARSE_DEFAULTS[(kernel, dtype != torch.float32, head_dim <= 64)]
    if head_dim <= 32 and dtype == torch.float32:
        warps = 4  # fp32's 16-row tiles over 8 warps leave ptxas too few registers per thread on sm_80
    return config_chain(kernel, (min(block_m, block), min(block_n, block), warps, stages), limit=block)


def _candidates(block):
    return [c for c in _BLOCKSPARSE_CANDIDATES if max(c[0], c[1]) <= block]


def _constexprs(masks, dtype, head_dim, dropout=None):
    return dict(HEAD_DIM=head_dim, PERMUTED=masks.permuted, DOT_PRECISION=dot_precision(dtype),
                LAYOUT_BLOCK=masks.block, DROPOUT=dropout is not None)


def _head_args(q, k, layout):
    num_q_heads = q.shape[1]
    return (q.shape[2], num_q_heads, num_q_heads // k.shape[1], num_q_heads // len(layout.masks.head_masks))


def blocksparse_fwd(q, k, v, scale, layout, dropout=None):
    """(output, log2-sum-exp per row: +inf for a row with no allowed key). A head split into disjoint parts runs
    one launch per part, each writing its share in float32, combined by log-sum-exp. dropout: a Dropout or None;
    the LSE is that of the probabilities before dropout."""
    if layout.num_parts == 1:
        return _fwd_launch(q, k, v, scale, layout, 0, q.dtype, dropout)
    parts = [_fwd_launch(q, k, v, scale, layout, part, torch.float32, dropout) for part in range(layout.num_parts)]
    o, lse = combine_parts(parts, exp=torch.exp2, log=torch.log2)
    return o.to(q.dtype), lse


def _fwd_launch(q, k, v, scale, layout, part, out_dtype, dropout):
    batch, num_q_heads, n, dim = q.shape
    masks = layout.masks
    o = torch.empty(q.shape, device=q.device, dtype=out_dtype)
    lse = torch.empty(batch, num_q_heads, n, device=q.device, dtype=torch.float32)
    args = (q, k, v, o, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
            *_head_args(q, k, layout), layout.num_tiles, layout.head_masks[part], layout.positions,
            *layout.full, *layout.part, layout.random, layout.num_tiles, layout.params_tensor, scale * _LOG2E,
            *dropout_kernel_args(dropout))
    chain = blocksparse_config_chain("blocksparse_fwd", q.dtype, dim, masks.block)
    launch_kernel("blocksparse_fwd", blocksparse_fwd_kernel, lambda bm, bn: (triton.cdiv(n, bm), batch * num_q_heads),
                  args, _constexprs(masks, q.dtype, dim, dropout), q, chain, _candidates(masks.block))
    return o, lse


def blocksparse_bwd(q, k, v, o, lse, do, scale, layout, dropout=None):
    batch, num_q_heads, n, dim = q.shape
    do = do.contiguous()
    # [batch, heads, n]: rowsum(dO * O), the softmax-gradient term (O after dropout: the kernels regenerate it).
    delta = (o.float() * do.float()).sum(-1)
    if layout.num_parts == 1:
        dq, dk_per_q, dv_per_q = _bwd_launches(q, k, v, do, lse, delta, scale, layout, 0, (q.dtype, k.dtype, v.dtype),
                                               dropout)
    else:
        # Each part's pairs, with the union's LSE and delta, give exactly their share of every gradient.
        shares = [_bwd_launches(q, k, v, do, lse, delta, scale, layout, part, (torch.float32,) * 3, dropout)
                  for part in range(layout.num_parts)]
        dq, dk_per_q, dv_per_q = (sum(grads).to(x.dtype) for grads, x in zip(zip(*shares), (q, k, v)))
    q_per_kv = num_q_heads // k.shape[1]
    if q_per_kv == 1:
        return dq, dk_per_q, dv_per_q
    # Grouped-query attention: a kv head's gradient sums over the query heads that share it.
    dk = dk_per_q.view(batch, k.shape[1], q_per_kv, n, dim).sum(2)
    dv = dv_per_q.view(batch, k.shape[1], q_per_kv, n, dim).sum(2)
    return dq, dk, dv


def _bwd_launches(q, k, v, do, lse, delta, scale, layout, part, dtypes, dropout):
    batch, num_q_heads, n, dim = q.shape
    masks = layout.masks
    dq, dk_per_q, dv_per_q = (torch.empty(q.shape, device=q.device, dtype=dtype) for dtype in dtypes)
    common = (*_head_args(q, k, layout), layout.num_tiles, layout.head_masks[part], layout.positions)
    tail = (layout.random, layout.num_tiles, layout.params_tensor, scale, scale * _LOG2E, *dropout_kernel_args(dropout))
    constexprs = _constexprs(masks, q.dtype, dim, dropout)
    launch_kernel("blocksparse_dkdv", blocksparse_bwd_dkdv_kernel,
                  lambda bm, bn: (triton.cdiv(n, bn), batch * num_q_heads),
                  (q, k, v, do, dk_per_q, dv_per_q, lse, delta, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                   *do.stride()[:3], *dk_per_q.stride()[:3], *dv_per_q.stride()[:3], *common,
                   *layout.full_t, *layout.part_t, *tail), constexprs, q,
                  blocksparse_config_chain("blocksparse_dkdv", q.dtype, dim, masks.block), _candidates(masks.block))
    launch_kernel("blocksparse_dq", blocksparse_bwd_dq_kernel, lambda bm, bn: (triton.cdiv(n, bm), batch * num_q_heads),
                  (q, k, v, do, dq, lse, delta, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3],
                   *dq.stride()[:3], *common, *layout.full, *layout.part, *tail), constexprs, q,
                  blocksparse_config_chain("blocksparse_dq", q.dtype, dim, masks.block), _candidates(masks.block))
    return dq, dk_per_q, dv_per_q


class _BlocksparseTritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, layout, dropout):
        o, lse = blocksparse_fwd(q, k, v, scale, layout, dropout)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale, ctx.layout, ctx.dropout = scale, layout, dropout
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = blocksparse_bwd(q, k, v, o, lse, do, ctx.scale, ctx.layout, ctx.dropout)
        return dq, dk, dv, None, None, None


def blocksparse_attention(q, k, v, masks, scale=None, backend="auto", check=True, dropout=None):
    """Block-sparse attention of the heads of `masks` (a BlockMasks).

    q: (batch, heads, n, head_dim), heads a multiple of the masks' head count (each mask head repeated
    contiguously); k, v: (batch, kv_heads, n, head_dim), kv_heads dividing heads. scale defaults to
    1/sqrt(head_dim). backend: "triton" (CUDA, or CPU under TRITON_INTERPRET=1), "torch" (the CPU path) or
    "auto". dropout: a Dropout (probability and seed, patterncc/families/shared/dropout.py) or None. Returns
    (batch, heads, n, head_dim) in q's dtype.

        masks = dense_block_masks(torch.ones(1, n, n, dtype=torch.bool).tril(), block=16)
        out = blocksparse_attention(q, k, v, masks)
    """
    if check:
        check_attention_inputs(q, k, v, len(masks.head_masks), backend, TRITON_HEAD_DIMS)
    if q.shape[0] == 0:
        return empty_batch_output(q, k, v)
    scale = attention_scale(q, scale)
    if uses_triton(q, backend):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return _BlocksparseTritonAttention.apply(q, k, v, scale, masks.layout(q.shape[2], q.device), dropout)
    return blocksparse_attention_torch(q, k, v, masks, scale, dropout)


def blocksparse_attention_with_lse(q, k, v, masks, scale, backend, dropout=None):
    """(out, lse) of blocksparse_attention on checked inputs, without autograd: the traced operator's forward,
    whose backward (blocksparse_attention_backward) takes this LSE instead of recomputing the forward. lse [batch,
    heads, n]: the Triton kernels' log2-sum-exp, or the CPU path's natural one (float32; float64 for float64
    inputs); the pair is meant to be used with one backend."""
    if uses_triton(q, backend):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return blocksparse_fwd(q, k, v, scale, masks.layout(q.shape[2], q.device), dropout)
    return blocksparse_attention_torch(q, k, v, masks, scale, dropout, with_lse=True)


def blocksparse_attention_backward(grad, q, k, v, out, lse, masks, scale, backend, dropout=None):
    """(dq, dk, dv) from blocksparse_attention_with_lse's output and LSE: the Triton backward kernels, or the CPU
    path's recomputing backward (families/blocksparse/cpu.py)."""
    if uses_triton(q, backend):
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
        return blocksparse_bwd(q, k, v, out, lse, grad, scale, masks.layout(q.shape[2], q.device), dropout)
    return blocksparse_torch_backward(q, k, v, out, lse, grad, masks, scale, dropout)


def blocksparse_aot_specs(masks, dtype="fp16", head_dim=64, kernels=None, dropout=False):
    """For every block-sparse kernel: (name, kernel, signature, [(constexprs, options) per config of its chain]),
    for ahead-of-time compilation (`patterncc compile --target`). `kernels` maps names to the kernels to compile:
    a generated module's own, which carry its pattern's hook (default: this module's, with the dense-mask hook);
    dropout: the variant with attention dropout."""
    kernels = kernels or {"blocksparse_fwd": blocksparse_fwd_kernel, "blocksparse_dkdv": blocksparse_bwd_dkdv_kernel,
                          "blocksparse_dq": blocksparse_bwd_dq_kernel}
    torch_dtype = AOT_DTYPES[dtype]
    pointers = dict(LSE="*fp32", DELTA="*fp32", HEAD_MASK="*i32", POSITIONS="*i32", FULL_COUNT="*i32",
                    FULL_INDEX="*i32", PART_COUNT="*i32", PART_INDEX="*i32", FULL_COUNT_T="*i32",
                    FULL_INDEX_T="*i32", PART_COUNT_T="*i32", PART_INDEX_T="*i32", RANDOM="*i8", NUM_BLOCKS="i32",
                    PARAMS="*i64" if masks.int64 else "*i32")
    if masks.num_parts > 1:  # split heads: every launch writes its part's share in float32 (blocksparse_fwd/_bwd)
        pointers.update(O="*fp32", DQ="*fp32", DK="*fp32", DV="*fp32")
    constexprs = dict(_constexprs(masks, torch_dtype, head_dim), DROPOUT=dropout)
    return [(name, kernel, aot_signature(kernel, dtype, pointers, floats=("sm_scale", "sm_scale_log2", "dropout_scale"),
                                         int64s=("seed",)),
             aot_configs(blocksparse_config_chain(name, torch_dtype, head_dim, masks.block), constexprs))
            for name, kernel in kernels.items()]

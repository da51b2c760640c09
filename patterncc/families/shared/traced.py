"""A generated module's attention as one opaque operator, for torch.compile and torch.export.

Eager calls run the families directly: layouts are built per sequence length in Python, with data-dependent
branches a tracer cannot follow. Under torch.compile or torch.export (and for meta tensors) the module calls
one custom operator instead, `patterncc_<pattern key>::attention`, whose fake implementation gives the output's
shape from the inputs' shapes alone. The graph then holds a single node per attention call, with the sequence
length symbolic: a new n runs the same graph and builds its layout inside the operator, never a recompile.

The backward operator recomputes the forward with autograd enabled and differentiates it: exact, and every
family's own backward runs, at the cost of one more forward pass per backward (eager calls do not pay it).
Modules whose heads are all set heads register a second pair instead (`register_lse_attention_ops`): the forward
returns the output and its log-sum-exp per row, and the backward takes them, as FlashAttention's does (the Triton
backward kernels, or the CPU path's recomputing backward), so no forward is repeated.
"""

import torch

# The dispatcher's thread-local key sets outside any operator. An operator's implementation runs with autograd
# dispatch excluded; the backward operator restores these to differentiate the recomputed forward.
_OUTSIDE_OPERATORS = (torch._C._dispatch_tls_local_include_set(), torch._C._dispatch_tls_local_exclude_set())


def attention_op_namespace(pattern_key):
    """The operator namespace of a pattern: its identity key, so modules of different patterns never share an
    operator, and the same pattern imported twice reuses the one registered first (same key, same code)."""
    return f"patterncc_{pattern_key}"


def register_attention_ops(namespace, attention_fn):
    """Register `namespace::attention` (q, k, v, scale, backend, buffers, documents, dropout_p, seed) -> out and its
    backward, once per namespace, and return the forward operator. attention_fn takes the same arguments: the
    eager attention. scale a float; buffers the module's random draws as a list (empty for none); documents None
    or the (batch, n) document ids (documents.py); dropout_p and seed (a 0-d int64 tensor, or None) attention
    dropout (dropout.py), whose pairs the backward regenerates from the seed."""
    ops = getattr(torch.ops, namespace)
    if hasattr(ops, "attention"):
        return ops.attention

    @torch.library.custom_op(f"{namespace}::attention", mutates_args=())
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str,
                  buffers: list[torch.Tensor], documents: torch.Tensor | None, dropout_p: float,
                  seed: torch.Tensor | None) -> torch.Tensor:
        # Results are contiguous, whatever the inputs' strides, as the fake implementations promise.
        with torch.no_grad():
            return attention_fn(q, k, v, scale, backend, buffers, documents, dropout_p, seed).contiguous()

    @attention.register_fake
    def _(q, k, v, scale, backend, buffers, documents, dropout_p, seed):
        return q.new_empty(q.shape[:-1] + v.shape[-1:])

    @torch.library.custom_op(f"{namespace}::attention_backward", mutates_args=())
    def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           backend: str, buffers: list[torch.Tensor], documents: torch.Tensor | None,
                           dropout_p: float, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor,
                                                                                 torch.Tensor]:
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        with torch._C._ForceDispatchKeyGuard(*_OUTSIDE_OPERATORS), torch.enable_grad():
            out = attention_fn(*inputs, scale, backend, buffers, documents, dropout_p, seed)
        # An input the pattern never reads (keys of shared-QK hashed heads) gets a zero gradient.
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        return tuple(torch.zeros(x.shape, dtype=x.dtype, device=x.device) if g is None else g.contiguous()
                     for x, g in zip(inputs, grads))

    @attention_backward.register_fake
    def _(grad_out, q, k, v, scale, backend, buffers, documents, dropout_p, seed):
        return tuple(x.new_empty(x.shape) for x in (q, k, v))

    def setup_context(ctx, inputs, output):
        q, k, v, scale, backend, buffers, documents, dropout_p, seed = inputs
        ctx.save_for_backward(q, k, v, documents, seed, *buffers)
        ctx.scale, ctx.backend, ctx.dropout_p = scale, backend, dropout_p

    def backward(ctx, grad_out):
        q, k, v, documents, seed, *buffers = ctx.saved_tensors
        dq, dk, dv = attention_backward(grad_out.contiguous(), q, k, v, ctx.scale, ctx.backend, buffers, documents,
                                        ctx.dropout_p, seed)
        # No gradient for the random draws, the documents or the seed.
        return dq, dk, dv, None, None, [None] * len(buffers), None, None, None

    attention.register_autograd(backward, setup_context=setup_context)
    return ops.attention


def register_lse_attention_ops(namespace, forward_fn, backward_fn):
    """Register `namespace::attention_lse` (q, k, v, scale, backend, dropout_p, seed) -> (out, lse), whose
    backward `namespace::attention_lse_backward` takes the saved output and LSE, once per namespace, and return
    the forward operator. forward_fn(q, k, v, scale, backend, dropout_p, seed) -> (out, lse [batch, heads, n],
    float32, or float64 for float64 inputs); backward_fn(grad_out, q, k, v, out, lse, scale, backend, dropout_p,
    seed) -> (dq, dk, dv)."""
    ops = getattr(torch.ops, namespace)
    if hasattr(ops, "attention_lse"):
        return ops.attention_lse

    @torch.library.custom_op(f"{namespace}::attention_lse", mutates_args=())
    def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, backend: str,
                      dropout_p: float, seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            out, lse = forward_fn(q, k, v, scale, backend, dropout_p, seed)
        return out.contiguous(), lse.to(_lse_dtype(q)).contiguous()

    @attention_lse.register_fake
    def _(q, k, v, scale, backend, dropout_p, seed):
        return q.new_empty(q.shape[:-1] + v.shape[-1:]), q.new_empty(q.shape[:-1], dtype=_lse_dtype(q))

    @torch.library.custom_op(f"{namespace}::attention_lse_backward", mutates_args=())
    def attention_lse_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, scale: float, backend: str, dropout_p: float,
                               seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            grads = backward_fn(grad_out, q, k, v, out, lse, scale, backend, dropout_p, seed)
        return tuple(g.contiguous() for g in grads)

    @attention_lse_backward.register_fake
    def _(grad_out, q, k, v, out, lse, scale, backend, dropout_p, seed):
        return tuple(x.new_empty(x.shape) for x in (q, k, v))

    def setup_context(ctx, inputs, output):
        q, k, v, scale, backend, dropout_p, seed = inputs
        ctx.save_for_backward(q, k, v, *output, seed)
        ctx.scale, ctx.backend, ctx.dropout_p = scale, backend, dropout_p
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_out, _grad_lse):
        q, k, v, out, lse, seed = ctx.saved_tensors
        dq, dk, dv = attention_lse_backward(grad_out.contiguous(), q, k, v, out, lse, ctx.scale, ctx.backend,
                                            ctx.dropout_p, seed)
        return dq, dk, dv, None, None, None, None

    attention_lse.register_autograd(backward, setup_context=setup_context)
    return ops.attention_lse


def _lse_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def run_as_operator(q):
    """Whether a call goes through the operator: while torch.compile or torch.export traces it, or on the meta
    device (shapes only)."""
    return torch.compiler.is_compiling() or q.device.type == "meta"

"""Hashed heads on the CPU: the same chunks as the kernels, in plain torch, differentiable by autograd."""

import torch

from ..shared.dropout import dropout_keep, dropout_offsets


def _lsh_round_torch(q, k, v, plan, r, chunk, causal, shared_qk, scale, dropout):
    """Round r on sorted chunks: (out_r (B, H, n, D), lse_r (B, H, n), natural log, -inf: no key) at original
    positions. Query chunk t against the keys of chunks t - 1 and t: O(n * 2c) scores, never n x n."""
    batch, heads, n, dim = q.shape
    rounds = plan["perm_q"].shape[2]
    num_chunks = -(-n // chunk)
    pad = num_chunks * chunk - n
    perm_q, perm_k = plan["perm_q"][:, :, r].long(), plan["perm_k"][:, :, r].long()

    def chunks(x, fill):  # [B, H, ..., n] sorted -> [B, H, ..., num_chunks, chunk], padded with `fill`
        return torch.nn.functional.pad(x, (0, pad), value=fill).unflatten(-1, (num_chunks, chunk))

    def windows(x, fill):  # chunk t's keys are chunks t - 1 and t (chunk 0: none before): [..., num_chunks, 2c]
        before = torch.nn.functional.pad(x[..., :-1, :], (0, 0, 1, 0), value=fill)
        return torch.cat([before, x], dim=-1)

    def rows(x, perm):  # [B, H, num_chunks, chunk, D], sorted, zero-padded
        x = torch.gather(x, 2, perm[..., None].expand(-1, -1, -1, dim))
        return torch.nn.functional.pad(x, (0, 0, 0, pad)).view(batch, heads, num_chunks, chunk, dim)

    # Window codes of every round, in this round's sorted order. Padding codes are negative (real ones are not)
    # and differ by more than 1, so padded pairs are never in a window and need no mask of their own.
    code_q = chunks(torch.gather(plan["code_q"], 3, perm_q[:, :, None].expand(-1, -1, rounds, -1)), -100)
    code_k = windows(chunks(torch.gather(plan["code_k"], 3, perm_k[:, :, None].expand(-1, -1, rounds, -1)), -10),
                     -10)

    def in_window(r2):  # code_i - code_j in {0, 1}: [B, H, num_chunks, chunk, 2c]
        cq, ck = code_q[:, :, r2, :, :, None], code_k[:, :, r2, :, None, :]
        return (cq == ck) | (cq == ck + 1)

    allowed = in_window(r)
    pos_q = chunks(perm_q, -1)[..., :, None]
    pos_k = windows(chunks(perm_k, -1), -1)[..., None, :]
    if causal:
        allowed &= pos_k <= pos_q
    if shared_qk:
        allowed &= pos_k != pos_q
    def row_windows(x):  # [B, H, num_chunks, 2c, D]
        x = rows(x, perm_k)
        return torch.cat([torch.nn.functional.pad(x[:, :, :-1], (0, 0, 0, 0, 1, 0)), x], dim=3)

    keys, values = row_windows(k), row_windows(v)
    scores = torch.matmul(rows(q, perm_q), keys.transpose(-1, -2)) * scale
    if rounds > 1:
        count = allowed.to(scores.dtype)  # where allowed, round r itself holds the pair
        for r2 in range(rounds):
            if r2 != r:
                count.add_(in_window(r2))
        scores = scores - torch.log(count.clamp_(min=1.0))
    has_keys = allowed.any(dim=-1)
    # A row without a key softmaxes over one dummy key instead of none (which would give NaN); its output is
    # dropped below, so output and gradients are exactly 0.
    allowed[..., 0] |= ~has_keys
    scores = torch.where(allowed, scores, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probabilities = torch.softmax(scores, dim=-1)
    if dropout is not None:  # the pairs' Philox decisions at their original positions, the same every round
        offsets = dropout_offsets(batch, heads, n, torch.arange(heads), pos_q, pos_k, leading=True)
        probabilities = probabilities * (dropout_keep(dropout, offsets).to(scores.dtype) * dropout.scale)
    out = torch.matmul(probabilities, values)
    out = torch.where(has_keys[..., None], out, 0.0)
    lse = torch.where(has_keys, lse, float("-inf"))
    # Back to original positions: position p sits at slot inverse[p].
    inverse = plan["inverse_q"][:, :, r].long()
    out = torch.gather(out.reshape(batch, heads, num_chunks * chunk, dim), 2,
                       inverse[..., None].expand(-1, -1, -1, dim))
    lse = torch.gather(lse.reshape(batch, heads, num_chunks * chunk), 2, inverse)
    return out, lse


def lsh_attention_torch(q, k, v, plan, chunk, causal, shared_qk, scale, dropout=None):
    """LSH attention of sorted chunks, every round, combined (ops.py states the semantics); dropout: a Dropout
    or None."""
    rounds = plan["perm_q"].shape[2]
    per_round = [_lsh_round_torch(q, k, v, plan, r, chunk, causal, shared_qk, scale, dropout) for r in range(rounds)]
    out_r = torch.stack([out for out, _ in per_round], dim=2)  # [B, H, R, n, D]
    lse_r = torch.stack([lse for _, lse in per_round], dim=2)  # [B, H, R, n]
    own_values = lsh_self_values(v, dropout) if shared_qk else None
    return lsh_combine_rounds(out_r, lse_r, own_values)


def lsh_self_values(x, dropout):
    """The self rule's fallback on x (batch, heads, n, d): v_i itself (or dO_i for its gradient), times pair
    (i, i)'s dropout multiplier when there is dropout."""
    if dropout is None:
        return x
    return x * _self_weight(dropout, *x.shape[:3], x.device, x.dtype)


def _self_weight(dropout, batch, heads, n, device, dtype):
    """Pair (i, i)'s dropout multiplier per position, (batch, heads, n, 1) in dtype."""
    i = torch.arange(n, device=device)
    keep = dropout_keep(dropout, dropout_offsets(batch, heads, n, torch.arange(heads, device=device), i, i))
    return (keep.to(dtype) * dropout.scale)[..., None]


def lsh_combine_rounds(out_r, lse_r, own_values=None):
    """The rounds combined by their log-sum-exp: out_r [B, H, R, n, D], lse_r [B, H, R, n] (natural log, -inf: no
    key that round) -> [B, H, n, D]. A row with no key in any round gets own_values [B, H, n, D] (shared_qk's
    self rule: v_i) or 0. The forward's CPU path and a decode step (n = 1) combine their rounds here."""
    top = lse_r.amax(dim=2).detach()
    has_keys = top > float("-inf")
    top = torch.where(has_keys, top, torch.zeros_like(top))
    weights = torch.exp(lse_r - top[:, :, None])
    total = weights.sum(dim=2)
    total = torch.where(has_keys, total, torch.ones_like(total))
    out = torch.einsum("bhrn,bhrnd->bhnd", weights, out_r) / total[..., None]
    if own_values is not None:
        out = torch.where(has_keys[..., None], out, own_values.to(out.dtype))
    return out

"""Kernel heads on the CPU: the chunked linear-attention math of the kernels in plain torch, differentiated by
autograd."""

import torch

# Rows per chunk of the CPU path: intra-chunk products cost n * chunk, states n * F * d / chunk.
_LINEAR_TORCH_CHUNK = 64


def linear_phi(x, feature_map, projection):
    """(phi, r) of x (batch, heads, n, d): phi (..., F) and, for favor, each row's log-scale r (..., n), a constant
    for autograd, with the raw FAVOR+ feature = phi * exp(r); r is None for elu1 and relu."""
    if feature_map == "elu1":
        return torch.nn.functional.elu(x) + 1, None
    if feature_map == "relu":
        return torch.relu(x), None
    scaled = x * x.shape[-1] ** -0.25
    proj = torch.matmul(scaled, projection.to(x.dtype).transpose(-1, -2)[None])  # [batch, heads, n, F]
    top = proj.amax(-1, keepdim=True).detach()
    half_sq = 0.5 * (scaled * scaled).sum(-1, keepdim=True)
    # half_sq - half_sq.detach() is 0 in value and carries the gradient -x' of the |x'|^2 / 2 term.
    phi = torch.exp(proj - top - (half_sq - half_sq.detach())) * projection.shape[1] ** -0.5
    return phi, (top - half_sq).detach()[..., 0]


def linear_attention_torch(q, k, v, feature_map, eps, causal, projection, initial=None):
    """The CPU path: the chunked algorithm in torch ops, O(n d F) work and O(n d) memory, autograd for the
    backward pass. initial (causal only): the state of keys before position 0, (sum of phi(k) v^T [batch, heads,
    F, d], sum of phi(k) [batch, heads, F], for favor the largest key exponent m [batch, heads] they are relative
    to (their sums weighted by exp(r - m)), else None); context parallel passes the earlier ranks' keys so."""
    batch, heads, n, dim = q.shape
    compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    qc, kc, vc = q.to(compute), k.to(compute), v.to(compute)
    phi_q, _ = linear_phi(qc, feature_map, projection)
    phi_k, r = linear_phi(kc, feature_map, projection)
    favor = r is not None
    if not causal:
        if favor:
            phi_k = phi_k * torch.exp(r - r.amax(-1, keepdim=True))[..., None]
        state = torch.matmul(phi_k.transpose(-1, -2), vc)  # [batch, heads, F, d]
        num = torch.matmul(phi_q, state)
        den = torch.matmul(phi_q, phi_k.sum(-2)[..., None])[..., 0]
        return (num / (den + eps)[..., None]).to(q.dtype)
    chunk = _LINEAR_TORCH_CHUNK
    chunks = -(-n // chunk)
    pad = chunks * chunk - n
    if pad:
        phi_q, phi_k, vc = (torch.nn.functional.pad(x, (0, 0, 0, pad)) for x in (phi_q, phi_k, vc))
        if favor:
            r = torch.nn.functional.pad(r, (0, pad), value=float("-inf"))
    feats = phi_q.shape[-1]
    phi_q = phi_q.reshape(batch, heads, chunks, chunk, feats)
    phi_k = phi_k.reshape(batch, heads, chunks, chunk, feats)
    vc = vc.reshape(batch, heads, chunks, chunk, dim)
    lower = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = torch.matmul(phi_q, phi_k.transpose(-1, -2))  # [batch, heads, chunks, chunk, chunk]
    if favor:
        r = r.reshape(batch, heads, chunks, chunk)
        within = torch.cummax(r, dim=-1).values
        top = within[..., -1]  # [batch, heads, chunks]: each chunk's largest key exponent
        m = torch.full_like(top[..., 0], float("-inf")) if initial is None else initial[2]
        before = torch.cat([m[..., None], torch.cummax(torch.maximum(top, m[..., None]), -1).values[..., :-1]], -1)
        seen = torch.maximum(before[..., None], within)  # M_i: the largest exponent among keys j <= i
        scores = scores * torch.exp(torch.where(lower, r[..., None, :] - seen[..., :, None], float("-inf")))
        inter = torch.exp(before[..., None] - seen)[..., None]  # [batch, heads, chunks, chunk, 1]
        weighted = phi_k * torch.exp(r - top[..., None])[..., None]  # relative to the chunk's own maximum
        own_s = torch.matmul(weighted.transpose(-1, -2), vc)  # [batch, heads, chunks, F, d]
        own_z = weighted.sum(-2)
        # States before each chunk, relative to `before`: a sequential scan, since the reference maximum
        # changes from chunk to chunk (n / chunk small steps).
        states, sums = [], []
        s = own_s.new_zeros(batch, heads, feats, dim) if initial is None else initial[0]
        z = own_z.new_zeros(batch, heads, feats) if initial is None else initial[1]
        for c in range(chunks):
            states.append(s)
            sums.append(z)
            m_new = torch.maximum(m, top[..., c])
            old, new = torch.exp(m - m_new), torch.exp(top[..., c] - m_new)
            s = s * old[..., None, None] + own_s[:, :, c] * new[..., None, None]
            z = z * old[..., None] + own_z[:, :, c] * new[..., None]
            m = m_new
        s_prev, z_prev = torch.stack(states, 2), torch.stack(sums, 2)
    else:
        scores = scores * lower
        inter = 1.0
        own_s = torch.matmul(phi_k.transpose(-1, -2), vc)
        own_z = phi_k.sum(-2)
        s_prev = torch.cat([torch.zeros_like(own_s[:, :, :1]), own_s.cumsum(2)[:, :, :-1]], 2)
        z_prev = torch.cat([torch.zeros_like(own_z[:, :, :1]), own_z.cumsum(2)[:, :, :-1]], 2)
        if initial is not None:
            s_prev, z_prev = s_prev + initial[0][:, :, None], z_prev + initial[1][:, :, None]
    num = torch.matmul(scores, vc) + inter * torch.matmul(phi_q, s_prev)
    den = scores.sum(-1, keepdim=True) + inter * torch.matmul(phi_q, z_prev[..., None])
    # Padding rows are cut before dividing: their 0 / (0 + eps) would give NaN gradients when eps = 0.
    num = num.reshape(batch, heads, chunks * chunk, dim)[:, :, :n]
    den = den.reshape(batch, heads, chunks * chunk, 1)[:, :, :n]
    return (num / (den + eps)).to(q.dtype)

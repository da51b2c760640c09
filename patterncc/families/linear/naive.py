"""Plain-torch float64 reference for the kernel heads (linear attention), sharing no code with the kernels.

It materialises the n x n matrix A = phi(Q) phi(K)^T (times the causal mask) and returns (A V) / (A 1 + eps), so
use it on small n only. Its feature maps are written here independently of the generated module's.

FAVOR+ is computed with the raw (unstabilised) features, which float64's range holds for test inputs; the
generated module's stabilisers are instead folded into eps: with the query row maximum qm_i = max_f b_if and
the largest key exponent M_i visible to query i (both constants for differentiation, as the Performer's
.detach()), the module's ratio equals N_i / (D_i + eps * exp(qm_i + M_i)) with N, D the raw numerator and
denominator.
"""

from __future__ import annotations

import torch

FEATURE_MAPS = ("elu1", "relu", "favor")


def _favor_exponents(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """w_f . x' - |x'|^2 / 2 with x' = x * d^-1/4 (the Performer's data normaliser): (batch, heads, n, m)."""
    d = x.shape[-1]
    scaled = x * d ** -0.25
    # einsum keeps the projection per head: w has shape (heads, m, d).
    dots = torch.einsum("bhnd,hmd->bhnm", scaled, projection.to(x.dtype))
    return dots - 0.5 * (scaled * scaled).sum(-1, keepdim=True)


def linear_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, feature_map: str, eps: float,
                     causal: bool, projection: torch.Tensor | None = None,
                     dtype: torch.dtype | None = torch.float64) -> torch.Tensor:
    """Linear attention out_i = sum_j A_ij v_j / (sum_j A_ij + eps), A_ij = phi(q_i) . phi(k_j) (j <= i if causal).

    q, k, v: (batch, heads, n, d), the same heads. projection: (heads, m, d) for "favor". Computed in `dtype`
    (float64 by default; None keeps the inputs' dtype, the "eager" computation of the tolerance rule).
    """
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"feature_map must be one of {FEATURE_MAPS}, got {feature_map!r}")
    if dtype is not None:
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    n = q.shape[2]
    allowed = torch.ones(n, n, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.tril(allowed)
    if feature_map == "elu1":
        phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
        eps_scale = torch.ones(q.shape[:3] + (1,), dtype=q.dtype, device=q.device)
    elif feature_map == "relu":
        phi_q, phi_k = torch.relu(q), torch.relu(k)
        eps_scale = torch.ones(q.shape[:3] + (1,), dtype=q.dtype, device=q.device)
    else:
        if projection is None:
            raise ValueError("feature_map 'favor' needs a projection (heads, m, d)")
        m = projection.shape[1]
        exp_q, exp_k = _favor_exponents(q, projection), _favor_exponents(k, projection)
        phi_q, phi_k = torch.exp(exp_q) / m ** 0.5, torch.exp(exp_k) / m ** 0.5
        query_max = exp_q.amax(-1).detach()  # (batch, heads, n)
        key_max = exp_k.amax(-1).detach()
        # Largest key exponent query i sees: over j <= i when causal, over all keys otherwise.
        visible = torch.where(allowed, key_max[:, :, None, :], torch.tensor(float("-inf"), dtype=q.dtype))
        eps_scale = torch.exp(query_max + visible.amax(-1))[..., None]
    scores = torch.matmul(phi_q, phi_k.transpose(-1, -2)) * allowed
    return torch.matmul(scores, v) / (scores.sum(-1, keepdim=True) + eps * eps_scale)

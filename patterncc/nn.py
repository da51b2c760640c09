"""Attention layers built on patterncc modules, drop-ins for the attention of a transformer block."""

from __future__ import annotations

import torch

from .api import load
from .errors import PatternUsageError, check_positive_int
from .families.shared.dropout import check_dropout


class SparseSelfAttention(torch.nn.Module):
    """Multi-head self-attention whose connectivity is a `.attn` pattern: projections, the pattern's attention,
    an output projection. x (batch, n, embed_dim) -> (batch, n, embed_dim).

    embed_dim: model width, a multiple of num_heads (head_dim = embed_dim // num_heads). num_heads: query heads,
    a multiple of the pattern's head count (each pattern head serves num_heads / pattern heads query heads).
    num_kv_heads: key/value heads for grouped-query attention (default num_heads), dividing num_heads.
    pattern: a .attn path or its text; params override its parameters (`l=64`, `heads=4`); pattern_name picks
    one pattern of a file with several; layer picks the head group of `combine interleaved` patterns.
    dropout: attention dropout in training mode (the attention probabilities, in the kernels: set and hashed heads).
    """

    def __init__(self, embed_dim: int, num_heads: int, pattern, num_kv_heads: int | None = None,
                 dropout: float = 0.0, bias: bool = True, *, pattern_name: str | None = None, layer: int = 0,
                 backend: str = "auto", device=None, dtype=None, **params: int):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        for name, value in (("embed_dim", embed_dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
            check_positive_int(value, name)
        if embed_dim % num_heads:
            raise PatternUsageError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        if num_heads % num_kv_heads:
            raise PatternUsageError(f"num_kv_heads {num_kv_heads} does not divide num_heads {num_heads}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.attention = load(pattern, pattern=pattern_name, layer=layer, backend=backend, head_dim=self.head_dim,
                              **params)
        try:
            check_dropout(dropout, self.attention.head_families, "dropout")
        except ValueError as err:
            raise PatternUsageError(str(err)) from None
        self.dropout = float(dropout)
        if num_heads % self.attention.num_heads:
            raise PatternUsageError(
                f"num_heads {num_heads} is not a multiple of the pattern's {self.attention.num_heads} heads; change "
                f"num_heads, or the pattern's head count (a parameter, e.g. `heads={num_heads}`, where the pattern "
                f"declares `head NAME[heads]`)")
        factory = {"device": device, "dtype": dtype}
        self.q_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.kv_proj = torch.nn.Linear(embed_dim, 2 * num_kv_heads * self.head_dim, bias=bias, **factory)
        self.out_proj = torch.nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(self, x: torch.Tensor, *, key_padding_mask=None, document_ids=None, cu_seqlens=None) -> torch.Tensor:
        """x (batch, n, embed_dim). key_padding_mask (batch, n) bool, True at padding; document_ids (batch, n),
        negative at padding; cu_seqlens (documents + 1,) for one packed row: the pattern then applies within each
        document, positions counted from its start, and padding rows of the attention are 0."""
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x must be (batch, n, embed_dim={self.embed_dim}), got {tuple(x.shape)}")
        batch, n, _ = x.shape
        q = self.q_proj(x).view(batch, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(batch, n, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = self.attention(q, k, v, dropout_p=self.dropout if self.training and self.dropout else None,
                             key_padding_mask=key_padding_mask, document_ids=document_ids,
                             cu_seqlens=cu_seqlens)  # (batch, heads, n, head_dim)
        return self.out_proj(out.transpose(1, 2).reshape(batch, n, self.embed_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"dropout={self.dropout}")

"""Padding and packed documents, for every family: each document is attended as a sequence of its own.

A call may say which positions belong together: `key_padding_mask` (batch, n), True at padding (as
torch.nn.MultiheadAttention's); `document_ids` (batch, n), the document of each position, negative for padding;
or `cu_seqlens` (documents + 1,), flash-attn's cumulative lengths over a batch of one packed row. A document is
the positions of one row with one id, in order: the pattern applies to it alone, with positions counted from its
first token (i, j and n are the document's), so keys of other documents and padding are never attended, and a
padding query's output is 0.

Every document runs through the module's families unchanged, as a sequence of its own length: documents of one
length are batched into one call, whose layout (built once per length, in closed form) keeps every tile's
FULL/EMPTY class. The positions of each length are gathered and the outputs scattered back with index ops, so
gradients flow to q, k and v.
"""

import torch


def document_ids_of(q, key_padding_mask=None, document_ids=None, cu_seqlens=None):
    """The call's documents as one int64 (batch, n) tensor, -1 at padding; None without any of the three. Shapes
    are checked here (both numbers named); values where the documents are split (`document_groups`)."""
    batch, n = q.shape[0], q.shape[2]
    if document_ids is not None and cu_seqlens is not None:
        raise ValueError("give document_ids or cu_seqlens, not both")
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype.is_floating_point:
            raise ValueError(f"cu_seqlens must be a 1-D integer tensor of documents + 1 offsets, got shape "
                             f"{tuple(cu_seqlens.shape)} and dtype {cu_seqlens.dtype}")
        if batch != 1:
            raise ValueError(f"cu_seqlens describes one packed row: q must have batch 1, got {batch}")
        offsets = cu_seqlens.to(device=q.device, dtype=torch.int64)
        if not torch.compiler.is_compiling() and q.device.type != "meta":
            if bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[0]) < 0 or int(offsets[-1]) > n:
                raise ValueError(f"cu_seqlens must be non-decreasing offsets in 0..n = 0..{n}, got "
                                 f"{offsets.tolist()}")
        positions = torch.arange(n, device=q.device)
        ids = torch.searchsorted(offsets, positions, right=True) - 1
        document_ids = torch.where((positions >= offsets[0]) & (positions < offsets[-1]), ids, -1)[None]
    elif document_ids is not None:
        if tuple(document_ids.shape) != (batch, n) or document_ids.dtype.is_floating_point \
                or document_ids.dtype == torch.bool:
            raise ValueError(f"document_ids must be an integer tensor of shape (batch, n) = ({batch}, {n}), got "
                             f"shape {tuple(document_ids.shape)} and dtype {document_ids.dtype}")
        document_ids = torch.where(document_ids < 0, -1, document_ids.to(device=q.device, dtype=torch.int64))
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (batch, n) or key_padding_mask.dtype != torch.bool:
            raise ValueError(f"key_padding_mask must be a bool tensor of shape (batch, n) = ({batch}, {n}), True "
                             f"at padding, got shape {tuple(key_padding_mask.shape)} and dtype "
                             f"{key_padding_mask.dtype}")
        if document_ids is None:
            document_ids = torch.zeros((batch, n), dtype=torch.int64, device=q.device)
        document_ids = torch.where(key_padding_mask.to(q.device), -1, document_ids)
    return document_ids


def document_groups(document_ids):
    """The documents grouped by length: [(length, index)], index an int64 [documents, length] tensor of
    positions in the flattened (batch * n) sequence, each row one document in order."""
    batch, n = document_ids.shape
    ids = document_ids.to(torch.int64)
    real = ids >= 0
    span = int(ids.max()) + 1 if bool(real.any()) else 1
    flat = torch.arange(batch * n, device=ids.device).view(batch, n)
    key = ids + torch.arange(batch, device=ids.device)[:, None] * span  # one key per (row, document)
    keys, positions = key[real], flat[real]
    order = torch.argsort(keys, stable=True)  # stable: a document's positions stay in order
    keys, positions = keys[order], positions[order]
    _, lengths = torch.unique_consecutive(keys, return_counts=True)
    starts = torch.cumsum(lengths, 0) - lengths
    groups = []
    for length in torch.unique(lengths).tolist():
        first = starts[lengths == length]
        groups.append((length, positions[first[:, None] + torch.arange(length, device=ids.device)]))
    return groups


def attend_documents(attend, q, k, v, document_ids):
    """attend(q, k, v) -> out run on every document of `document_ids` as its own sequence (documents of one
    length in one call); padding rows of the result are 0."""
    batch, num_q_heads, n, _ = q.shape
    rows = [x.transpose(1, 2).reshape(batch * n, x.shape[1], x.shape[3]) for x in (q, k, v)]  # [B*n, H, d]
    out = q.new_zeros(batch * n, num_q_heads, v.shape[3])
    for _, index in document_groups(document_ids):
        q_doc, k_doc, v_doc = (x[index].transpose(1, 2) for x in rows)  # [documents, H, length, d]
        out_doc = attend(q_doc, k_doc, v_doc).transpose(1, 2)
        out = out.index_copy(0, index.flatten(), out_doc.reshape(-1, num_q_heads, v.shape[3]))
    return out.view(batch, n, num_q_heads, v.shape[3]).transpose(1, 2)

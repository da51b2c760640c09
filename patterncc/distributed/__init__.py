"""Context parallel: a sequence sharded across processes (torch.distributed: gloo on CPU, NCCL on CUDA), each
rank fetching only the keys its queries read.

    shard = patterncc.distributed.plan("strided.attn", n=65536, world_size=4)
    attn = patterncc.distributed.ShardedAttention(shard.module, shard=shard)
    out_local = attn(q_local, k_local, v_local)   # rows shard.positions(rank) of the whole sequence's output
"""

from .plan import ORDERS, Shard, plan
from .sharded import ShardedAttention

__all__ = ["ORDERS", "Shard", "ShardedAttention", "plan"]

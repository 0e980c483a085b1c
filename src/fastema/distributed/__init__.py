"""Distributed checkpoints: sharded EMA files with torch.distributed.checkpoint (DCP)."""

from .sharded import ShardedEMAState, consolidate_ema, load_sharded, save_sharded

__all__ = ["ShardedEMAState", "consolidate_ema", "load_sharded", "save_sharded"]

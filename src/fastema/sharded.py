"""Deprecated path of `fastema.distributed` (sharded DCP checkpoints)."""

from ._extras import warn_moved
from .distributed import ShardedEMAState, consolidate_ema, load_sharded, save_sharded

__all__ = ["ShardedEMAState", "consolidate_ema", "load_sharded", "save_sharded"]
warn_moved("fastema.sharded", "fastema.distributed")

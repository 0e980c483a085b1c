"""The per-rank state of a ZeRO-3 EMA: this rank's partitions, and everything a load must find unchanged.

Each rank saves its own partition of every averaged tensor (no gather) with the world size, its
rank, the full shape and the partition size of each tensor; a load compares all of them before
anything is written, and every rank learns whether any rank refused (one object all-gather), so
the ranks load together or not at all. The files around it are in `fastema.deepspeed`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .state import check_state_dict, length_of, make_state_dict, write_checked_state
from .zero import ZeroLayout

if TYPE_CHECKING:
    from .model_ema import ModelEMA

PARTITION_FORMAT = "fastema.ZeroPartition"
PARTITION_VERSION = 1
CONSOLIDATE_HINT = (
    "consolidate the checkpoint (fastema.deepspeed.consolidate_ema(folder, 'ema.pt', ema_state=True), offline) "
    "and load that file with ema.load('ema.pt') on every rank"
)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def zero_layouts(ema: ModelEMA) -> dict[str, ZeroLayout]:
    """The ZeRO-3 layouts of the EMA's tensors by name (empty: the EMA is not partitioned by ZeRO-3)."""
    return {name: layout for name, layout in ema._tracker.layouts.items() if isinstance(layout, ZeroLayout)}


def partition_state(ema: ModelEMA) -> dict[str, Any]:
    """This rank's part of the EMA (CPU copies) and what a load must match; no communication."""
    ema._swap.check_outside("saving the EMA's partitions")
    ema._readable()
    layouts = zero_layouts(ema)
    if not layouts:
        raise ValueError("Invalid EMA: not partitioned by DeepSpeed ZeRO-3; save it with ema.save(path)")
    rank, world = _world()
    parts = {name: tensor.detach().cpu().clone() for name, tensor in ema._tracker.ema_by_name().items()}
    return {
        "format": PARTITION_FORMAT,
        "version": PARTITION_VERSION,
        "rank": rank,
        "world_size": world,
        "full_shapes": {name: list(layouts[name].shape if name in layouts else parts[name].shape) for name in parts},
        "partition_sizes": {name: layout.partition_size for name, layout in layouts.items()},
        "ema": make_state_dict(
            parts, ema.num_updates, ema.num_steps, ema.decay, ema.last_decay, ema.config(), length_of(ema)
        ),
    }


def check_partition_state(ema: ModelEMA, state: object) -> tuple[dict[str, Tensor], tuple[int, int], float]:
    """This rank's checked parts, counts and latest decay from `state`, or a ValueError naming every problem."""
    if not isinstance(state, dict) or state.get("format") != PARTITION_FORMAT:
        raise ValueError("not a fastema ZeRO-3 partition of an EMA (missing format marker)")
    if state.get("version") != PARTITION_VERSION:
        raise ValueError(f"version {state.get('version')!r}, expected {PARTITION_VERSION}")
    rank, world = _world()
    layouts = zero_layouts(ema)
    if state.get("world_size") != world or state.get("rank") != rank:
        raise ValueError(
            f"saved by rank {state.get('rank')} of {state.get('world_size')}, loading on rank {rank} of {world}: "
            f"{CONSOLIDATE_HINT}"
        )
    own = ema._tracker.ema_by_name()
    own_shapes = {name: list(layouts[name].shape if name in layouts else own[name].shape) for name in own}
    own_sizes = {name: layout.partition_size for name, layout in layouts.items()}
    problems = []
    saved_shapes, saved_sizes = state.get("full_shapes"), state.get("partition_sizes")
    if not isinstance(saved_shapes, dict) or not isinstance(saved_sizes, dict):
        raise ValueError("'full_shapes' and 'partition_sizes' must be dicts")
    differing = [f"{n}: {saved_shapes[n]} != {s}" for n, s in own_shapes.items() if saved_shapes.get(n, s) != s]
    if differing:
        problems.append("full shapes differ (" + "; ".join(differing[:3]) + ")")
    resized = [f"{n}: {saved_sizes.get(n)} != {s}" for n, s in own_sizes.items() if saved_sizes.get(n, s) != s]
    if resized or set(saved_sizes) != set(own_sizes):
        problems.append(
            "partition sizes differ (" + "; ".join(resized[:3] or ["other tensors partitioned"]) + "): another "
            f"ZeRO stage or partitioning; {CONSOLIDATE_HINT}"
        )
    if problems:
        raise ValueError("; ".join(problems))
    return check_state_dict(state.get("ema"), ema._tracker.ema_by_name(), ema.decay, ema.ema_dtype, ema.config())


def agree(error: str | None) -> str | None:
    """Every rank's error (None: none) shared with all ranks: the first one, or None if every rank succeeded."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return error
    errors: list[str | None] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(errors, error)
    failed = [f"rank {rank}: {message}" for rank, message in enumerate(errors) if message is not None]
    return "; ".join(failed) or None


def problem_text(problem: Exception) -> str:
    """A check's failure as shared with the other ranks: the message, and the type unless a ValueError."""
    return str(problem) if isinstance(problem, ValueError) else f"{type(problem).__name__}: {problem}"


def prepare_partition_load(ema: ModelEMA, state: object, source: object) -> Callable[[], None]:
    """Check `state` (this rank's, from `partition_state`) on every rank; return the call that writes it.

    Any rank's failure (a ValueError, or any other error of a malformed file) is shared with all ranks,
    which raise together: none waits alone in the agreement, and none is written.
    """
    ema._swap.check_outside("loading the EMA's partitions")
    checked = None
    error = None
    try:
        checked = check_partition_state(ema, state)
    except Exception as problem:  # every rank must reach agree(), whatever this rank's file holds
        error = problem_text(problem)
    failure = agree(error)
    if failure is not None or checked is None:
        raise ValueError(f"Invalid EMA checkpoint {source} (nothing was loaded): {failure}")
    tensors, counts, last_decay = checked
    parts = {name: tensors[name] for name in ema.tensor_names}

    def write() -> None:
        write_checked_state(ema, parts, counts, last_decay)

    return write

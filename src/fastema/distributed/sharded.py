"""Sharded EMA checkpoints with PyTorch Distributed Checkpoint (DCP): no rank gathers the EMA.

    import torch.distributed.checkpoint as dcp
    dcp.save({"model": model.state_dict(), "ema": ema.sharded_state("save")}, checkpoint_id="ckpt/step1000")
    dcp.load({"model": ..., "ema": ema.sharded_state("load")}, checkpoint_id="ckpt/step1000")

`ModelEMA.sharded_state(purpose)` is a DCP `Stateful`. Under FSDP2 its tensors are the EMA's shards,
laid out as the model's DTensors, so every rank writes its own shard in parallel and `dcp.load`
reshards to whatever layout the loading job has: 2 ranks to 3, or to one process with an
unsharded model (and back). Everything in it is a tensor (the counts, the decays, the tensor
names as UTF-8 bytes), so DCP reads it with `weights_only=True`.

For `dcp.save` the state holds views of the EMA (no copy). For `dcp.load` it holds fresh
buffers of this rank's shard size: DCP reads into them, `load_state_dict` checks the names,
counts and decay, and only then copies them into the EMA. A mismatched, truncated or
interrupted checkpoint raises on every rank and leaves every rank's EMA as it was (DCP keeps
no checksums: a bit flipped inside a tensor's bytes is not detected).
`consolidate_ema` turns a DCP checkpoint's EMA into one `model.state_dict()`-style file,
offline, with DCP's own loader.

`dcp.save` writes its `.metadata` file last, so a save interrupted by a killed rank leaves a
directory that `dcp.load` refuses; but a save over an existing checkpoint directory would mix
the new shards with the old metadata. Save each checkpoint to a new directory (DCP's
convention), or use `save_sharded`, which writes to a temporary directory and renames it over
the target once every rank has finished; `load_sharded` refuses an incomplete directory with a
clear error on every rank and turns DCP's failures into a `ValueError` naming the checkpoint.
"""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..core.checkpoint import atomic_save
from ..core.parallel import rank
from ..core.sharded_state import ShardedEMAState, decode_strings

__all__ = ["ShardedEMAState", "consolidate_ema", "load_sharded", "save_sharded"]


def consolidate_ema(checkpoint_id: str | os.PathLike, path: str | os.PathLike, key: str = "ema") -> Path:
    """Write the EMA of a DCP checkpoint as one file of tensors by state-dict name (offline, one process).

    DCP's own loader assembles each tensor from the shards of every rank; the file is written
    atomically and loads with `torch.load(path, weights_only=True)`. It holds the averaged
    tensors only (no frozen parameters, one name per tied pair): load it with
    `model.load_state_dict(state, strict=False)`.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    checkpoint = complete_checkpoint(checkpoint_id)
    check_ema_entries(checkpoint, key)
    with single_process_intended():
        loaded = _load_state_dict_from_keys({key}, checkpoint_id=str(checkpoint))
    state = loaded.get(key)
    if not isinstance(state, dict) or not isinstance(state.get("tensors"), dict) or "names" not in state:
        raise ValueError(f"Invalid checkpoint_id: {checkpoint} holds no fastema EMA under {key!r}")
    names = decode_strings(state["names"])
    tensors = {name: state["tensors"][name] for name in names}
    return atomic_save(tensors, path)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def single_process_intended() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: here that is the intent."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", "torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _target(checkpoint_id: str | os.PathLike) -> Path:
    target = Path(checkpoint_id).resolve()
    if target.parent == target:
        raise ValueError(f"Invalid checkpoint_id: {checkpoint_id!r}; expected a directory path with a name")
    return target


def set_aside(target: Path, kind: str) -> list[Path]:
    """What `save_sharded` leaves beside `target`: `.<name>.previous-*` (set-aside copies) or `.<name>.saving-*`.

    The name is escaped: a checkpoint called `run[12]` must not match `.run1.dcp.previous-*`.
    """
    return list(target.parent.glob(f".{glob.escape(target.name)}.{kind}-*"))


def _previous_versions(target: Path) -> list[Path]:
    """Complete checkpoints that `save_sharded` set aside and did not get to delete (killed between renames),
    oldest first: by when each was written (its `.metadata`, written last), not by its random name."""
    complete = [path for path in set_aside(target, "previous") if (path / ".metadata").is_file()]
    return sorted(complete, key=lambda path: ((path / ".metadata").stat().st_mtime_ns, path.name))


def complete_checkpoint(checkpoint_id: str | os.PathLike) -> Path:
    checkpoint = _target(checkpoint_id)
    if (checkpoint / ".metadata").is_file():
        return checkpoint
    previous = _previous_versions(checkpoint)
    if not checkpoint.exists() and previous:
        warnings.warn(
            f"{checkpoint} does not exist: a save_sharded was interrupted between its two renames; loading the "
            f"previous checkpoint {previous[-1]}",
            UserWarning,
            stacklevel=3,
        )
        return previous[-1]
    raise FileNotFoundError(
        f"Invalid checkpoint_id: {checkpoint} is not a complete DCP checkpoint (no .metadata: it does not exist, "
        "or its save was interrupted)"
    )


def check_ema_entries(checkpoint: Path, key: str) -> None:
    """Every entry of the EMA under `key` must be a tensor: DCP unpickles other entries (`weights_only=False`)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    entries = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    not_tensors = [
        fqn
        for fqn, entry in entries.items()
        if fqn.startswith(key + ".") and not isinstance(entry, TensorStorageMetadata)
    ]
    if not_tensors:
        raise ValueError(
            f"Invalid checkpoint {checkpoint}: its EMA entries {not_tensors[:3]} are not tensors (a fastema EMA holds "
            "only tensors); refusing to unpickle them"
        )


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def on_rank_0(action: Callable[[], None], what: str = "save_sharded") -> None:
    """Run `action` on rank 0 and raise its error (if any) on every rank, so that no rank runs ahead."""
    error: list[str | None] = [None]
    if rank() == 0:
        try:
            action()
        except Exception as failure:
            error[0] = f"{type(failure).__name__}: {failure}"
    if _distributed():
        torch.distributed.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise RuntimeError(f"{what} failed on rank 0: {error[0]}")


def save_sharded(state_dict: dict[str, Any], checkpoint_id: str | os.PathLike) -> Path:
    """`dcp.save(state_dict)` into a temporary directory, renamed over `checkpoint_id` once every rank is done.

    Every rank must call it (a collective). The target must be absent or a DCP checkpoint (a
    directory with `.metadata`); anything else is refused before saving. A rank killed mid-save
    leaves the previous checkpoint in place; a kill between the two renames leaves it in a
    `.<name>.previous-*` directory, which `load_sharded` finds. Temporaries of killed saves are
    deleted by the next successful one.
    """
    import torch.distributed.checkpoint as dcp

    target = _target(checkpoint_id)
    for key, value in state_dict.items():
        if isinstance(value, ShardedEMAState) and value.purpose == "load":
            raise ValueError(
                f"Invalid state_dict[{key!r}]: ema.sharded_state('load') holds empty buffers for a load; "
                "save ema.sharded_state('save') (or no purpose); nothing was written"
            )
    if target.exists() and not (target / ".metadata").is_file():
        raise ValueError(
            f"Invalid checkpoint_id: {target} exists and is not a DCP checkpoint (no .metadata); refusing to replace it"
        )
    token = [secrets.token_hex(8)]
    if _distributed():
        torch.distributed.broadcast_object_list(token, src=0)  # one temporary name for all ranks
    staging = target.with_name(f".{target.name}.saving-{token[0]}")
    with single_process_intended():
        dcp.save(state_dict, checkpoint_id=str(staging))
    _barrier()  # every rank's shards are written (dcp.save wrote the metadata last)

    def replace() -> None:
        previous = target.with_name(f".{target.name}.previous-{token[0]}")
        if target.exists():
            target.rename(previous)
        staging.rename(target)
        leftovers = [previous, *set_aside(target, "saving"), *set_aside(target, "previous")]
        for leftover in leftovers:
            if leftover.exists():  # the set-aside checkpoint, and what killed saves left
                shutil.rmtree(leftover)

    on_rank_0(replace)
    return target


def load_sharded(state_dict: dict[str, Any], checkpoint_id: str | os.PathLike, key: str = "ema") -> None:
    """`dcp.load(state_dict)` from a complete checkpoint; a failure raises a `ValueError` naming it on every rank.

    The EMA entries under `key` are checked to be tensors first (DCP would unpickle anything else).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    checkpoint = complete_checkpoint(checkpoint_id)
    check_ema_entries(checkpoint, key)
    try:
        with single_process_intended():
            dcp.load(state_dict, checkpoint_id=str(checkpoint))
    except CheckpointException as error:
        raise dcp_failure(error, checkpoint) from None


def dcp_failure(error: BaseException, checkpoint: Path) -> ValueError:
    """DCP's `CheckpointException` (a BaseException: one failure per rank, gathered on every rank) as a ValueError."""
    failures = [
        failure[0] if isinstance(failure, tuple) else failure for failure in getattr(error, "failures", {}).values()
    ]
    reasons = sorted({f"{type(failure).__name__}: {failure}" for failure in failures}) or [str(error)]
    return ValueError(f"Invalid checkpoint {checkpoint} (nothing was loaded): " + "; ".join(reasons))

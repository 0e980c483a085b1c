"""Sharded EMA checkpoints with PyTorch Distributed Checkpoint (DCP): no rank gathers the EMA.

    import torch.distributed.checkpoint as dcp
    dcp.save({"model": model.state_dict(), "ema": ema.sharded_state()}, checkpoint_id="ckpt/step1000")
    dcp.load({"model": ..., "ema": ema.sharded_state()}, checkpoint_id="ckpt/step1000")

`ModelEMA.sharded_state()` is a DCP `Stateful`. Under FSDP2 its tensors are the EMA's shards,
laid out as the model's DTensors, so every rank writes its own shard in parallel and `dcp.load`
reshards to whatever layout the loading job has: 2 ranks to 3, or to one process with an
unsharded model (and back). Everything in it is a tensor (the counts, the decays, the tensor
names as UTF-8 bytes), so DCP reads it with `weights_only=True`.

For `dcp.save` the state holds views of the EMA (no copy). For `dcp.load` it holds fresh
buffers of this rank's shard size: DCP reads into them, `load_state_dict` checks the names,
counts and decay, and only then copies them into the EMA. A mismatched, damaged or
interrupted checkpoint raises on every rank and leaves every rank's EMA as it was.
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

import math
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from ._state import STATE_FORMAT, STATE_VERSION, check_state_dict
from .checkpoint import atomic_save
from .distributed import DTensor, is_sharded, rank

if TYPE_CHECKING:
    from .engine import ModelEMA

__all__ = ["ShardedEMAState", "consolidate_ema", "load_sharded", "save_sharded"]

SHARDED_VERSION = 1
_HEADER = ("version", "num_updates", "num_steps", "update_every", "all_parameters", "all_buffers")


def _called_by_dcp_load() -> bool:
    """Whether our caller is `torch.distributed.checkpoint.load` asking for the tensors to load into."""
    caller = sys._getframe(2)
    return caller.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict_loader"


def _encode_names(names: list[str]) -> Tensor:
    return torch.tensor(list("\n".join(names).encode()), dtype=torch.uint8)


def _decode_names(encoded: Tensor) -> list[str]:
    return bytes(encoded.tolist()).decode().split("\n")


class ShardedEMAState:
    """A `ModelEMA` as a DCP `Stateful` (`state_dict`/`load_state_dict`); get one with `ema.sharded_state()`."""

    def __init__(self, ema: ModelEMA) -> None:
        self.ema = ema

    def _layout_tensor(self, name: str, local: Tensor) -> Tensor:
        """`local` (this rank's part of EMA tensor `name`) as the checkpoint holds it: a DTensor under FSDP2."""
        layout = self.ema._layouts.get(name)
        if layout is None:
            return local
        like = cast(Any, layout)
        if local.device.type != like.device_mesh.device_type:
            raise ValueError(
                f"Invalid device: the EMA of {name} is on {local.device} but the model's mesh on "
                f"{like.device_mesh.device_type}; sharded checkpoints need the EMA beside the model (device=None)"
            )
        return cast(Any, DTensor).from_local(
            local, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(), run_check=False
        )

    def state_dict(self) -> dict[str, Any]:
        """The EMA's shards and its counts, as tensors: views for `dcp.save`, fresh buffers for `dcp.load`."""
        ema = self.ema
        ema._check_outside_swap("sharded_state()")
        ema._readable()
        for_loading = _called_by_dcp_load()
        tensors = {}
        for name, ema_tensor in zip(ema.tensor_names, ema._binding.ema_tensors):
            local = torch.empty_like(ema_tensor) if for_loading else ema_tensor.detach()
            tensors[name] = self._layout_tensor(name, local)
        header = [
            SHARDED_VERSION,
            ema.num_updates,
            ema.num_steps,
            ema.update_every,
            ema.all_parameters,
            ema.all_buffers,
        ]
        last_decay = math.nan if ema.last_decay is None else ema.last_decay
        return {
            "header": torch.tensor(header, dtype=torch.int64),
            "decays": torch.tensor([ema.decay, last_decay], dtype=torch.float64),
            "names": _encode_names(ema.tensor_names),
            "tensors": tensors,
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check what `dcp.load` read (names, counts, shapes, dtypes), then copy it into the EMA."""
        ema = self.ema
        header = dict(zip(_HEADER, state_dict["header"].tolist()))
        problems = []
        if header["version"] != SHARDED_VERSION:
            problems.append(f"version {header['version']} != {SHARDED_VERSION}")
        names = _decode_names(state_dict["names"])
        if names != list(ema.tensor_names):
            problems.append(
                f"tensor names differ (missing {sorted(set(ema.tensor_names) - set(names))}, "
                f"unexpected {sorted(set(names) - set(ema.tensor_names))})"
            )
        if header["update_every"] != ema.update_every:
            problems.append(f"update_every {header['update_every']} != {ema.update_every}")
        if problems:
            raise ValueError("Invalid sharded EMA checkpoint (nothing was loaded): " + "; ".join(problems))
        last_decay = state_dict["decays"].tolist()[1]  # the configured decay is this EMA's own, as in load_state_dict
        local = {
            name: tensor.to_local() if is_sharded(tensor) else tensor for name, tensor in state_dict["tensors"].items()
        }
        state = {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "tensors": local,
            "num_updates": int(header["num_updates"]),
            "num_steps": int(header["num_steps"]),
            "last_decay": None if math.isnan(last_decay) else last_decay,
        }
        expected = dict(zip(ema.tensor_names, ema._binding.ema_tensors))  # this rank's parts
        tensors, counts, checked_last_decay = check_state_dict(state, expected, ema.decay, ema.ema_dtype)
        ema._write_checked_state([tensors[name] for name in ema.tensor_names], counts, checked_last_decay)


def consolidate_ema(checkpoint_id: str | os.PathLike, path: str | os.PathLike, key: str = "ema") -> Path:
    """Write the EMA of a DCP checkpoint as one `model.state_dict()`-style file (offline, one process).

    DCP's own loader assembles each tensor from the shards of every rank; the file is written
    atomically and loads with `torch.load(path, weights_only=True)` and `model.load_state_dict(...,
    strict=False)` (it holds the averaged tensors).
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    checkpoint = _complete_checkpoint(checkpoint_id)
    with _single_process_intended():
        loaded = _load_state_dict_from_keys({key}, checkpoint_id=str(checkpoint))
    state = loaded.get(key)
    if not isinstance(state, dict) or not isinstance(state.get("tensors"), dict) or "names" not in state:
        raise ValueError(f"Invalid checkpoint_id: {checkpoint} holds no fastema EMA under {key!r}")
    names = _decode_names(state["names"])
    tensors = {name: state["tensors"][name] for name in names}
    return atomic_save(tensors, path) or Path(path)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def _single_process_intended() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: here that is the intent."""
    with warnings.catch_warnings():
        if not _distributed():
            warnings.filterwarnings("ignore", "torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _complete_checkpoint(checkpoint_id: str | os.PathLike) -> Path:
    checkpoint = Path(checkpoint_id)
    if not (checkpoint / ".metadata").is_file():
        raise FileNotFoundError(
            f"Invalid checkpoint_id: {checkpoint} is not a complete DCP checkpoint (no .metadata: it does not "
            "exist, or its save was interrupted)"
        )
    return checkpoint


def _barrier() -> None:
    if _distributed():
        torch.distributed.barrier()


def save_sharded(state_dict: dict[str, Any], checkpoint_id: str | os.PathLike) -> Path:
    """`dcp.save(state_dict)` into a temporary directory, renamed over `checkpoint_id` once every rank is done.

    Every rank must call it (a collective). A rank killed mid-save leaves the previous checkpoint
    at `checkpoint_id` as it was (and a `.<name>.saving-*` directory to delete).
    """
    import torch.distributed.checkpoint as dcp

    target = Path(checkpoint_id)
    token = [secrets.token_hex(8)]
    if _distributed():
        torch.distributed.broadcast_object_list(token, src=0)  # one temporary name for all ranks
    staging = target.with_name(f".{target.name}.saving-{token[0]}")
    with _single_process_intended():
        dcp.save(state_dict, checkpoint_id=str(staging))
    _barrier()  # every rank's shards are written (dcp.save wrote the metadata last)
    if rank() == 0:
        previous = target.with_name(f".{target.name}.previous-{token[0]}")
        if target.exists():
            target.rename(previous)
        staging.rename(target)
        if previous.exists():
            shutil.rmtree(previous)
    _barrier()
    return target


def load_sharded(state_dict: dict[str, Any], checkpoint_id: str | os.PathLike) -> None:
    """`dcp.load(state_dict)` from a complete checkpoint; a failure raises a `ValueError` naming it on every rank."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    checkpoint = _complete_checkpoint(checkpoint_id)
    try:
        with _single_process_intended():
            dcp.load(state_dict, checkpoint_id=str(checkpoint))
    except CheckpointException as error:  # a BaseException in DCP: one per rank, gathered on every rank
        failures = [failure[0] if isinstance(failure, tuple) else failure for failure in error.failures.values()]
        reasons = sorted({f"{type(failure).__name__}: {failure}" for failure in failures})
        raise ValueError(f"Invalid checkpoint {checkpoint} (the EMA is unchanged): " + "; ".join(reasons)) from None

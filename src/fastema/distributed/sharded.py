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
import math
import os
import secrets
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from ..core.checkpoint import atomic_save
from ..core.parallel import DTensor, is_sharded, rank
from ..core.state import STATE_FORMAT, STATE_VERSION, check_state_dict

if TYPE_CHECKING:
    from ..core.model_ema import ModelEMA

__all__ = ["ShardedEMAState", "consolidate_ema", "load_sharded", "save_sharded"]

SHARDED_VERSION = 1
_HEADER = ("version", "num_updates", "num_steps", "update_every", "all_parameters", "all_buffers")


_LOADER = "torch.distributed.checkpoint.state_dict_loader"
_SAVER = "torch.distributed.checkpoint.state_dict_saver"
_NOT_LOADED = -1  # the version slot of the buffers handed to dcp.load: still there afterwards, nothing was read


def _caller_module() -> str:
    """The module of whoever called `ShardedEMAState.state_dict` (DCP's loader or saver, or user code)."""
    return str(sys._getframe(2).f_globals.get("__name__"))


def _encode_strings(strings: list[str]) -> Tensor:
    return torch.tensor(list("\n".join(strings).encode()), dtype=torch.uint8)


def _decode_strings(encoded: Tensor) -> list[str]:
    return bytes(encoded.tolist()).decode().split("\n")


class ShardedEMAState:
    """A `ModelEMA` as a DCP `Stateful` (`state_dict`/`load_state_dict`); get one with `ema.sharded_state()`."""

    def __init__(self, ema: ModelEMA, purpose: str | None = None) -> None:
        if purpose not in (None, "save", "load"):
            raise ValueError(f"Invalid purpose: {purpose!r}; expected None, 'save' or 'load'")
        self.ema, self.purpose = ema, purpose

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
        """The EMA's shards and its counts, as tensors.

        For a save (`purpose="save"`, or called by `dcp.save`): views of the EMA (no copy). For a
        load (`purpose="load"`, or called by `dcp.load`): fresh buffers (DCP reads into them;
        `load_state_dict` checks them before copying into the EMA). Without a purpose, DCP's saver
        and loader are told apart by the calling module; from anywhere else (a wrapper `Stateful`, a
        plain dict, a DCP that moved its calls): copies of the EMA, which serve both a save and a
        load without ever letting DCP write into the EMA itself.
        """
        ema = self.ema
        ema._check_outside_swap("sharded_state()")
        called_by = _caller_module()
        wrong = {"save": _LOADER, "load": _SAVER}.get(self.purpose or "")
        if called_by == wrong:
            right = "load" if wrong == _LOADER else "save"
            raise ValueError(
                f"Invalid purpose: ema.sharded_state({self.purpose!r}) was handed to dcp.{right}; "
                f"use ema.sharded_state({right!r}) (or no purpose) there"
            )
        caller = {"save": _SAVER, "load": _LOADER}.get(self.purpose or "") or called_by
        if caller == _LOADER:
            ema.synchronize()  # no update in flight; a failed one is forgotten by the load
        else:
            ema._readable()
        tensors = {}
        for name, ema_tensor in zip(ema.tensor_names, ema._binding.ema_tensors):
            if caller == _SAVER:
                local = ema_tensor.detach()
            elif caller == _LOADER:
                local = torch.empty_like(ema_tensor)
            else:
                local = ema_tensor.detach().clone()
            tensors[name] = self._layout_tensor(name, local)
        header = [
            _NOT_LOADED if caller == _LOADER else SHARDED_VERSION,
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
            "names": _encode_strings(ema.tensor_names),
            "dtypes": _encode_strings([str(tensor.dtype) for tensor in ema._binding.ema_tensors]),
            "tensors": tensors,
        }

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check what `dcp.load` read (names, dtypes, counts, shapes), then copy it into the EMA."""
        ema = self.ema
        entries = ("header", "decays", "names", "dtypes", "tensors")
        if not isinstance(state_dict, dict) or not all(isinstance(state_dict.get(key), Tensor) for key in entries[:4]):
            raise ValueError(f"Invalid sharded EMA checkpoint (nothing was loaded): expected tensors {entries[:4]}")
        header = dict(zip(_HEADER, state_dict["header"].tolist()))
        if header["version"] == _NOT_LOADED:
            raise ValueError(
                "Invalid sharded EMA checkpoint (nothing was loaded): DCP read no EMA (the checkpoint has none under "
                "this key, and the load planner allowed a partial load)"
            )
        problems = []
        if header["version"] != SHARDED_VERSION:
            problems.append(f"version {header['version']} != {SHARDED_VERSION}")
        names = _decode_strings(state_dict["names"])
        if set(names) != set(ema.tensor_names) or len(names) != len(ema.tensor_names):  # DCP loads by key
            problems.append(
                f"tensor names differ (missing {sorted(set(ema.tensor_names) - set(names))}, "
                f"unexpected {sorted(set(names) - set(ema.tensor_names))})"
            )
        else:
            saved_dtypes = dict(zip(names, _decode_strings(state_dict["dtypes"])))
            own_dtypes = {name: str(tensor.dtype) for name, tensor in zip(ema.tensor_names, ema._binding.ema_tensors)}
            differing = [
                f"{n}: {saved_dtypes.get(n)} != {d}" for n, d in own_dtypes.items() if saved_dtypes.get(n) != d
            ]
            if differing:
                problems.append("dtypes differ (" + "; ".join(differing[:3]) + ")")
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
            "update_every": int(header["update_every"]),
            "all_parameters": bool(header["all_parameters"]),
            "all_buffers": bool(header["all_buffers"]),
        }
        expected = dict(zip(ema.tensor_names, ema._binding.ema_tensors))  # this rank's parts
        tensors, counts, checked_last_decay = check_state_dict(state, expected, ema.decay, ema.ema_dtype, ema.config())
        ema._write_checked_state([tensors[name] for name in ema.tensor_names], counts, checked_last_decay)


def consolidate_ema(checkpoint_id: str | os.PathLike, path: str | os.PathLike, key: str = "ema") -> Path:
    """Write the EMA of a DCP checkpoint as one file of tensors by state-dict name (offline, one process).

    DCP's own loader assembles each tensor from the shards of every rank; the file is written
    atomically and loads with `torch.load(path, weights_only=True)`. It holds the averaged
    tensors only (no frozen parameters, one name per tied pair): load it with
    `model.load_state_dict(state, strict=False)`.
    """
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    checkpoint = _complete_checkpoint(checkpoint_id)
    _check_ema_entries(checkpoint, key)
    with _single_process_intended():
        loaded = _load_state_dict_from_keys({key}, checkpoint_id=str(checkpoint))
    state = loaded.get(key)
    if not isinstance(state, dict) or not isinstance(state.get("tensors"), dict) or "names" not in state:
        raise ValueError(f"Invalid checkpoint_id: {checkpoint} holds no fastema EMA under {key!r}")
    names = _decode_strings(state["names"])
    tensors = {name: state["tensors"][name] for name in names}
    return atomic_save(tensors, path)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextmanager
def _single_process_intended() -> Iterator[None]:
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


def _complete_checkpoint(checkpoint_id: str | os.PathLike) -> Path:
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


def _check_ema_entries(checkpoint: Path, key: str) -> None:
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


def _on_rank_0(action: Callable[[], None], what: str = "save_sharded") -> None:
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
    with _single_process_intended():
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

    _on_rank_0(replace)
    return target


def load_sharded(state_dict: dict[str, Any], checkpoint_id: str | os.PathLike, key: str = "ema") -> None:
    """`dcp.load(state_dict)` from a complete checkpoint; a failure raises a `ValueError` naming it on every rank.

    The EMA entries under `key` are checked to be tensors first (DCP would unpickle anything else).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    checkpoint = _complete_checkpoint(checkpoint_id)
    _check_ema_entries(checkpoint, key)
    try:
        with _single_process_intended():
            dcp.load(state_dict, checkpoint_id=str(checkpoint))
    except CheckpointException as error:
        raise _dcp_failure(error, checkpoint) from None


def _dcp_failure(error: BaseException, checkpoint: Path) -> ValueError:
    """DCP's `CheckpointException` (a BaseException: one failure per rank, gathered on every rank) as a ValueError."""
    failures = [
        failure[0] if isinstance(failure, tuple) else failure for failure in getattr(error, "failures", {}).values()
    ]
    reasons = sorted({f"{type(failure).__name__}: {failure}" for failure in failures}) or [str(error)]
    return ValueError(f"Invalid checkpoint {checkpoint} (nothing was loaded): " + "; ".join(reasons))

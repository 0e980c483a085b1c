"""`ModelEMA.sharded_state()`: the EMA as a torch.distributed.checkpoint (DCP) `Stateful`.

Under FSDP2 its tensors are the EMA's shards, laid out as the model's DTensors, so every rank
writes its own shard and `dcp.load` reshards to whatever layout the loading job has. Everything
in it is a tensor (the counts, the decays, the tensor names as UTF-8 bytes), so DCP reads it with
`weights_only=True`. For `dcp.save` the state holds views of the EMA (no copy); for `dcp.load`,
fresh buffers of this rank's shard size, checked before they are copied into the EMA. The files
around it (atomic sharded saves, loads with clear errors, consolidation) are in
`fastema.distributed`.
"""

from __future__ import annotations

import math
import sys
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from .parallel import DTensor, is_sharded
from .state import STATE_FORMAT, STATE_VERSION, check_state_dict, write_checked_state
from .zero import ZeroLayout

if TYPE_CHECKING:
    from .model_ema import ModelEMA

__all__ = ["ShardedEMAState", "decode_strings", "encode_strings"]

SHARDED_VERSION = 1
_HEADER = ("version", "num_updates", "num_steps", "update_every", "all_parameters", "all_buffers")


_LOADER = "torch.distributed.checkpoint.state_dict_loader"
_SAVER = "torch.distributed.checkpoint.state_dict_saver"
_NOT_LOADED = -1  # the version slot of the buffers handed to dcp.load: still there afterwards, nothing was read


def _caller_module() -> str:
    """The module of whoever called `ShardedEMAState.state_dict` (DCP's loader or saver, or user code)."""
    return str(sys._getframe(2).f_globals.get("__name__"))


def encode_strings(strings: list[str]) -> Tensor:
    return torch.tensor(list("\n".join(strings).encode()), dtype=torch.uint8)


def decode_strings(encoded: Tensor) -> list[str]:
    return bytes(encoded.tolist()).decode().split("\n")


class ShardedEMAState:
    """A `ModelEMA` as a DCP `Stateful` (`state_dict`/`load_state_dict`); get one with `ema.sharded_state()`."""

    def __init__(self, ema: ModelEMA, purpose: str | None = None) -> None:
        if purpose not in (None, "save", "load"):
            raise ValueError(f"Invalid purpose: {purpose!r}; expected None, 'save' or 'load'")
        if any(isinstance(layout, ZeroLayout) for layout in ema._tracker.layouts.values()):
            raise ValueError(
                "Invalid EMA for sharded_state(): DeepSpeed ZeRO-3 partitions are not DCP shards; save them with "
                "fastema.deepspeed.save_checkpoint(engine, ema, ...) (one file per rank, beside DeepSpeed's own)"
            )
        self.ema, self.purpose = ema, purpose

    def _layout_tensor(self, name: str, local: Tensor) -> Tensor:
        """`local` (this rank's part of EMA tensor `name`) as the checkpoint holds it: a DTensor under FSDP2."""
        layout = self.ema._tracker.layouts.get(name)
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
        ema._swap.check_outside("sharded_state()")
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
        for name, ema_tensor in ema._tracker.ema_by_name().items():
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
            "names": encode_strings(ema.tensor_names),
            "dtypes": encode_strings([str(tensor.dtype) for tensor in ema._tracker.binding.ema_tensors]),
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
        names = decode_strings(state_dict["names"])
        if set(names) != set(ema.tensor_names) or len(names) != len(ema.tensor_names):  # DCP loads by key
            problems.append(
                f"tensor names differ (missing {sorted(set(ema.tensor_names) - set(names))}, "
                f"unexpected {sorted(set(names) - set(ema.tensor_names))})"
            )
        else:
            saved_dtypes = dict(zip(names, decode_strings(state_dict["dtypes"])))
            own_dtypes = {name: str(tensor.dtype) for name, tensor in ema._tracker.ema_by_name().items()}
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
        expected = ema._tracker.ema_by_name()  # this rank's parts
        tensors, counts, checked_last_decay = check_state_dict(state, expected, ema.decay, ema.ema_dtype, ema.config())
        write_checked_state(ema, {name: tensors[name] for name in ema.tensor_names}, counts, checked_last_decay)

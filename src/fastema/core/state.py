"""The `ModelEMA.state_dict()` format, and the checks a state must pass before anything is written."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor

from .checks import check_decay
from .parallel import gather_full, shard_like
from .schedules import note_rescaled

if TYPE_CHECKING:
    from .model_ema import ModelEMA

STATE_FORMAT = "fastema.ModelEMA"
STATE_VERSION = 1


# The options that decide what the saved numbers mean: how many steps an update covers, and what is tracked.
CONFIG_KEYS = ("update_every", "all_parameters", "all_buffers")


def check_state_dict(
    state_dict: object,
    expected: dict[str, Tensor],
    default_decay: float,
    ema_dtype: torch.dtype | None = None,
    config: dict[str, object] | None = None,
) -> tuple[dict[str, Tensor], tuple[int, int], float]:
    """Check a `ModelEMA.state_dict()` against the EMA tensors it must fill (names, shapes, dtypes).

    `ema_dtype` (if given) replaces the dtype of `expected`'s floating tensors. `config`: the
    loading EMA's values of `CONFIG_KEYS`, which the state must have been saved with. Returns the
    tensors, (update count, step count) and latest decay, or raises one ValueError listing
    every problem.
    """
    if not isinstance(state_dict, dict) or state_dict.get("format") != STATE_FORMAT:
        raise ValueError("Invalid state_dict: not a fastema.ModelEMA state (missing format marker)")
    if state_dict.get("version") != STATE_VERSION:
        raise ValueError(f"Invalid state_dict: version {state_dict.get('version')!r}, expected {STATE_VERSION}")
    tensors = state_dict.get("tensors")
    num_updates = state_dict.get("num_updates")
    num_steps = state_dict.get("num_steps", num_updates)
    if not (
        isinstance(tensors, dict)
        and isinstance(num_updates, int)
        and isinstance(num_steps, int)
        and min(num_updates, num_steps) >= 0
    ):
        raise ValueError(
            "Invalid state_dict: 'tensors' must be a dict, 'num_updates' and 'num_steps' non-negative ints"
        )
    problems = [
        f"{key} {state_dict.get(key)!r} != {value!r} (this EMA's)"
        for key, value in (config or {}).items()
        if state_dict.get(key) != value or type(state_dict.get(key)) is not type(value)
    ]
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    for name, ema_tensor in expected.items():
        saved = tensors.get(name)
        if saved is None:
            continue
        if not isinstance(saved, Tensor):
            problems.append(f"{name}: not a tensor")
        elif saved.shape != ema_tensor.shape:
            problems.append(f"{name}: shape {tuple(saved.shape)} != {tuple(ema_tensor.shape)}")
        else:
            dtype = ema_dtype if ema_dtype is not None and ema_tensor.is_floating_point() else ema_tensor.dtype
            if saved.dtype != dtype:
                problems.append(f"{name}: dtype {saved.dtype} != {dtype}")
    if problems:
        raise ValueError("Invalid state_dict for this ModelEMA (nothing was loaded): " + "; ".join(problems))
    last_decay = check_decay(state_dict.get("last_decay", default_decay), "last_decay")
    return tensors, (num_updates, num_steps), last_decay


def make_state_dict(
    tensors: dict[str, Tensor],
    num_updates: int,
    num_steps: int,
    decay: float,
    last_decay: float,
    config: dict[str, object],
    length: dict[str, float] | None = None,
) -> dict:
    """A `ModelEMA.state_dict()`: the format marker, the tensors by name, the counts, the decays, `config` and
    `length` (the half-life and batch size the decay came from, if it did)."""
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "tensors": tensors,
        "num_updates": num_updates,
        "num_steps": num_steps,
        "update_every": config["update_every"],
        "decay": decay,
        "last_decay": last_decay,
        "all_parameters": config["all_parameters"],
        "all_buffers": config["all_buffers"],
        **(length or {}),
    }


def full_state(ema: ModelEMA) -> dict:
    """`ema.state_dict()`: the EMA's values (full tensors, gathered shard by shard under FSDP2), counts and config."""
    ema._readable()
    tensors = dict(zip(ema.tensor_names, ema._swap.ema_values(ema._tracker.binding.ema_tensors)))
    for name, layout in ema._tracker.layouts.items():
        tensors[name] = gather_full(tensors[name].to(layout.device), layout).cpu()
    return make_state_dict(
        tensors, ema.num_updates, ema.num_steps, ema.decay, ema.last_decay, ema.config(), length_of(ema)
    )


def length_of(ema: ModelEMA) -> dict[str, float] | None:
    """The half-life and batch size `ema`'s decay came from, as its state keeps them (None: a plain decay)."""
    return None if ema.length is None else {"half_life": ema.length.half_life, "batch_size": ema.length.batch_size}


def prepare_load(ema: ModelEMA, state_dict: object) -> Callable[[], None]:
    """Check a full `state_dict` against `ema` (nothing is written); return the call that writes it.

    Averagers made of several EMAs check every part before writing any.
    """
    expected = dict(zip(ema.tensor_names, ema._tracker.binding.ema_tensors))
    expected.update(ema._tracker.layouts)  # full shapes for sharded tensors
    tensors, counts, last_decay = check_state_dict(state_dict, expected, ema.decay, ema.ema_dtype, ema.config())
    layouts = ema._tracker.layouts
    parts = {
        name: shard_like(tensors[name], layouts[name]) if name in layouts else tensors[name]
        for name in ema.tensor_names
    }

    def write() -> None:
        write_checked_state(ema, parts, counts, last_decay)
        note_rescaled(cast(dict, state_dict), ema.length)

    return write


def write_checked_state(ema: ModelEMA, parts: dict[str, Tensor], counts: tuple[int, int], last_decay: float) -> None:
    """Copy checked values (this rank's part of each tracked tensor, by name) and counts into `ema`."""
    ema._swap.check_outside("load_state_dict()")
    ema._tracker.overwrite(parts)
    ema.num_updates, ema.num_steps = counts
    ema.last_decay = last_decay

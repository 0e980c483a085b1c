"""Argument validation shared by the engine and the callbacks: fail early, name the argument."""

from __future__ import annotations

import math
from numbers import Real

import torch

DeviceLike = str | torch.device | None


def check_decay(value: object, name: str = "decay") -> float:
    """Return `value` as a float in [0, 1], or raise naming `name`."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"Invalid {name}: {value!r}; expected a float in [0, 1]")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"Invalid {name}: {value}; expected a float in [0, 1]")
    return value


def check_foreach(value: object) -> bool | None:
    """Validate the tri-state `foreach` switch (None = pick the fastest supported step)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid foreach: {value!r}; expected None, True or False")
    return value


def check_compile(value: object) -> bool | None:
    """Validate the tri-state `compile` switch (None = compile where it pays, see `compiled.compile_by_default`)."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid compile: {value!r}; expected None, True or False")
    return value


def check_flag(value: object, name: str) -> bool:
    """Validate a boolean keyword argument."""
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: {value!r}; expected True or False")
    return value


def check_flatten_model(value: object, foreach: bool | None) -> bool:
    """`flatten_model` packs tensors for the fused step, so it cannot go with the for-loop (`foreach=False`)."""
    value = check_flag(value, "flatten_model")
    if value and foreach is False:
        raise ValueError("Invalid flatten_model: True needs the fused step; use foreach=None or True, not False")
    return value


def check_device(value: object, name: str) -> torch.device | None:
    """Turn a device request into a `torch.device` that exists on this machine, or raise."""
    if value is None:
        return None
    accepted = "None, 'cpu', 'cuda', 'cuda:N' or a torch.device"
    if isinstance(value, str):
        try:
            device = torch.device(value)
        except RuntimeError as error:
            raise ValueError(f"Invalid {name}: {value!r}; expected {accepted}") from error
    elif isinstance(value, torch.device):
        device = value
    else:
        raise TypeError(f"Invalid {name}: {value!r}; expected {accepted}")
    if device.type == "meta":
        raise ValueError(f"Invalid {name}: {device}; the EMA needs real storage, not the meta device")
    if device.type != "cpu":
        backend = getattr(torch, device.type, None)
        is_available = getattr(backend, "is_available", None)
        if is_available is None or not is_available():
            raise ValueError(f"Invalid {name}: {device}; no {device.type} device is available on this machine")
        device_count = getattr(backend, "device_count", None)
        if device.index is not None and device_count is not None and device.index >= device_count():
            raise ValueError(f"Invalid {name}: {device}; this machine has {device_count()} {device.type} device(s)")
    return device


def check_ema_dtype(value: object, name: str = "ema_dtype") -> torch.dtype | None:
    """The dtype an EMA keeps floating tensors in: None (the model's) or a floating torch.dtype."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(f"Invalid {name}: {value!r}; expected None or a floating torch.dtype such as torch.float32")
    if not value.is_floating_point:
        raise ValueError(f"Invalid {name}: {value}; expected a floating dtype such as torch.float32")
    return value


def check_update_every(value: object, name: str = "update_every") -> int:
    """A number of optimizer steps (how many one EMA update covers, or between snapshots): an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"Invalid {name}: {value!r}; expected an int >= 1")
    if value < 1:
        raise ValueError(f"Invalid {name}: {value}; expected an int >= 1")
    return value
